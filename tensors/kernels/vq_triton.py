"""Triton decode of vector-codebook weights (GPTVQ; layout in `tensors/vq.py`) on CUDA.

Each program decodes BLOCK vectors of one weight row: it reads each vector's index from the
packed row (the one or two bytes holding its bits·dim bits), gathers the int8 codeword of its
group's codebook, multiplies by the codebook's scale and, with block scales, by 2^(−e/2). The
weight costs bits + codebook bits of memory traffic; the matmul that follows is cuBLAS's. Tested
on CPU with TRITON_INTERPRET=1 against `vq.decode_weight`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _vq_decode_kernel(q_ptr, cb_ptr, scale_ptr, bs_ptr, out_ptr, V, K, width, R_g, C_g, GC,
                      IB: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                      SB: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    v = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] vectors of row n
    live = v < V
    row = q_ptr + n * width
    if IB == 8:  # a byte an index, unpadded
        idx = tl.load(row + v, mask=live, other=0).to(tl.int32)
    else:  # runs of 8 indices in IB bytes, little-endian
        bit = (v % 8) * IB
        byte = (v // 8) * IB + bit // 8
        lo = tl.load(row + byte, mask=live, other=0).to(tl.int32)
        hi = tl.load(row + byte + 1, mask=live & (byte + 1 < width), other=0).to(tl.int32)
        idx = ((lo | (hi << 8)) >> (bit % 8)) & ((1 << IB) - 1)
    g = (n // R_g) * GC + (v * D) // C_g  # [BLOCK] codebook of each vector
    t = tl.arange(0, D)
    code = tl.load(cb_ptr + ((g * E + idx) * D)[:, None] + t[None, :], mask=live[:, None],
                   other=0)
    val = code.to(tl.float32) * tl.load(scale_ptr + g, mask=live, other=0).to(tl.float32)[:, None]
    col = (v * D)[:, None] + t[None, :]  # [BLOCK, D]
    if SB > 0:
        i = n * (K // SB) + col // SB  # one sequence over the rows, two exponents a byte
        e = (tl.load(bs_ptr + i // 2, mask=live[:, None], other=0).to(tl.int32)
             >> ((i % 2) * 4)) & 15
        pow2 = tl.exp2((-(e // 2)).to(tl.float32))
        val = val * (pow2 * tl.where((e % 2) == 1, 0.70710677, 1.0))
    tl.store(out_ptr + n * K + col, val, mask=live[:, None])


def decode_weight_triton(qdata: Tensor, codebook: Tensor, scale: Tensor,
                         block_scale: Tensor | None, bits: int, dim: int, K: int,
                         scale_block: int = 0) -> Tensor:
    """`vq.decode_weight` on the GPU: Ŵ [N, K] fp32."""
    N = qdata.shape[0]
    GR, GC, E, _ = codebook.shape
    V = K // dim
    out = torch.empty(N, K, dtype=torch.float32, device=qdata.device)
    bs = block_scale if block_scale is not None else qdata  # unread when SB = 0
    BLOCK = 128
    grid = (N, triton.cdiv(V, BLOCK))
    _vq_decode_kernel[grid](qdata.contiguous(), codebook.contiguous(), scale.contiguous(),
                            bs.contiguous(), out, V, K, qdata.shape[1], N // GR,
                            K // GC, GC, IB=bits * dim, D=dim, E=E,
                            SB=scale_block if block_scale is not None else 0, BLOCK=BLOCK)
    return out

