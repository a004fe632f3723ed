"""LDLQ and BlockLDLQ (QuIP, QuIP#): GPTQ's error feedback written with an LDL decomposition.

With H = (U + I) D (U + I)ᵀ, U strictly (block-)upper triangular, columns are rounded in order:
    Ŵ_B = Q(W_B + (W_{<B} − Ŵ_{<B}) · U_{<B, B})
for blocks B of g columns (g = 1: LDLQ with a scalar quantizer; g = 8: BlockLDLQ for the E8P
lattice). For g = 1 this is the same rounding as GPTQ without act-order (QuIP, Theorem 6).

`refine` then runs block coordinate descent on the proxy loss tr((Ŵ − W) H (Ŵ − W)ᵀ) (QuIP#):
each block is re-rounded from its best continuous value given all the others,
    Ŵ_B ← Q(Ŵ_B + (W − Ŵ) · H_{:, B} · H_BB⁻¹).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

BlockQuantizer = Callable[[Tensor, int], Tensor]  # (W_B [N, g], first column) -> Ŵ_B


def block_ldl(H: Tensor, g: int) -> Tensor:
    """U + I, block unit upper triangular, with H = (U + I) D (U + I)ᵀ (D block diagonal).
    From the reversed-order Cholesky H = M Mᵀ (M upper): U + I = M · blockdiag(M)⁻¹."""
    K = H.shape[0]
    if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or K % g:
        raise ValueError(f"block size g={g!r} must be a positive integer dividing the number of "
                         f"columns {K}")
    return block_ldl_at(H, list(range(0, K + 1, g)))


def block_ldl_at(H: Tensor, bounds: list[int]) -> Tensor:
    """`block_ldl` with the blocks [bounds[i], bounds[i+1]) (any sizes, bounds[-1] = K)."""
    K = H.shape[0]
    flip = torch.arange(K - 1, -1, -1, device=H.device)
    L, info = torch.linalg.cholesky_ex(H.double()[flip][:, flip])
    if info != 0:
        raise ValueError("H is not positive definite: damp it first (H + 0.01·mean(diag H)·I)")
    M = L[flip][:, flip]  # upper triangular, H = M Mᵀ
    out = torch.empty_like(M)
    for b, e in zip(bounds[:-1], bounds[1:]):
        out[:, b:e] = torch.linalg.solve_triangular(M[b:e, b:e], M[:, b:e], upper=True,
                                                    left=False)
    return out.to(H.dtype)


def ldlq(W: Tensor, H: Tensor, quantize: BlockQuantizer, g: int = 1,
         passes: int = 0) -> Tensor:
    """Ŵ: [N, K] from W: [N, K] and a positive definite H: [K, K] (damp it beforehand), then
    `passes` rounds of coordinate descent (`refine`; QuIP# uses 10 for BlockLDLQ)."""
    UI = block_ldl(H.float(), g)
    W = W.float()
    What = torch.zeros_like(W)
    for b in range(0, W.shape[1], g):
        feedback = (W[:, :b] - What[:, :b]) @ UI[:b, b:b + g]  # [N, g]
        What[:, b:b + g] = quantize(W[:, b:b + g] + feedback, b)
    return refine(W, What, H, quantize, g, passes) if passes else What


def _row_loss(E: Tensor, H_BB: Tensor) -> Tensor:
    """Per row, e H_BB eᵀ. E: [N, g] -> [N]."""
    return ((E @ H_BB) * E).sum(-1)


def refine(W: Tensor, What: Tensor, H: Tensor, quantize: BlockQuantizer, g: int = 1,
           passes: int = 1) -> Tensor:
    """Block coordinate descent from Ŵ. A row keeps its old block wherever the re-rounded one
    would not lower that row's loss (rows are independent in the proxy loss), so the proxy
    loss never increases, whatever the quantizer. Returns a new Ŵ: [N, K]."""
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 0:
        raise ValueError(f"passes must be an integer >= 0, got {passes!r}")
    W, H = W.float(), H.float()
    What = What.float().clone()
    D = W - What  # [N, K], the current error
    for _ in range(passes):
        for b in range(0, W.shape[1], g):
            B = slice(b, b + g)
            H_BB = H[B, B]
            # best continuous block given the rest: Ŵ_B + D H_{:,B} H_BB⁻¹ (H_BB symmetric)
            target = What[:, B] + torch.linalg.solve(H_BB, (D @ H[:, B]).t()).t()  # [N, g]
            new = quantize(target, b)
            better = _row_loss(new - target, H_BB) < _row_loss(What[:, B] - target, H_BB)
            What[:, B] = torch.where(better[:, None], new, What[:, B])
            D[:, B] = W[:, B] - What[:, B]
    return What
