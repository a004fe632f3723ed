"""Checks for config fields, one style for every method: each names the field, what it must be
and what it got, as ValueError (a wrong value) or TypeError (a wrong kind of thing).

    check_int(1, steps=config.steps)               # integer >= 1
    check_number(positive=True, lr=config.lr)       # finite, > 0 (positive=False: >= 0)
    check_bool(finetune=config.finetune)
    config.checkpoint_dir = check_dir("checkpoint_dir", config.checkpoint_dir)  # str or None
"""
from __future__ import annotations

import math
import os


def check_int(minimum: int, **fields) -> None:
    for name, v in fields.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")


def check_number(*, positive: bool, below: float | None = None, **fields) -> None:
    for name, v in fields.items():
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        if not ok or (v <= 0 if positive else v < 0) or (below is not None and v >= below):
            what = "> 0" if positive else ">= 0"
            what += f" and < {below}" if below is not None else ""
            raise ValueError(f"{name} must be a finite number {what}, got {v!r}")


def check_bool(**fields) -> None:
    for name, v in fields.items():
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be True or False, got {v!r}")


def check_dir(name: str, v):
    """A directory path (str or os.PathLike) or None; returns it as a str (configs serialize)."""
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if v is not None and not isinstance(v, str):
        raise TypeError(f"{name} must be a directory path or None, got {type(v).__name__}")
    return v
