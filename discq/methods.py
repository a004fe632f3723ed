"""The rounding methods by name, for the CLI and the demo: one place that says which methods
exist, which need calibration data, and how to build each one's config."""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    constructor: str  # "module:function"
    data_driven: bool
    summary: str
    affine_grid: bool = True  # takes group_size / symmetric (lattice codes have neither)


METHODS = {m.name: m for m in [
    Method("rtn", "discq.passes.rtn:rtn_config", False, "round to nearest (data-free)"),
    Method("gptq", "discq.passes.gptq:gptq_config", True, "GPTQ: Hessian error feedback"),
    Method("disc", "discq.passes.disc:disc_config", True, "DiscQuant: KL distillation rounding"),
    Method("quip-sharp", "discq.passes.quip_sharp:quip_sharp_config", True,
           "QuIP#: E8P lattice + incoherence + fine-tuning", affine_grid=False),
]}


class MethodNotAvailable(NotImplementedError):
    """The method is planned but not built in this version of discq."""


def config_constructor(name: str):
    """The lowercase constructor of method `name` (e.g. `rtn_config`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    module, fn = METHODS[name].constructor.split(":")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError):
        raise MethodNotAvailable(f"method {name!r} is not built in this version of discq yet; "
                                 f"available: {available_methods()}") from None


def available_methods() -> list[str]:
    out = []
    for name, m in METHODS.items():
        module, fn = m.constructor.split(":")
        try:
            if hasattr(importlib.import_module(module), fn):
                out.append(name)
        except ImportError:
            pass
    return out


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
