"""RTN: round to nearest on the affine grid (data-free)."""
from __future__ import annotations

from dataclasses import dataclass

import zlib

from torch import nn

from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.incoherent import IncoherentQuantizedTensor

from .config import GridConfig, register_config
from .quantize import check_finite, install_weight
from .registry import register_module_handler


@register_config("rtn")
@dataclass
class RTNConfig(GridConfig):
    """Round every weight to the nearest point of the affine grid."""

    incoherence: bool = False


def rtn_config(bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
               group_along: str = "input", incoherence: bool = False,
               scale_dtype: str = "float16") -> RTNConfig:
    """Round-to-nearest on `bits`-bit groups of `group_size` weights along the input
    (`group_along="input"`) or output (`"output"`, per-input-channel) dimension. With
    `incoherence=True` the weight is first rotated by randomized Hadamard transforms."""
    return RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric,
                     group_along=group_along, incoherence=incoherence, scale_dtype=scale_dtype)


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
        q = AffineQuantizedTensor.from_hp(W, config.grid())
    install_weight(module, q)
    return module
