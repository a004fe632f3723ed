"""The rounding methods by name, for the CLI and the demo: a view of the method registry
(`discq.passes.registry`), where every method registers its config, handler and constructor."""
from __future__ import annotations

import discq.passes  # noqa: F401  (imports every method module, so all are registered)
from discq.passes.registry import METHODS, Method

__all__ = ["METHODS", "Method", "available_methods", "build_config", "config_constructor",
           "describe"]


def config_constructor(name: str):
    """The lowercase constructor of method `name` (e.g. `rtn_config`)."""
    if name not in METHODS or METHODS[name].constructor is None:
        raise ValueError(f"unknown method {name!r}; choose one of {available_methods()}")
    return METHODS[name].constructor


def available_methods() -> list[str]:
    """Registered methods, cheapest first (their `order`)."""
    return [m.name for m in sorted(METHODS.values(), key=lambda m: (m.order, m.name))
            if m.constructor is not None]


def describe() -> list[dict]:
    """One record per method: name, summary, paper, data-driven or not."""
    return [{"name": m.name, "summary": m.summary, "paper": m.paper,
             "data_driven": m.data_driven} for m in map(METHODS.get, available_methods())]


def build_config(name: str, *, bits: int, group_size: int | None, calibration=None, **kwargs):
    """Config for method `name`; data-driven methods get `calibration`, the others ignore it;
    methods off the affine grid ignore `group_size` and `symmetric`."""
    make = config_constructor(name)
    if METHODS[name].data_driven:
        kwargs["calibration"] = calibration
    if not METHODS[name].affine_grid:
        kwargs.pop("symmetric", None)
        return make(bits=bits, **kwargs)
    return make(bits=bits, group_size=group_size, **kwargs)
