"""`discq quantize --target-bpw B [--candidates ...]`: the candidate configs a command line
names, for `quantize_(model, budget=bits(B), candidates=...)`.

--candidates is a comma-separated list of
    3          --method at 3 bits (--group-size, --hessian, ... as given)
    qtip:2     another method at 2 bits
    Q4_0       a GGML block type, rounded by --method (for --format gguf: one type a tensor)
and defaults to --method at 2, 3 and 4 bits.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

from discq.methods import METHODS, build_config
from discq.tensors.gguf_layout import TYPES

DEFAULT_WIDTHS = (2, 3, 4)


def parse_candidates(text: str | None, method: str) -> list[tuple[str, int, str | None]]:
    """[(method, bits, GGML type or None)] from --candidates."""
    if text is None:
        return [(method, b, None) for b in DEFAULT_WIDTHS]
    out = []
    for part in (p.strip() for p in text.split(",")):
        name, _, width = part.rpartition(":")
        name = name or method
        if width in TYPES:
            out.append((name, 4, width))
        elif width.isdigit() and name in METHODS:
            out.append((name, int(width), None))
        else:
            raise ValueError(f"--candidates: {part!r} is not <bits>, <method>:<bits> or a GGML "
                             f"type; e.g. --candidates 2,3,4 or qtip:2,qtip:3 or Q4_0,Q8_0 "
                             f"(methods: {', '.join(METHODS)})")
    return out


def candidate_configs(args: argparse.Namespace, calibration,
                      extras_of: Callable[[argparse.Namespace], dict]) -> list:
    """One config per candidate, each with the command line's other settings as they apply
    to its method (`extras_of(args with that method)`)."""
    configs = []
    for method, bits, gguf in parse_candidates(args.candidates, args.method):
        ns = argparse.Namespace(**{**vars(args), "method": method, "format": "hf"})
        extra = extras_of(ns)
        if gguf is not None:
            extra["gguf"] = gguf
        configs.append(build_config(method, bits=bits, group_size=args.group_size or None,
                                    calibration=calibration, symmetric=args.symmetric,
                                    **extra))
    return configs


def check_widths(args: argparse.Namespace) -> None:
    """--target-bpw's needs, before any work."""
    if args.target_bpw is None:
        if args.candidates is not None:
            raise ValueError("--candidates are the choices of --target-bpw: give both")
        if args.format == "gguf":
            raise ValueError("--format gguf writes each tensor in the GGML type it was rounded "
                             "to: use it with --target-bpw and GGML-type --candidates (e.g. "
                             "Q4_0,Q5_0,Q8_0), or name a llama.cpp mixture (gguf:Q4_K_M)")
        return
    if args.stream or args.head_bits or args.format.startswith("gguf:"):
        raise ValueError("--target-bpw chooses each layer's width itself: drop --stream (its "
                         "sensitivities need the whole model), --head-bits and a gguf:<mixture>"
                         " format (use --format gguf with GGML-type --candidates)")
    parsed = parse_candidates(args.candidates, args.method)
    for method, _, gguf in parsed:
        if gguf is not None and not METHODS[method].affine_grid:
            raise ValueError(f"--candidates {gguf}: GGML types are affine block grids; "
                             f"{method} does not round onto them")
    if args.format == "gguf" and any(g is None for _, _, g in parsed):
        raise ValueError("--format gguf: every candidate must be a GGML type (e.g. "
                         "--candidates Q4_0,Q5_0,Q8_0)")
