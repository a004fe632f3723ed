"""llama.cpp's block formats, byte for byte: which bytes of a block hold what, and what they
decode to.

Every GGML block type discq writes decodes a group of 16 or 32 weights as w = a·q + b, with q
an unsigned integer code and (a, b) per group, given by the block's *header* (its scales,
minimums and super-block factors) — so each one is an affine grid whose scales are themselves
quantized (DESIGN: "the sub-scales are part of the grid"):

  type   block  group  bits  header                               a            b
  Q4_0     32     32     4   d fp16                               d            -8·d
  Q4_1     32     32     4   d, m fp16                            d            m
  Q5_0     32     32     5   d fp16                               d            -16·d
  Q5_1     32     32     5   d, m fp16                            d            m
  Q8_0     32     32     8   d fp16                               d            -128·d
  Q2_K    256     16     2   16 bytes (sc | m<<4), d, dmin fp16   d·sc         -dmin·m
  Q3_K    256     16     3   12 bytes of 6-bit s, d fp16          d·(s - 32)   -4·a
  Q4_K    256     32     4   d, dmin fp16, 12 bytes (6-bit sc, m) d·sc         -dmin·m
  Q5_K    256     32     5   d, dmin fp16, 12 bytes (6-bit sc, m) d·sc         -dmin·m
  Q6_K    256     16     6   16 int8 sc, d fp16                   d·sc         -32·a
  IQ4_NL   32     32     4   d fp16                               d            0
  IQ4_XS  256     32     4   d fp16, 6-bit ls (2 + 4 bytes)       d·(ls - 32)  0
  IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S: 256 weights in codewords (gguf_codebook.py)

The two 4-bit i-quants are the exception to "a·q": their 16 levels are not evenly spaced but
llama.cpp's fixed non-linear table `IQ4_LEVELS` (denser near 0, where most weights are), so a
weight is a·levels[q] — the same grid machinery with q replaced by its level (`values`).
The codebook i-quants (IQ2_XXS … IQ3_S) store codewords of 4 or 8 weights rather than a code
per weight: `gguf_codebook` holds their layouts and decode, `gguf_codebook_fit` their rounding;
their BlockTypes here record size, scale group and codeword length.

Products of an fp16 factor and small integers are exact in fp32, so a·q + b rounds once,
exactly where llama.cpp's own decode rounds: decoding here equals the `gguf` package's reference
dequantizers bit for bit (tested). Codes are spread over the block's code fields in llama.cpp's
bit order (`Bits`). The layout is written here from the formats' definitions; the tests check it
against the `gguf` package, which is not imported here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Bits:
    """A code field: bits [lo, lo + nbits) of each code, weights arranged as
    [chunks, shifts, lanes] (weight = (chunk·shifts + shift)·lanes + lane) or, with
    `shift_inner`, [chunks, lanes, shifts]; byte (chunk, lane) holds the `shifts` values, the
    s-th at bit s·nbits."""

    name: str
    lo: int
    nbits: int
    chunks: int
    shifts: int
    lanes: int
    shift_inner: bool = False

    @property
    def nbytes(self) -> int:
        return self.chunks * self.lanes


@dataclass(frozen=True)
class BlockType:
    """One GGML block type: `fields` in struct order, (name, bytes); the code fields' bit layout
    in `code_bits`; the others are the header."""

    name: str
    block: int
    group: int
    bits: int
    fields: tuple[tuple[str, int], ...]
    code_bits: tuple[Bits, ...]
    xor: int = 0  # Q8_0 stores int8 q - 128 = code ^ 0x80
    levels: tuple[int, ...] | None = None  # a non-linear grid: code q means levels[q]
    vector: int = 0  # codewords of this many weights (gguf_codebook), not a code per weight

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.fields)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def header_fields(self) -> tuple[tuple[str, int], ...]:
        codes = {b.name for b in self.code_bits}
        return tuple(f for f in self.fields if f[0] not in codes)

    @property
    def header_bytes(self) -> int:
        return sum(n for _, n in self.header_fields)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.block


def _legacy(name, bits, with_min):
    head = (("d", 2), ("m", 2)) if with_min else (("d", 2),)
    low = Bits("qs", 0, 4, 1, 2, 16) if bits < 8 else Bits("qs", 0, 8, 1, 1, 32)
    high = (Bits("qh", 4, 1, 1, 8, 4, shift_inner=True),) if bits == 5 else ()
    fields = head + tuple((b.name, b.nbytes) for b in (*high, low))
    return BlockType(name, 32, 32, bits, fields, (low, *high), xor=0x80 if bits == 8 else 0)


def _kquants() -> list[BlockType]:
    q2 = (Bits("qs", 0, 2, 2, 4, 32),)
    q3 = (Bits("hmask", 2, 1, 1, 8, 32), Bits("qs", 0, 2, 2, 4, 32))
    q4 = (Bits("qs", 0, 4, 4, 2, 32),)
    q5 = (Bits("qh", 4, 1, 1, 8, 32), Bits("qs", 0, 4, 4, 2, 32))
    q6 = (Bits("ql", 0, 4, 2, 2, 64), Bits("qh", 4, 2, 2, 4, 32))
    return [
        BlockType("Q2_K", 256, 16, 2, (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2)), q2),
        BlockType("Q3_K", 256, 16, 3, (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2)), q3),
        BlockType("Q4_K", 256, 32, 4, (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)), q4),
        BlockType("Q5_K", 256, 32, 5, (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32),
                                       ("qs", 128)), q5),
        BlockType("Q6_K", 256, 16, 6, (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)), q6),
    ]


# llama.cpp's kvalues_iq4nl: 16 int8 levels, ascending
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iquants() -> list[BlockType]:
    """IQ4_NL: 32 weights, d fp16, the Q4_0 nibble order. IQ4_XS: 256 weights in 8 groups of
    32, d fp16, each group's 6-bit ls split into a 2-bit field of the uint16 scales_h and a
    nibble of scales_l; group g's 16 code bytes as IQ4_NL's."""
    return [
        BlockType("IQ4_NL", 32, 32, 4, (("d", 2), ("qs", 16)), (Bits("qs", 0, 4, 1, 2, 16),),
                  levels=IQ4_LEVELS),
        BlockType("IQ4_XS", 256, 32, 4, (("d", 2), ("scales_h", 2), ("scales_l", 4),
                                         ("qs", 128)), (Bits("qs", 0, 4, 8, 2, 16),),
                  levels=IQ4_LEVELS),
    ]


def _codebooks() -> list[BlockType]:
    """IQ2_XXS … IQ3_S: codewords of 4 or 8 weights (gguf_codebook.py holds their layouts);
    recorded here by size, group of the 4-bit scale and codeword length."""
    from .gguf_codebook import TYPES as BOOKS
    return [BlockType(c.name, 256, c.group, 2 if c.name.startswith("IQ2") else 3,
                      (("blocks", c.nbytes),), (), vector=c.vec) for c in BOOKS.values()]


TYPES: dict[str, BlockType] = {t.name: t for t in [
    _legacy("Q4_0", 4, False), _legacy("Q4_1", 4, True), _legacy("Q5_0", 5, False),
    _legacy("Q5_1", 5, True), _legacy("Q8_0", 8, False), *_kquants(), *_iquants(),
    *_codebooks()]}
VECTOR_TYPES = tuple(name for name, t in TYPES.items() if t.vector)


def block_type(name: str) -> BlockType:
    if name not in TYPES:
        raise ValueError(f"unknown GGUF block type {name!r}; choose one of {sorted(TYPES)}")
    return TYPES[name]


# ---- code fields ----------------------------------------------------------------------------
def pack_field(q: Tensor, f: Bits) -> Tensor:
    """codes q: [n, block] uint8 -> the field's bytes [n, f.nbytes]."""
    n = q.shape[0]
    v = (q.to(torch.int32) >> f.lo) & (2**f.nbits - 1)
    v = v.view(n, f.chunks, f.lanes, f.shifts) if f.shift_inner else \
        v.view(n, f.chunks, f.shifts, f.lanes).transpose(2, 3)  # [n, chunks, lanes, shifts]
    shift = torch.arange(f.shifts, device=q.device, dtype=torch.int32) * f.nbits
    return (v << shift).sum(-1).to(torch.uint8).reshape(n, f.nbytes)


