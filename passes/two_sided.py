"""Rounding with both Kronecker factors of a layer's Hessian (YAQA's two-sided feedback).

With the Hessian of the model's KL sketched as H_out ⊗ H_in (`kl_hessian.py`), the proxy loss of
Ŵ for W (both [N, K], E = W − Ŵ) is
    ℓ(Ŵ) = tr(H_out E H_in Eᵀ).
Write H_out = (I + O) D (I + O)ᵀ, the block LDL over row blocks of r rows (O strictly block
upper, D block diagonal). Then Y = (I + O)ᵀ E has row blocks Y_a = E_a + C_a with
    C_a = Σ_{a' < a} O_{a'a}ᵀ E_{a'}     (only rows already rounded)
and ℓ = Σ_a tr(D_aa Y_a H_in Y_aᵀ). So the rows are rounded a block at a time, each block by the
method's own one-sided rounding (GPTQ/LDLQ with H_in and whatever quantizer the format has) of
the shifted target W_a + C_a: its error against that target is Y_a, which that rounding keeps
small in H_in's norm. The errors of earlier rows are fed into later rows along the output side
as LDLQ feeds earlier columns into later ones along the input side; within a block the
coupling D_aa is left out, as BlockLDLQ leaves out the blocks of D along the input side. One
block (r = N) is the one-sided method with H_in.

The one-sided rounding is also kept as a candidate and the lower ℓ wins, so the result is never
worse on the proxy than one-sided LDLQ with the same quantizer.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .ldlq import block_ldl_at

# A sketch's output factor from tens of sequences is noisy: fed back as it is, it overfits the
# calibration set (benchmarks/results/kl_two_sided.md: scored on sequences the rounding did not
# see, the paper's light damping loses to one-sided rounding; shrunk this much it gains a little)
SHRINK = 3.0

# (target [n, K], rows) -> (the method's piece for those rows, its dequantized Ŵ [n, K] fp32)
RoundRows = Callable[[Tensor, slice], tuple[Any, Tensor]]


def kron_loss(W: Tensor, What: Tensor, H_in: Tensor, H_out: Tensor) -> float:
    """tr(H_out E H_in Eᵀ), E = W − Ŵ: vec(E)ᵀ (H_out ⊗ H_in) vec(E) for row-major vec."""
    E = W.float() - What.float()
    return float(((H_out.float() @ E @ H_in.float()) * E).sum())


def damped(H: Tensor, damp: float) -> Tensor:
    """H + damp·mean(diag H)·I (a zero H becomes I: no output is weighted above another)."""
    H = H.float()
    mean = H.diagonal().mean()
    if not mean > 0:
        return torch.eye(H.shape[0], device=H.device)
    return H + damp * mean * torch.eye(H.shape[0], device=H.device)


def row_bounds(N: int, rows: int, unit: int = 1) -> list[int]:
    """Block starts over N rows: blocks of `rows` rounded up to a multiple of `unit` (a tile,
    a group of rows sharing a scale), the last one possibly shorter."""
    r = max(unit, -(-rows // unit) * unit)
    return list(range(0, N, r)) + [N]


def round_two_sided(W: Tensor, H_in: Tensor, H_out: Tensor, round_rows: RoundRows, *,
                    rows: int, unit: int = 1, shrink: float | None = None) -> list[Any]:
    """The pieces (one per row block, top to bottom) of the better of the two-sided rounding
    with row blocks of `rows` and the one-sided rounding (one block), by `kron_loss` with
    H_out shrunk: H_out + shrink·mean(diag H_out)·I (default `SHRINK`). W: [N, K]; H_in: [K, K]
    (the method damps it its own way); H_out: [N, N]. `rows=0`: the one-sided rounding alone."""
    N = W.shape[0]
    W = W.float()
    one = round_rows(W, slice(0, N))
    if rows == 0:
        return [one[0]]
    H_out = damped(H_out, SHRINK if shrink is None else shrink)
    bounds = row_bounds(N, rows, unit)
    if len(bounds) <= 2:
        return [one[0]]
    UO = block_ldl_at(H_out, bounds)  # I + O
    pieces, What = [], torch.empty_like(W)
    for b, e in zip(bounds[:-1], bounds[1:]):
        C = UO[:b, b:e].t() @ (W[:b] - What[:b])  # [e - b, K] feedback of the rows above
        piece, What[b:e] = round_rows(W[b:e] + C, slice(b, e))
        pieces.append(piece)
    if kron_loss(W, What, H_in, H_out) <= kron_loss(W, one[1], H_in, H_out):
        return pieces
    return [one[0]]
