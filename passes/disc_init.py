"""DiscQuant's start from GPTQ's codes (`disc_config(init="gptq")`, or `init="kl"`: GPTQ with
the input factor of the whole model's KL Hessian, `kl_hessian.py`).

GPTQ rounds each weight to the grid point nearest its error-updated value w̃ (the original
weight plus the feedback of the errors of the columns rounded before it). DiscQuant then
relaxes around w̃ instead of W: each weight chooses between w̃'s two grid neighbours, x starts
at GPTQ's choice, and the pull term 1 − 2y (y: w̃'s position between its neighbours) holds
GPTQ's choice where it was clear-cut, so the KL term moves the weights whose rounding GPTQ
decided by a hair. The grid is GPTQ's (its scales, fitted from the error-updated weights).

GPTQ runs as usual (block by block, each block's inputs from the already-rounded blocks), but
its rounded weights are only lent to the model while it runs: afterwards every target holds
its original weight again (DiscQuant's teacher) and nothing of GPTQ stays but the starts.
With KL Hessians no layer's Hessian depends on the layers before it: nothing is lent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from discq.tensors.grid import dequantize_rows, from_rows, to_rows
from discq.tensors.hadamard import (
    layer_rotation,
    layer_seed,
    rotate_hessian,
    rotate_weight,
    unrotate_weight,
)
from torch import Tensor, nn

from .capture import sequential_quantize
from .gptq_core import gptq_quantize
from .kl_rounding import kl_factors


@dataclass
class Start:
    """Where DiscQuant relaxes one layer: `W` the error-updated weights GPTQ rounded, in weight
    orientation (and in the layer's rotated basis with incoherence); `scale`/`zero` GPTQ's grid
    in row form."""

    W: Tensor
    scale: Tensor
    zero: Tensor | None


@torch.no_grad()
def gptq_starts(model: nn.Module, config, targets: list[tuple[str, nn.Module]],
                batches: list[Tensor]) -> dict[str, Start]:
    """GPTQ (damp 0.01, act-order, blocks of 128, true-sequential) on `targets` with the grid
    of `config` (a DiscConfig); returns each target's `Start`. The model's weights are those it
    was given when this returns, also after an error or an interruption."""
    starts: dict[str, Start] = {}
    lent: list[tuple[nn.Module, nn.Parameter]] = []

    def quantize_layer(fqn: str, module: nn.Module, H: Tensor) -> None:
        W = module.weight.detach()
        starts[fqn], Wq = _gptq_start(W, H, config, fqn)
        lent.append((module, module.weight))
        module.weight = nn.Parameter(Wq.to(W.dtype), requires_grad=False)

    try:
        sequential_quantize(model, batches, targets, quantize_layer,
                            desc="DiscQuant's start: GPTQ")
    finally:
        for module, original in reversed(lent):
            module.weight = original
    return starts


@torch.no_grad()
def kl_starts(model: nn.Module, config, targets: list[tuple[str, nn.Module]],
              batches: list[Tensor]) -> dict[str, Start]:
    """`gptq_starts` with each layer's KL Hessian input factor in place of XᵀX (one forward
    and backward pass per calibration sequence on the original model, then GPTQ per layer)."""
    factors = kl_factors(model, batches, targets, config)
    return {fqn: _gptq_start(m.weight.detach(), factors.pop(fqn)[0], config, fqn)[0]
            for fqn, m in targets}


def _gptq_start(W: Tensor, H: Tensor, config, fqn: str) -> tuple[Start, Tensor]:
    """One layer: its Start and GPTQ's rounded weight (what the later blocks see)."""
    grid = config.grid(fqn=fqn)
    rot = layer_rotation(*W.shape, layer_seed(fqn)) if config.incoherence else None
    Wt = W.float()
    if rot is not None:
        s_in, s_out, q_in, q_out = rot
        Wt, H = rotate_weight(Wt, s_out, s_in, q_out, q_in), rotate_hessian(H, s_in, q_in)
    seen = torch.empty_like(Wt)
    codes, scale, zero, _ = gptq_quantize(Wt, H, grid, scale_dtype=grid.scale_dtype or W.dtype,
                                          name=fqn, seen=seen)
    Wq = from_rows(dequantize_rows(to_rows(codes, grid), scale, zero, grid, torch.float32), grid)
    if rot is not None:
        Wq = unrotate_weight(Wq, s_out, s_in, q_out, q_in)
    return Start(seen, scale, zero), Wq



STARTS = {"gptq": gptq_starts, "kl": kl_starts}  # disc_config(init=...) -> its starts