def unpack_field(raw: Tensor, f: Bits) -> Tensor:
    """The field's bytes [n, f.nbytes] -> its bits of every code, in place: [n, block] int32."""
    n = raw.shape[0]
    shift = torch.arange(f.shifts, device=raw.device, dtype=torch.int32) * f.nbits
    v = (raw.to(torch.int32).view(n, f.chunks, f.lanes, 1) >> shift) & (2**f.nbits - 1)
    v = v if f.shift_inner else v.transpose(2, 3)
    return v.reshape(n, -1) << f.lo


# ---- whole blocks ---------------------------------------------------------------------------
def split(raw: Tensor, t: BlockType) -> dict[str, Tensor]:
    """Block bytes [n, t.nbytes] -> {field name: bytes [n, size]}."""
    out, at = {}, 0
    for name, size in t.fields:
        out[name] = raw[:, at:at + size]
        at += size
    return out


def join(header: Tensor, q: Tensor, t: BlockType) -> Tensor:
    """header [n, t.header_bytes] (its fields in struct order) and codes q [n, block] ->
    block bytes [n, t.nbytes]."""
    parts, at = {}, 0
    for name, size in t.header_fields:
        parts[name] = header[:, at:at + size]
        at += size
    q = q ^ t.xor if t.xor else q
    for f in t.code_bits:
        parts[f.name] = pack_field(q, f)
    return torch.cat([parts[name] for name, _ in t.fields], dim=1)


