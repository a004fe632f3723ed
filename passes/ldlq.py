"""LDLQ and BlockLDLQ (QuIP, QuIP#): GPTQ's error feedback written with an LDL decomposition.

With H = (U + I) D (U + I)ᵀ, U strictly (block-)upper triangular, columns are rounded in order:
    Ŵ_B = Q(W_B + (W_{<B} − Ŵ_{<B}) · U_{<B, B})
for blocks B of g columns (g = 1: LDLQ with a scalar quantizer; g = 8: BlockLDLQ for the E8P
lattice). For g = 1 this is the same rounding as GPTQ without act-order (QuIP, Theorem 6).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

BlockQuantizer = Callable[[Tensor, int], Tensor]  # (W_B [N, g], first column) -> Ŵ_B


def block_ldl(H: Tensor, g: int) -> Tensor:
    """U + I, block unit upper triangular, with H = (U + I) D (U + I)ᵀ (D block diagonal).
    From the reversed-order Cholesky H = M Mᵀ (M upper): U + I = M · blockdiag(M)⁻¹."""
    K = H.shape[0]
    if K % g:
        raise ValueError(f"block size g={g} must divide the number of columns {K}")
    flip = torch.arange(K - 1, -1, -1, device=H.device)
    L = torch.linalg.cholesky(H.double()[flip][:, flip])
    M = L[flip][:, flip]  # upper triangular, H = M Mᵀ
    out = torch.empty_like(M)
    for b in range(0, K, g):
        out[:, b:b + g] = torch.linalg.solve_triangular(
            M[b:b + g, b:b + g], M[:, b:b + g], upper=True, left=False)
    return out.to(H.dtype)


def ldlq(W: Tensor, H: Tensor, quantize: BlockQuantizer, g: int = 1) -> Tensor:
    """Ŵ: [N, K] from W: [N, K] and a positive definite H: [K, K] (damp it beforehand)."""
    UI = block_ldl(H.float(), g)
    W = W.float()
    What = torch.zeros_like(W)
    for b in range(0, W.shape[1], g):
        feedback = (W[:, :b] - What[:, :b]) @ UI[:b, b:b + g]  # [N, g]
        What[:, b:b + g] = quantize(W[:, b:b + g] + feedback, b)
    return What
