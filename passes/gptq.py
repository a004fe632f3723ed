"""`gptq_config` and its model handler: GPTQ layer by layer over calibration data."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.grid import resolved_group_size
from discq.tensors.hadamard import (
    layer_rotation,
    layer_seed,
    rotate_hessian,
    rotate_weight,
)
from discq.tensors.incoherent import IncoherentQuantizedTensor
from torch import Tensor, nn

from .block_source import checkpointed
from .calibration import as_batches
from .capture import sequential_quantize
from .config import GridConfig, check_finetune, check_hessian
from .gptq_core import gptq_quantize
from .kl_rounding import kl_quantize
from .quantize import check_finite, install_weight
from .registry import constructs, handles, register_method
from .rtn import check_extras, finish
from .two_sided import kron_loss, round_two_sided
from .validate import check_bool, check_dir, check_int, check_number


@register_method("gptq", summary="GPTQ/LDLQ: Hessian error feedback, layer by layer",
                 paper="Frantar et al., GPTQ (ICLR 2023), arXiv:2210.17323",
                 data_driven=True, order=10)
@dataclass
class GPTQConfig(GridConfig):
    """GPTQ on the affine grid. `group_along="auto"` picks input or output grouping per layer
    by the proxy loss tr((W−Ŵ) H (W−Ŵ)ᵀ) (AdaDim)."""

    calibration: Any = field(default=None, repr=False, compare=False)
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    true_sequential: bool = True
    incoherence: bool = False
    lowrank: int = 0
    finetune: bool = False
    finetune_steps: int = 100
    checkpoint_dir: str | None = None
    hessian: str = "inputs"
    kl_rows: int = 0

    ALLOWED_GROUP_ALONG: ClassVar[tuple[str, ...]] = ("input", "output", "auto")

    def __post_init__(self):
        super().__post_init__()
        check_number(positive=True, below=10, damp=self.damp)  # 0.01 in the paper
        check_int(1, block_size=self.block_size)                 # 128 in the paper
        check_extras(self)
        check_finetune(self)
        self.checkpoint_dir = check_dir("checkpoint_dir", self.checkpoint_dir)
        check_bool(act_order=self.act_order, true_sequential=self.true_sequential)
        check_hessian(self)


@constructs(GPTQConfig)
def gptq_config(bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
                group_along: str = "input", calibration=None, damp: float = 0.01,
                act_order: bool = True, block_size: int = 128, true_sequential: bool = True,
                incoherence: bool = False, lowrank: int = 0,
                scale_dtype: str = "float16", finetune: bool = False,
                finetune_steps: int = 100, gguf: str | None = None,
                checkpoint_dir: str | None = None, hessian: str = "inputs",
                kl_rows: int = 0) -> GPTQConfig:
    """GPTQ with `calibration` = list of LongTensor [B, S] token batches
    (`discq.data.calibration_batches`). `incoherence=True` quantizes W̃ = R_out W R_inᵀ with
    the Hessian R_in H R_inᵀ (randomized Hadamard rotations, QuIP); `lowrank=r` adds a
    rank-r fp16 correction of the error (LoRC). `finetune=True` then tunes what stays
    continuous (norms, biases, sign vectors) for `finetune_steps` steps against the original
    model's next-token distribution, codes fixed (as QuIP# does; needs Lightning).
    `gguf="Q4_K"` or a llama.cpp mixture `gguf="Q4_K_M"`: round onto llama.cpp's block grid
    (block scales fitted when GPTQ first reaches the block) instead of bits/group_size.
    `checkpoint_dir`: each finished block is saved there, and the same call started again
    after a crash continues from the next block, ending with the uninterrupted result.
    `hessian="kl"`: each layer is rounded for the whole model's output instead of its own
    (YAQA): GPTQ runs with the input-side Kronecker factor of the Hessian of the model's KL to
    the original in place of XᵀX, from one forward and backward pass per calibration sequence
    on the original model. `kl_rows=r` also feeds each block of r rows' errors into the later
    rows through the output-side factor (YAQA's two-sided rounding; off by default: sketched
    from tens of sequences that factor is too noisy to gain from)."""
    return GPTQConfig(bits=bits, group_size=group_size, symmetric=symmetric,
                      group_along=group_along, scale_dtype=scale_dtype, calibration=calibration,
                      damp=damp, act_order=act_order, block_size=block_size,
                      true_sequential=true_sequential, incoherence=incoherence,
                      lowrank=lowrank, finetune=finetune, finetune_steps=finetune_steps,
                      gguf=gguf, checkpoint_dir=checkpoint_dir, hessian=hessian,
                      kl_rows=kl_rows)


def proxy_loss(W: Tensor, Wq: Tensor, H: Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): the layer's output error on the calibration inputs."""
    D = (W.float() - Wq.float())
    return float(((D @ H) * D).sum())


