"""Triton decode of trellis-coded weights (QTIP; layout and codes in `tensors/trellis.py`) on CUDA.

Each program decodes BLOCK_T whole 16×16 tiles: for each of a tile's 256 weights it reads the
two 32-bit words holding the L-bit window that ends at its step, extracts the state and computes
the code's value (1MAD, 3INST: integer arithmetic and a bit cast; HYB: one gather from the
512×2 table). The weight costs `bits` bits of memory traffic; the matmul that follows is
cuBLAS's. Tested on CPU with TRITON_INTERPRET=1 against `trellis.decode_weight`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import trellis

CODE_IDS = {"1mad": 0, "3inst": 1, "hyb": 2}


@triton.jit
def _fp16_bits(h):
    return h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _trellis_decode_kernel(q_ptr, lut_ptr, out_ptr, n_tiles, KT, K,
                           BITS: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
                           Q: tl.constexpr, CODE: tl.constexpr, BLOCK_T: tl.constexpr):
    tile = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    pos = tl.arange(0, 256)  # a weight's place in its tile, row-major
    mask = (tile < n_tiles)[:, None] & (pos < 256)[None, :]
    W: tl.constexpr = 8 * BITS  # words a tile
    NB: tl.constexpr = 256 * BITS  # bits a tile
    step = pos // V
    start = ((step + 1) * (BITS * V) - L + NB) % NB  # first bit of the state's window
    base = q_ptr + tile[:, None] * W
    w0 = tl.load(base + (start // 32)[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    w1 = tl.load(base + ((start // 32 + 1) % W)[None, :], mask=mask, other=0)
    pair = (w0.to(tl.uint64) << 32) | w1.to(tl.uint32, bitcast=True).to(tl.uint64)
    s = ((pair >> (64 - L - start % 32)[None, :].to(tl.uint64)) & ((1 << L) - 1)).to(tl.uint32)
    if CODE == 0:  # 1MAD: the bytes of an affine hash, summed
        x = s * 34038481 + 76625530
        total = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + (x >> 24)
        val = (total.to(tl.int32) - 510).to(tl.float32) / 147.8
    elif CODE == 1:  # 3INST: two fp16 halves of a masked hash, added
        x = ((s * 89226354 + 64248484) & 0x8FFF8FFF) ^ 0x3B603B60
        val = _fp16_bits(x & 0xFFFF) + _fp16_bits(x >> 16)
    else:  # HYB: a table row, the first coordinate's sign from bit 15 of s(s + 1)
        h = s * (s + 1)
        row = (h >> (15 - Q)) & ((1 << Q) - 1)
        coord = (pos % 2)[None, :]
        val = tl.load(lut_ptr + row * 2 + coord, mask=mask, other=0.0).to(tl.float32)
        flip = (((h >> 15) & 1) == 1) & (coord == 0)
        val = tl.where(flip, -val, val)
    r = (tile // KT)[:, None] * 16 + (pos // 16)[None, :]  # the weight's row and column
    c = (tile % KT)[:, None] * 16 + (pos % 16)[None, :]
    tl.store(out_ptr + r * K + c, val, mask=mask)


def decode_weight_triton(qdata: Tensor, bits: int, code: str, lut: Tensor | None = None,
                         state_bits: int = trellis.L, block_t: int = 4) -> Tensor:
    """Same result as `trellis.decode_weight`: qdata int32 [N/16, K/16, 8·bits] -> fp32 [N, K]."""
    trellis.check_code(code, bits, state_bits)
    lut = trellis.table_of(code, lut)  # HYB without its own table: the default one
    NT, KT = qdata.shape[:2]
    out = torch.empty(NT * 16, KT * 16, dtype=torch.float32, device=qdata.device)
    table = lut.to(out).contiguous() if lut is not None else out  # unread unless HYB
    Q = lut.shape[0].bit_length() - 1 if lut is not None else 0
    grid = (triton.cdiv(NT * KT, block_t),)
    _trellis_decode_kernel[grid](qdata.contiguous(), table, out, NT * KT, KT, KT * 16, BITS=bits,
                                 V=trellis.CODES[code], L=state_bits, Q=Q,
                                 CODE=CODE_IDS[code], BLOCK_T=block_t)
    return out
