"""LoRC: low-rank compensation of the quantization error (Yao et al., 2023).

After rounding, E = W − Ŵ is approximated by its best rank-r product U·V (truncated SVD); the
layer computes (Ŵ + U V) x. U [N, r] and V [r, K] are stored in fp16 and counted in
bits_per_weight: 16·r·(N + K) extra bits.
"""
from __future__ import annotations

import torch
from discq.tensors.affine import AffineQuantizedTensor
from torch import Tensor


def add_lowrank(q: AffineQuantizedTensor, W: Tensor, rank: int) -> AffineQuantizedTensor:
    """q with the rank-`rank` correction of W − q attached (q itself is not modified)."""
    E = W.detach().float() - q.dequantize(torch.float32)  # [N, K]
    r = min(rank, *E.shape)
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    root = S[:r].sqrt()  # √S on each side keeps both factors well scaled in fp16
    u = (U[:, :r] * root).half().contiguous()  # contiguous: the layout a reload gives, so the
    v = (root[:, None] * Vh[:r]).half().contiguous()  # matmuls are bit-identical after load
    return AffineQuantizedTensor(q.qdata, q.scale, q.bits, q.group_size, q.group_along, q.shape,
                                 q.dtype, zero_point=q.zero_point, lowrank_u=u, lowrank_v=v)
