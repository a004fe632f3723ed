"""RTN: round to nearest on the affine grid (data-free)."""
from __future__ import annotations

from dataclasses import dataclass

from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.gguf import GGUFGrid
from discq.tensors.hadamard import layer_seed
from discq.tensors.incoherent import IncoherentQuantizedTensor
from torch import nn

from .config import GridConfig
from .lowrank import add_lowrank
from .quantize import check_finite, install_weight
from .registry import constructs, handles, register_method, register_module_handler
from .validate import check_bool, check_int


@register_method("rtn", summary="round to nearest (data-free)", data_driven=False, order=0)
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
    check_bool(incoherence=config.incoherence)
    check_int(0, lowrank=config.lowrank)  # a rank; 0 disables LoRC
    if config.lowrank and config.incoherence:
        raise ValueError("lowrank and incoherence cannot be combined yet; choose one")


def finish(q, W, config):
    """Attach the LoRC correction when the config asks for one."""
    return add_lowrank(q, W, config.lowrank) if config.lowrank else q


@constructs(RTNConfig)
def rtn_config(bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
               group_along: str = "input", incoherence: bool = False, lowrank: int = 0,
               scale_dtype: str = "float16", gguf: str | None = None) -> RTNConfig:
    """Round-to-nearest on `bits`-bit groups of `group_size` weights along the input
    (`group_along="input"`) or output (`"output"`, per-input-channel) dimension. With
    `incoherence=True` the weight is first rotated by randomized Hadamard transforms; with
    `lowrank=r` a rank-r fp16 correction of the error is added (LoRC). `gguf="Q4_K"` (a
    GGML block type) or `gguf="Q4_K_M"` (a llama.cpp mixture: each layer its type) rounds
    onto llama.cpp's grid instead of bits/group_size (`discq.export.to_gguf` writes it)."""
    return RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric,
                     group_along=group_along, incoherence=incoherence, lowrank=lowrank,
                     scale_dtype=scale_dtype, gguf=gguf)


def rtn_weight(W, config: RTNConfig, fqn: str = ""):
    """The RTN-quantized tensor of weight W: [N, K] of layer `fqn` (seeds its rotation)."""
    W = W.detach()
    check_finite(W, fqn)
    if config.incoherence:
        return IncoherentQuantizedTensor.from_hp(W, config.grid(), seed=layer_seed(fqn))
    grid = config.grid(fqn=fqn)
    if isinstance(grid, GGUFGrid):
        return grid.quantize(W)
    return finish(AffineQuantizedTensor.from_hp(W, grid), W, config)


@register_module_handler(RTNConfig)  # torchao.quantization.quantize_ accepts RTNConfig too
def _rtn_transform(module: nn.Module, config: RTNConfig, fqn: str = "") -> nn.Module:
    install_weight(module, rtn_weight(module.weight, config, fqn))
    return module


@handles(RTNConfig)
def _rtn_model(model: nn.Module, config: RTNConfig, targets) -> None:
    for fqn, module in targets:
        _rtn_transform(module, config, fqn)
