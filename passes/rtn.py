"""RTN: round to nearest on the affine grid (data-free)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from discq.tensors.affine import AffineQuantizedTensor

from .config import GridConfig, register_config
from .quantize import check_finite, install_weight
from .registry import register_module_handler


@register_config("rtn")
@dataclass
class RTNConfig(GridConfig):
    """Round every weight to the nearest point of the affine grid."""


def rtn_config(bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
               group_along: str = "input", scale_dtype: str = "float16") -> RTNConfig:
    """Round-to-nearest on `bits`-bit groups of `group_size` weights along the input
    (`group_along="input"`) or output (`"output"`, per-input-channel) dimension."""
    return RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric,
                     group_along=group_along, scale_dtype=scale_dtype)


@register_module_handler(RTNConfig)
def _rtn_transform(module: nn.Module, config: RTNConfig, fqn: str = "") -> nn.Module:
    W = module.weight.detach()
    check_finite(W, fqn)
    install_weight(module, AffineQuantizedTensor.from_hp(W, config.grid()))
    return module
