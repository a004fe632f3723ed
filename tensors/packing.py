"""Bit packing of integer codes: a b-bit code costs exactly b bits.

Layout: along the last dimension, every run of 8 codes c0..c7 becomes the 8·b-bit little-endian
integer Σ c_i << (b·i), stored as b bytes. 8 codes per run because 8·b bits is a whole number of
bytes for every b. The last run is padded with zero codes (at most 7 codes of padding per row).
8-bit codes are stored as they are. Any width from 1 to 8 bits packs (affine grids use 2, 3, 4
and 8; vector-codebook indices of bits·dim bits use 2 to 8).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

RUN = 8  # codes per packed run


def packed_width(C: int, bits: int) -> int:
    """Bytes per row for C codes of `bits` bits."""
    return C if bits == 8 else math.ceil(C / RUN) * bits


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """codes: [R, C] integers in [0, 2^bits) -> packed: [R, packed_width(C, bits)] uint8."""
    if bits == 8:
        return codes.to(torch.uint8)
    R, C = codes.shape
    n = math.ceil(C / RUN)
    c = torch.zeros(R, n * RUN, dtype=torch.int64, device=codes.device)
    c[:, :C] = codes.to(torch.int64)
    shifts = bits * torch.arange(RUN, device=codes.device)
    word = (c.view(R, n, RUN) << shifts).sum(-1)  # [R, n], 8·bits significant bits
    byte_shifts = 8 * torch.arange(bits, device=codes.device)
    return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(R, n * bits)


def unpack_codes(packed: Tensor, bits: int, C: int) -> Tensor:
    """packed: [R, packed_width(C, bits)] uint8 -> codes: [R, C] uint8."""
    if bits == 8:
        return packed
    R = packed.shape[0]
    if 8 % bits == 0:  # 2 and 4 bits: whole codes per byte, little-endian within the byte
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [R, bytes, 8 // bits]
        return codes.reshape(R, -1)[:, :C]
    n = packed.shape[1] // bits  # 3, 5, 6, 7 bits: one 8·bits-bit word per run of 8 codes
    wide = torch.int32 if 8 * bits < 32 else torch.int64  # 24 bits fit int32; 40-56 do not
    byte_shifts = 8 * torch.arange(bits, dtype=wide, device=packed.device)
    word = (packed.view(R, n, bits).to(wide) << byte_shifts).sum(-1, dtype=wide)
    shifts = bits * torch.arange(RUN, dtype=wide, device=packed.device)
    codes = (word.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [R, n, RUN]
    return codes.reshape(R, n * RUN)[:, :C].to(torch.uint8)
