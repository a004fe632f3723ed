"""RTN: round to nearest on the affine grid (data-free)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.incoherent import IncoherentQuantizedTensor
from torch import nn

from .config import GridConfig, register_config
from .lowrank import add_lowrank, check_rank
from .quantize import check_finite, install_weight
from .registry import register_module_handler


@register_config("rtn")
@dataclass
class RTNConfig(GridConfig):
    """Round every weight to the nearest point of the affine grid."""

    incoherence: bool = False
    lowrank: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_extras(self)


def check_extras(config) -> None:
    """incoherence / lowrank options shared by RTN and GPTQ."""
    if not isinstance(config.incoherence, bool):
        raise TypeError(f"incoherence must be True or False, got {config.incoherence!r}")
    check_rank(config.lowrank)
    if config.lowrank and config.incoherence:
        raise ValueError("lowrank and incoherence cannot be combined yet; choose one")


def finish(q, W, config):
    """Attach the LoRC correction when the config asks for one."""
    return add_lowrank(q, W, config.lowrank) if config.lowrank else q


def rtn_config(bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
               group_along: str = "input", incoherence: bool = False, lowrank: int = 0,
               scale_dtype: str = "float16") -> RTNConfig:
    """Round-to-nearest on `bits`-bit groups of `group_size` weights along the input
    (`group_along="input"`) or output (`"output"`, per-input-channel) dimension. With
    `incoherence=True` the weight is first rotated by randomized Hadamard transforms; with
    `lowrank=r` a rank-r fp16 correction of the error is added (LoRC)."""
    return RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric,
                     group_along=group_along, incoherence=incoherence, lowrank=lowrank,
                     scale_dtype=scale_dtype)


def layer_seed(fqn: str) -> int:
    """Seed of a layer's random rotations: a function of its name, so runs are reproducible."""
    return zlib.crc32(fqn.encode())


@register_module_handler(RTNConfig)
def _rtn_transform(module: nn.Module, config: RTNConfig, fqn: str = "") -> nn.Module:
    W = module.weight.detach()
    check_finite(W, fqn)
    if config.incoherence:
        q = IncoherentQuantizedTensor.from_hp(W, config.grid(), seed=layer_seed(fqn))
    else:
        q = finish(AffineQuantizedTensor.from_hp(W, config.grid()), W, config)
    install_weight(module, q)
    return module