def gptq_layer(W: Tensor, H: Tensor, config: GPTQConfig, name: str = "",
               H_out: Tensor | None = None) -> AffineQuantizedTensor:
    """GPTQ of one weight W: [N, K] with Hessian H: [K, K]; with group_along="auto" both
    directions are tried and the lower proxy loss wins. With `H_out` [N, N], H is the input
    factor of a Kronecker-factored Hessian H_out ⊗ H and rows are fed back along the output
    side too (`two_sided.py`); the proxy loss is then tr(H_out E H Eᵀ)."""
    check_finite(W, name)
    if config.incoherence:
        return _gptq_incoherent(W, H, config, name, H_out)
    alongs = ("input", "output") if config.group_along == "auto" else (config.group_along,)
    if config.gguf is not None:  # llama.cpp's blocks run along rows
        alongs = ("input",)
    best, best_loss = None, float("inf")
    for along in alongs:
        grid = config.grid(group_along=along, fqn=name)
        q = (_round(W, H, grid, config, name) if H_out is None
             else _round_two_sided(W, H, H_out, grid, config, name))
        loss = 0.0
        if len(alongs) > 1:
            What = q.dequantize(torch.float32)
            loss = proxy_loss(W, What, H) if H_out is None else kron_loss(W, What, H, H_out)
        if loss < best_loss or best is None:
            best, best_loss = q, loss
    return best


def _round(W: Tensor, H: Tensor, grid, config: GPTQConfig, name: str, dtype=None):
    """GPTQ of W onto `grid`, packed (in `dtype`, W's by default)."""
    dtype = dtype or W.dtype
    parts = gptq_quantize(W, H, grid, damp=config.damp, act_order=config.act_order,
                          block_size=config.block_size, scale_dtype=grid.scale_dtype or dtype,
                          name=name)
    return _pack(parts, grid, dtype)


def _pack(parts, grid, dtype: torch.dtype):
    codes, scale, zero, headers = parts
    return (grid.pack(codes, headers, dtype) if headers is not None
            else AffineQuantizedTensor.from_codes(codes, scale, zero, grid, dtype))


def _round_two_sided(W: Tensor, H: Tensor, H_out: Tensor, grid, config: GPTQConfig, name: str):
    """GPTQ of `config.kl_rows` rows at a time, later rows' targets shifted by the earlier
    rows' errors through H_out; a block of rows is whole groups when groups run along rows."""
    N, dtype = W.shape[0], W.dtype
    scale_dtype = grid.scale_dtype or dtype
    along_rows = getattr(grid, "group_along", "input") == "output"

    def round_rows(target: Tensor, rows: slice):
        parts = gptq_quantize(target, H, grid, damp=config.damp, act_order=config.act_order,
                              block_size=config.block_size, scale_dtype=scale_dtype, name=name)
        return parts, _pack(parts, grid, dtype).dequantize(torch.float32)

    unit = resolved_group_size(grid, N) if along_rows else 1
    pieces = round_two_sided(W, H, H_out, round_rows, rows=config.kl_rows, unit=unit)
    codes, scale, zero, headers = zip(*pieces)
    dim = 1 if along_rows else 0  # output grouping keeps scales as [K, groups along N]
    return _pack((torch.cat(codes), torch.cat(scale, dim),
                  None if zero[0] is None else torch.cat(zero, dim),
                  None if headers[0] is None else torch.cat(headers)), grid, dtype)


def _gptq_incoherent(W: Tensor, H: Tensor, config: GPTQConfig, name: str,
                     H_out: Tensor | None = None):
    """GPTQ in the rotated basis: the proxy loss is invariant under the rotation."""
    s_in, s_out, q_in, q_out = layer_rotation(*W.shape, layer_seed(name))
    Wt = rotate_weight(W.float(), s_out, s_in, q_out, q_in).to(W.dtype)
    Ht = rotate_hessian(H, s_in, q_in)
    Ht_out = None if H_out is None else rotate_hessian(H_out, s_out, q_out)
    inner = gptq_layer(Wt, Ht, dataclasses.replace(config, incoherence=False), name, Ht_out)
    return IncoherentQuantizedTensor.wrap(inner, s_in, s_out, q_in, q_out)


@handles(GPTQConfig)
def _gptq_model(model: nn.Module, config: GPTQConfig, targets) -> None:
    batches = as_batches(config.calibration, model)

    def quantize_layer(fqn: str, module: nn.Linear, H: Tensor, H_out: Tensor | None = None):
        W = module.weight.detach()
        install_weight(module, finish(gptq_layer(W, H, config, fqn, H_out), W, config))

    for fqn, m in targets:  # refuse NaN weights before hours of work, naming the layer
        check_finite(m.weight, fqn)
    if config.hessian == "kl":
        return kl_quantize(model, batches, targets, quantize_layer, config,
                           desc="GPTQ (KL Hessians)")
    with checkpointed(config.checkpoint_dir, config.to_json()):
        sequential_quantize(model, batches, targets, quantize_layer,
                            true_sequential=config.true_sequential, desc="GPTQ")