def codes(raw: Tensor, t: BlockType) -> Tensor:
    """Block bytes [n, t.nbytes] -> codes [n, block] uint8."""
    if t.vector:
        raise ValueError(f"{t.name} stores codewords of {t.vector} weights, not a code per "
                         f"weight")
    fields = split(raw, t)
    q = sum(unpack_field(fields[f.name], f) for f in t.code_bits)
    return (q ^ t.xor if t.xor else q).to(torch.uint8)


def header(raw: Tensor, t: BlockType) -> Tensor:
    fields = split(raw, t)
    return torch.cat([fields[name] for name, _ in t.header_fields], dim=1)


def fp16(raw: Tensor) -> Tensor:
    """2 bytes per row [n, 2] -> fp32 [n, 1] (the little-endian fp16 they hold)."""
    return raw.contiguous().view(torch.float16).float()


def to_fp16_bytes(x: Tensor) -> Tensor:
    """fp16 values [n] -> their bytes [n, 2]."""
    return x.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def six_bit_pairs(raw: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K's 12 scale bytes [n, 12] -> (sc, m) [n, 8] each, 6 bits: j < 4 in the low 6
    bits of bytes j (sc) and j + 4 (m); j >= 4 in the nibbles of byte j + 4 with their top two
    bits in the top bits of bytes j - 4 and j."""
    r = raw.to(torch.int32)
    d, m, md = r[:, 0:4], r[:, 4:8], r[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc, mn


def pack_six_bit_pairs(sc: Tensor, mn: Tensor) -> Tensor:
    """Inverse of `six_bit_pairs`: sc, m [n, 8] in [0, 63] -> [n, 12] uint8."""
    sc, mn = sc.to(torch.int32), mn.to(torch.int32)
    d = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    m = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return torch.cat([d, m, md], dim=1).to(torch.uint8)


def q3_scales(raw: Tensor) -> Tensor:
    """Q3_K's 12 scale bytes [n, 12] -> s [n, 16] in [0, 63]: low nibbles in bytes 0..7 (s < 8
    low nibble of byte s, else high nibble of byte s - 8), top two bits in bytes 8..11 (s's at
    bit 2·(s // 4) of byte 8 + s % 4)."""
    r = raw.to(torch.int32)
    low = torch.cat([r[:, :8] & 15, r[:, :8] >> 4], dim=1)
    shift = torch.arange(4, device=raw.device, dtype=torch.int32).repeat_interleave(4) * 2
    high = (r[:, 8:12].repeat(1, 4) >> shift) & 3
    return low | (high << 4)


def pack_q3_scales(s: Tensor) -> Tensor:
    """Inverse of `q3_scales`: s [n, 16] in [0, 63] -> [n, 12] uint8."""
    s = s.to(torch.int32)
    low = (s[:, :8] & 15) | ((s[:, 8:] & 15) << 4)
    top = (s >> 4).view(-1, 4, 4)  # [n, s // 4, s % 4]
    high = sum(top[:, k] << (2 * k) for k in range(4))
    return torch.cat([low, high], dim=1).to(torch.uint8)


def iq4_scales(raw: Tensor) -> Tensor:
    """IQ4_XS's scales_h (2 bytes, a little-endian uint16) and scales_l (4 bytes) [n, 6] ->
    ls [n, 8] in [0, 63]: group g's low nibble is nibble g % 2 of scales_l byte g // 2, its top
    two bits bits 2g, 2g + 1 of scales_h."""
    r = raw.to(torch.int32)
    h = r[:, 0] | (r[:, 1] << 8)  # [n]
    low = torch.stack([r[:, 2:6] & 15, r[:, 2:6] >> 4], dim=2).reshape(-1, 8)
    shift = torch.arange(8, device=raw.device, dtype=torch.int32) * 2
    return low | (((h[:, None] >> shift) & 3) << 4)


def pack_iq4_scales(ls: Tensor) -> Tensor:
    """Inverse of `iq4_scales`: ls [n, 8] in [0, 63] -> [n, 6] uint8."""
    ls = ls.to(torch.int32)
    shift = torch.arange(8, device=ls.device, dtype=torch.int32) * 2
    h = ((ls >> 4) << shift).sum(-1)  # [n]: the 2-bit fields do not overlap
    low = (ls[:, 0::2] & 15) | ((ls[:, 1::2] & 15) << 4)
    return torch.cat([torch.stack([h & 255, h >> 8], dim=1), low], dim=1).to(torch.uint8)


def values(q: Tensor, t: BlockType) -> Tensor:
    """Codes -> the grid values they stand for, fp32: q itself, or a non-linear type's level."""
    if t.levels is None:
        return q.float()
    return torch.tensor(t.levels, dtype=torch.float32, device=q.device)[q.long()]


def affine(head: Tensor, t: BlockType) -> tuple[Tensor, Tensor]:
    """header [n, t.header_bytes] -> (a, b) [n, block / group] fp32: w = a·values(q) + b."""
    f, at = {}, 0
    for name, size in t.header_fields:
        f[name] = head[:, at:at + size]
        at += size
    d = fp16(f["d"])
    if t.levels is not None:
        a = d if t.block == 32 else d * (iq4_scales(torch.cat([f["scales_h"], f["scales_l"]],
                                                              dim=1)) - 32)
        return a, torch.zeros_like(a)
    if t.block == 32:
        b = fp16(f["m"]) if "m" in f else -(2 ** (t.bits - 1)) * d
        return d, b
    if t.name == "Q2_K":
        sc, mn = f["scales"].to(torch.int32) & 15, f["scales"].to(torch.int32) >> 4
        return d * sc, -(fp16(f["dmin"]) * mn)
    if t.name == "Q3_K":
        a = d * (q3_scales(f["scales"]) - 32)
        return a, -4 * a
    if t.name == "Q6_K":
        a = d * f["scales"].contiguous().view(torch.int8).float()
        return a, -32 * a
    sc, mn = six_bit_pairs(f["scales"])  # Q4_K, Q5_K
    return d * sc, -(fp16(f["dmin"]) * mn)


def dequantize(raw: Tensor, t: BlockType) -> Tensor:
    """Block bytes [n, t.nbytes] -> weights [n, block] fp32, as llama.cpp decodes them."""
    if t.vector:
        from . import gguf_codebook
        return gguf_codebook.dequantize(raw, gguf_codebook.TYPES[t.name])
    a, b = affine(header(raw, t), t)  # [n, G]
    q = values(codes(raw, t), t).view(raw.shape[0], -1, t.group)
    return (a.unsqueeze(-1) * q + b.unsqueeze(-1)).view(raw.shape[0], t.block)
