"""`gptvq_config` and its model handler: GPTVQ layer by layer over calibration data.

A weight becomes int8 codebooks of 2^(bits·dim) points of dimension `dim` (one per group of about
`group_size` weights) and one index a vector of `dim` weights, found by GPTQ's error feedback
(`gptvq_core.py`; format in `tensors/gptvq.py`). Bits per weight are counted from what is stored:
bits + (8·2^(bits·dim)·dim + 16) / group_size [+ 4 / scale_block].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from discq.tensors import kmeans, vq
from discq.tensors.gptvq import VectorQuantizedTensor
from torch import Tensor, nn

from .block_source import checkpointed
from .calibration import as_batches
from .capture import sequential_quantize
from .config import QuantConfig, check_finetune, check_hessian
from .gptvq_core import VQLayout, VQResult, gptvq_quantize, update_codebooks
from .kl_rounding import kl_quantize
from .quantize import check_finite, install_weight
from .registry import constructs, handles, register_method
from .two_sided import round_two_sided
from .validate import check_bool, check_dir, check_int, check_number


@register_method("gptvq", summary="GPTVQ: vector codebooks (k-means, int8) with Hessian error "
                 "feedback", paper="van Baalen et al., GPTVQ (2024), arXiv:2402.15319",
                 data_driven=True, affine_grid=False, order=15, layer_cost=3.0)
@dataclass
class GPTVQConfig(QuantConfig):
    """GPTVQ; see `gptvq_config`."""

    bits: int = 2
    dim: int = 2
    group_size: int | None = None
    calibration: Any = field(default=None, repr=False, compare=False)
    kmeans_iters: int = 100
    codebook_update: bool = True
    codebook_steps: int = 25
    codebook_lr: float = 0.05
    codebook_bits: int = 8
    scale_block: int | None = None
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    finetune: bool = False
    finetune_steps: int = 100
    checkpoint_dir: str | None = None
    hessian: str = "inputs"
    kl_rows: int = 0

    def __post_init__(self):
        vq.check_bits_dim(self.bits, self.dim)
        check_hessian(self)
        check_int(0, kmeans_iters=self.kmeans_iters, codebook_steps=self.codebook_steps)
        check_int(1, block_size=self.block_size)
        check_number(positive=True, codebook_lr=self.codebook_lr)
        check_number(positive=True, below=10, damp=self.damp)
        check_bool(codebook_update=self.codebook_update, true_sequential=self.true_sequential)
        check_finetune(self)
        self.checkpoint_dir = check_dir("checkpoint_dir", self.checkpoint_dir)
        if self.codebook_bits != 8:
            raise ValueError(f"codebook_bits: codebooks are stored as int8 with one scale each "
                             f"(GPTVQ's setting); got {self.codebook_bits!r}")
        if self.scale_block is not None:
            check_int(self.dim, scale_block=self.scale_block)
            if self.scale_block % self.dim:
                raise ValueError(f"scale_block={self.scale_block} must be a multiple of "
                                 f"dim={self.dim}")
        vq.check_overhead(self.bits, self.dim, self.group_size, self.scale_block)

    def resolved_group_size(self) -> int:
        return self.group_size or vq.default_group_size(self.bits, self.dim)


@constructs(GPTVQConfig)
def gptvq_config(bits: int = 2, dim: int = 2, group_size: int | None = None, calibration=None,
                 kmeans_iters: int = 100, codebook_update: bool = True, codebook_bits: int = 8,
                 scale_block: int | None = None, damp: float = 0.01, block_size: int = 128,
                 codebook_steps: int = 25, codebook_lr: float = 0.05,
                 true_sequential: bool = True, finetune: bool = False,
                 finetune_steps: int = 100, checkpoint_dir: str | None = None,
                 hessian: str = "inputs", kl_rows: int = 0) -> GPTVQConfig:
    """GPTVQ with `calibration` = token batches (`discq.data.calibration_batches`): `bits` per
    weight (2, 3, 4) as one index of bits·dim bits per vector of `dim` weights (1, 2 or 4;
    bits·dim <= 8) into an int8 codebook shared by a group of about `group_size` weights
    (default: the size at which codebooks cost 0.125 bits a weight, GPTVQ's setting: 2048
    for 2 bits in 2-D). Codebooks are fitted by `kmeans_iters` iterations of Hessian-weighted
    k-means when the column loop reaches them, then (`codebook_update`) moved by
    `codebook_steps` Adam steps (rate `codebook_lr` in units of the weight's RMS: 0.05 is the
    paper's 1e-3 on Llama's weights) on the layer's output error. `scale_block=64`: 4-bit
    log-domain scales per 64 weights of a row (+0.0625 bits). `finetune=True` then tunes
    norms and biases end to end, codes fixed. `checkpoint_dir`: finished blocks are saved
    there; the same call started again continues after the last one. `hessian="kl"`,
    `kl_rows`: as for `gptq_config` (rows fed back whole codebook groups at a time; a codebook
    spanning every row leaves the input side alone)."""
    return GPTVQConfig(bits=bits, dim=dim, group_size=group_size, calibration=calibration,
                       kmeans_iters=kmeans_iters, codebook_update=codebook_update,
                       codebook_bits=codebook_bits, scale_block=scale_block, damp=damp,
                       block_size=block_size, codebook_steps=codebook_steps,
                       codebook_lr=codebook_lr, true_sequential=true_sequential,
                       finetune=finetune, finetune_steps=finetune_steps,
                       checkpoint_dir=checkpoint_dir, hessian=hessian, kl_rows=kl_rows)


def layout_of(W: Tensor, config: GPTVQConfig, name: str = "") -> VQLayout:
    """The codebook groups of W: [N, K] (block scales must not straddle a codebook's columns)."""
    N, K = W.shape
    sb = config.scale_block or 0
    try:
        vq.check_shape(N, K, config.dim, sb or None)
        R_g, C_g = vq.group_shape(N, K, config.dim, config.resolved_group_size(), sb or 1)
    except ValueError as e:
        raise ValueError(f"GPTVQ {name or 'layer'} [{N}x{K}]: {e}") from None
    return VQLayout(config.bits, config.dim, R_g, C_g, sb)


def gptvq_layer(W: Tensor, H: Tensor, config: GPTVQConfig, name: str = "",
                H_out: Tensor | None = None) -> VectorQuantizedTensor:
    """GPTVQ of one weight W: [N, K] with Hessian H: [K, K]; with `H_out` [N, N] (KL
    Hessians H_out ⊗ H) rows are fed back along the output side, whole codebook groups at a
    time."""
    check_finite(W, name)
    layout = layout_of(W, config, name)

    def rounded(target: Tensor) -> VQResult:
        res, W0 = gptvq_quantize(target, H, layout, fit=_kmeans_fit(config.kmeans_iters),
                                 damp=config.damp, block_size=config.block_size, name=name)
        if config.codebook_update and config.codebook_steps:
            res = update_codebooks(W0, H, res, layout.scale_block, steps=config.codebook_steps,
                                   lr=config.codebook_lr)
        return res

    if H_out is None:  # one-sided: nothing needs the rounded weights dequantized
        return _tensor(rounded(W), config, layout, W.dtype)

    def round_rows(target: Tensor, rows: slice) -> tuple[VQResult, Tensor]:
        res = rounded(target)
        return res, _tensor(res, config, layout, W.dtype).dequantize(torch.float32)

    pieces = round_two_sided(W, H, H_out, round_rows, rows=config.kl_rows, unit=layout.R_g)
    exps = [p.exponents for p in pieces]
    res = VQResult(torch.cat([p.idx for p in pieces]), torch.cat([p.codebook for p in pieces]),
                   torch.cat([p.scale for p in pieces]),
                   None if exps[0] is None else torch.cat(exps))
    return _tensor(res, config, layout, W.dtype)


def _tensor(res: VQResult, config: GPTVQConfig, layout: VQLayout, dtype: torch.dtype
            ) -> VectorQuantizedTensor:
    return VectorQuantizedTensor.from_indices(res.idx, res.codebook, res.scale, config.bits,
                                              config.dim, dtype, res.exponents,
                                              layout.scale_block)


def _kmeans_fit(iters: int):
    def fit(X: Tensor, w: Tensor, E: int) -> Tensor:
        return kmeans.kmeans(X, w, E, iters)[0]
    return fit


@handles(GPTVQConfig)
def _gptvq_model(model: nn.Module, config: GPTVQConfig, targets) -> None:
    batches = as_batches(config.calibration, model)

    def quantize_layer(fqn: str, module: nn.Linear, H: Tensor, H_out: Tensor | None = None):
        install_weight(module, gptvq_layer(module.weight.detach(), H, config, fqn, H_out))

    for fqn, m in targets:  # refuse bad weights and shapes before hours of work
        check_finite(m.weight, fqn)
        layout_of(m.weight, config, fqn)
    desc = f"GPTVQ {config.bits}-bit dim {config.dim}"
    if config.hessian == "kl":
        return kl_quantize(model, batches, targets, quantize_layer, config,
                           desc=f"{desc} (KL Hessians)")
    with checkpointed(config.checkpoint_dir, config.to_json()):
        sequential_quantize(model, batches, targets, quantize_layer,
                            true_sequential=config.true_sequential, desc=desc)
