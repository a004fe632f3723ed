"""Triton decode of packed lattice codes (E8P, and its 3/4-bit residual variants) on CUDA.

The layout is kernels/e8p_ref.py's: per run of 8 weights, `bits` bytes — a little-endian
16-bit E8P code, then (3 bits) one byte of the 1-bit E8 codebook or (4 bits) a second 16-bit
E8P code. Each program decodes a tile of rows × runs by gathering from the codebook tables
(65536×8 fp32 for E8P, 2 MiB, stays in L2; 256×8 for E8), so the weight costs `bits` bits of
memory traffic plus table hits. The matmul that follows is cuBLAS's; a fused GEMV is future
work. Tested on CPU with TRITON_INTERPRET=1 against `e8p_ref.decode_weight`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import e8p, e8p_residual

STAGE_KIND = {2: 0, 3: 1, 4: 2}  # second stage: none, 1-bit E8, E8P


@triton.jit
def _e8p_decode_kernel(q_ptr, t1_ptr, t2_ptr, out_ptr, N, B, r,
                       BITS: tl.constexpr, KIND: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = tl.program_id(1) * BLOCK_B * 8 + tl.arange(0, BLOCK_B * 8)  # [BB·8] output columns
    run, j = cols // 8, cols % 8
    mask = (rows[:, None] < N) & (run[None, :] < B)
    base = q_ptr + rows[:, None] * (B * BITS) + run[None, :] * BITS  # first byte of the run
    lo = tl.load(base, mask=mask, other=0).to(tl.int32)
    hi = tl.load(base + 1, mask=mask, other=0).to(tl.int32)
    w = tl.load(t1_ptr + (lo | (hi << 8)) * 8 + j[None, :], mask=mask, other=0.0)
    if KIND == 1:  # 3 bits: one byte of the 1-bit E8 codebook
        c2 = tl.load(base + 2, mask=mask, other=0).to(tl.int32)
        w += tl.load(t2_ptr + c2 * 8 + j[None, :], mask=mask, other=0.0) / r
    if KIND == 2:  # 4 bits: a second E8P code
        lo2 = tl.load(base + 2, mask=mask, other=0).to(tl.int32)
        hi2 = tl.load(base + 3, mask=mask, other=0).to(tl.int32)
        w += tl.load(t1_ptr + (lo2 | (hi2 << 8)) * 8 + j[None, :], mask=mask, other=0.0) / r
    tl.store(out_ptr + rows[:, None] * (B * 8) + cols[None, :], w, mask=mask)


def decode_weight_triton(qdata: Tensor, bits: int, block_n: int = 16,
                         block_b: int = 16) -> Tensor:
    """Same result as `e8p_ref.decode_weight`: qdata uint8 [N, B·bits] -> fp32 [N, 8·B]."""
    e8p_residual.check_bits(bits)
    N, B = qdata.shape[0], qdata.shape[1] // bits
    out = torch.empty(N, 8 * B, dtype=torch.float32, device=qdata.device)
    t1 = e8p.decode_table(qdata.device)
    t2 = e8p_residual.e8_1bit_points(qdata.device) if bits == 3 else t1
    r = e8p_residual.RESIDUAL_SCALE.get(bits, 1.0)  # divided, as the reference does: bit-exact
    grid = (triton.cdiv(N, block_n), triton.cdiv(B, block_b))
    _e8p_decode_kernel[grid](qdata.contiguous(), t1, t2, out, N, B, r, BITS=bits,
                             KIND=STAGE_KIND[bits], BLOCK_N=block_n, BLOCK_B=block_b)
    return out
