"""llama.cpp's codebook i-quants: IQ2_XXS, IQ2_XS, IQ2_S (2.06–2.56 bits per weight), IQ3_XXS
and IQ3_S (3.06 and 3.44): weights in codewords of a fixed grid, with signs and small scales.

Every type stores a block of 256 weights as
  - d, fp16;
  - a codeword index per vector of `vec` weights (8 for IQ2, 4 for IQ3) into llama.cpp's grid
    (`grid`: entries positive, e.g. {8, 25, 43} for IQ2);
  - a sign byte per 8 weights (bit k: weight k negative), stored whole (IQ2_S, IQ3_S) or as a
    7-bit index whose 8th bit is the parity of the other seven (`parity`: an even number of
    negatives per 8 weights; llama.cpp's ksigns table, computed here);
  - a 4-bit ls per `group` weights; the group's scale a = d·(0.5 + ls)·¼ (IQ2), d·(0.5 + ls)·½
    (IQ3_XXS) or d·(1 + 2·ls) (IQ3_S);
and decodes weight k of a vector as a·grid[index][k]·sign. Every product is exact in fp32, so
decoding here equals the `gguf` package's reference bit for bit (tested); the grids are read
from the `gguf` package, whose reference dequantizers carry them.

`Fields` is the canonical form (d bytes, ls, codeword indices, sign bytes); `split`/`join` map
it from/to each type's byte layout. Rounding (`nearest`): each 8 weights take their own signs
— with parity, when their count of negatives is odd, the smallest weight's sign flipped, as
llama.cpp's quantizer does — and each vector the codeword nearest |x| (the flipped weight
targets −|x|). `fit_header` chooses d and the ls; BlockLDLQ (passes/gptq_core.py) rounds with
error feedback onto the same codebook, 8 columns at a time.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK, SIGNS = 256, 8  # weights per block, per sign byte


@dataclass(frozen=True)
class Codebook:
    name: str
    vec: int        # weights per codeword
    entries: int    # codewords in the grid
    group: int      # weights per 4-bit ls
    parity: bool    # signs stored as 7 bits + parity
    scale: str      # "quarter" d(0.5+ls)/4, "half" d(0.5+ls)/2, "odd" d(1+2ls)
    nbytes: int

    @property
    def top(self) -> float:
        """The largest scale factor f(15) of a block (a = d·f(ls))."""
        return float(factor(torch.tensor(15.0), self))


TYPES = {c.name: c for c in [
    Codebook("IQ2_XXS", 8, 256, 32, True, "quarter", 66),
    Codebook("IQ2_XS", 8, 512, 16, True, "quarter", 74),
    Codebook("IQ2_S", 8, 1024, 16, False, "quarter", 82),
    Codebook("IQ3_XXS", 4, 256, 32, True, "half", 98),
    Codebook("IQ3_S", 4, 512, 32, False, "odd", 110),
]}


@functools.cache
def _grid_rows(name: str) -> tuple[tuple[float, ...], ...]:
    from gguf import quants
    q = getattr(quants, name)
    q.init_grid()
    return tuple(map(tuple, q.grid.reshape(q.grid_shape).tolist()))


def grid(c: Codebook, device=None) -> Tensor:
    """llama.cpp's grid of `c`: [entries, vec] fp32. Made per call from a cached tuple: a
    cached tensor would be a real tensor inside torch.compile's fake tracing."""
    return torch.tensor(_grid_rows(c.name), dtype=torch.float32, device=device)


def factor(ls: Tensor, c: Codebook) -> Tensor:
    """ls -> a / d."""
    ls = ls.float()
    if c.scale == "odd":
        return 1 + 2 * ls
    return (0.5 + ls) * (0.25 if c.scale == "quarter" else 0.5)


@dataclass
class Fields:
    d: Tensor     # [n, 2] uint8: the fp16 bytes
    ls: Tensor    # [n, 256 / group] int32 in [0, 15]
    idx: Tensor   # [n, 256 / vec] int32
    sign: Tensor  # [n, 32] int32: sign byte of each 8 weights (parity types: bit 7 = parity)


def _bytes_of(x: Tensor, width: int) -> Tensor:
    """int32 [n, m] -> little-endian bytes [n, m·width] uint8."""
    x = x.to(torch.int64)
    return torch.stack([(x >> (8 * i)) & 255 for i in range(width)], dim=2).reshape(
        x.shape[0], -1).to(torch.uint8)


def _ints_of(b: Tensor, width: int) -> Tensor:
    """bytes [n, m·width] -> little-endian ints [n, m] int64."""
    b = b.to(torch.int64).view(b.shape[0], -1, width)
    return sum(b[..., i] << (8 * i) for i in range(width))


def _nibbles(b: Tensor) -> Tensor:
    b = b.to(torch.int32)
    return torch.stack([b & 15, b >> 4], dim=2).reshape(b.shape[0], -1)


def _pack_nibbles(x: Tensor) -> Tensor:
    return (x[:, 0::2] | (x[:, 1::2] << 4)).to(torch.uint8)


def _bits(b: Tensor, nbits: int, per: int) -> Tensor:
    """bytes [n, m] -> the `per` fields of `nbits` bits in each byte [n, m·per] (low first)."""
    b = b.to(torch.int32)
    shift = torch.arange(per, device=b.device, dtype=torch.int32) * nbits
    return ((b[..., None] >> shift) & (2**nbits - 1)).reshape(b.shape[0], -1)


def _pack_bits(x: Tensor, nbits: int, per: int) -> Tensor:
    shift = torch.arange(per, device=x.device, dtype=torch.int32) * nbits
    return (x.to(torch.int32).view(x.shape[0], -1, per) << shift).sum(-1).to(torch.uint8)


def parity_sign(idx7: Tensor) -> Tensor:
    """7-bit sign indices -> sign bytes with bit 7 the parity of bits 0–6 (ksigns)."""
    bits = _bits(idx7.reshape(-1, 1), 1, 8)[:, :7]
    return (idx7.reshape(-1) | ((bits.sum(-1) % 2) << 7)).view(idx7.shape)


def split(raw: Tensor, c: Codebook) -> Fields:
    """Block bytes [n, c.nbytes] -> the canonical fields."""
    n, d = raw.shape[0], raw[:, :2]
    if c.name in ("IQ2_XXS", "IQ3_XXS"):
        nidx = BLOCK // c.vec
        if c.name == "IQ2_XXS":  # per 32 weights: 4 index bytes, then a uint32
            per = raw[:, 2:].view(n, 8, 8)
            idx, aux = per[:, :, :4].reshape(n, -1), _ints_of(per[:, :, 4:].reshape(n, -1), 4)
        else:  # 64 index bytes, then 8 uint32
            idx, aux = raw[:, 2:2 + nidx], _ints_of(raw[:, 2 + nidx:], 4)
        shift = torch.arange(4, device=raw.device) * 7
        sign7 = ((aux[..., None] >> shift) & 127).reshape(n, -1)
        return Fields(d, (aux >> 28).to(torch.int32), idx.to(torch.int32),
                      parity_sign(sign7.to(torch.int32)))
    if c.name == "IQ2_XS":
        qs = _ints_of(raw[:, 2:66], 2)
        return Fields(d, _nibbles(raw[:, 66:74]), (qs & 511).to(torch.int32),
                      parity_sign((qs >> 9).to(torch.int32)))
    if c.name == "IQ2_S":
        high = _bits(raw[:, 66:74], 2, 4)
        return Fields(d, _nibbles(raw[:, 74:82]), raw[:, 2:34].to(torch.int32) | (high << 8),
                      raw[:, 34:66].to(torch.int32))
    high = _bits(raw[:, 66:74], 1, 8)  # IQ3_S
    return Fields(d, _nibbles(raw[:, 106:110]), raw[:, 2:66].to(torch.int32) | (high << 8),
                  raw[:, 74:106].to(torch.int32))


def join(f: Fields, c: Codebook) -> Tensor:
    """The canonical fields -> block bytes [n, c.nbytes] (parity types drop bit 7)."""
    n = f.d.shape[0]
    if c.parity:
        s7 = (f.sign & 127).to(torch.int64)
    if c.name in ("IQ2_XXS", "IQ3_XXS"):
        shift = torch.arange(4, device=f.d.device) * 7
        aux = (s7.view(n, -1, 4) << shift).sum(-1) | (f.ls.to(torch.int64) << 28)  # [n, 8]
        idx = f.idx.to(torch.uint8)
        if c.name == "IQ2_XXS":
            per = torch.cat([idx.view(n, 8, 4), _bytes_of(aux, 4).view(n, 8, 4)], dim=2)
            return torch.cat([f.d, per.reshape(n, -1)], dim=1)
        return torch.cat([f.d, idx, _bytes_of(aux, 4)], dim=1)
    if c.name == "IQ2_XS":
        qs = f.idx.to(torch.int64) | (s7 << 9)
        return torch.cat([f.d, _bytes_of(qs, 2), _pack_nibbles(f.ls)], dim=1)
    low = (f.idx & 255).to(torch.uint8)
    if c.name == "IQ2_S":
        return torch.cat([f.d, low, f.sign.to(torch.uint8), _pack_bits(f.idx >> 8, 2, 4),
                          _pack_nibbles(f.ls)], dim=1)
    return torch.cat([f.d, low, _pack_bits(f.idx >> 8, 1, 8), f.sign.to(torch.uint8),
                      _pack_nibbles(f.ls)], dim=1)


def pack_codes(idx: Tensor, sign: Tensor) -> Tensor:
    """One int64 code per 8 weights, how rounding passes them around: the sign byte in bits
    0–7, codeword j's index (10 bits: the largest grid has 1024 entries) at 8 + 10j.
    idx [m, 8 / vec], sign [m] -> [m]."""
    code = sign.long()
    for j in range(idx.shape[1]):
        code = code | (idx[:, j].long() << (8 + 10 * j))
    return code


def unpack_codes(codes: Tensor, c: Codebook) -> tuple[Tensor, Tensor]:
    """codes [n, 32] (per block) -> (indices [n, 256 / vec], sign bytes [n, 32]) int32."""
    codes = codes.long()
    idx = torch.stack([(codes >> (8 + 10 * j)) & 1023 for j in range(SIGNS // c.vec)], dim=2)
    return idx.reshape(codes.shape[0], -1).int(), (codes & 255).int()


def scales(f: Fields, c: Codebook) -> Tensor:
    """a [n, 256 / group] fp32."""
    from .gguf_layout import fp16  # gguf_layout's table imports this module
    return fp16(f.d) * factor(f.ls, c)


def signed_vectors(idx: Tensor, sign: Tensor, c: Codebook) -> Tensor:
    """Codeword indices [n, 256 / vec] and sign bytes [n, 32] -> grid·sign [n, 256]."""
    n = idx.shape[0]
    g = grid(c, idx.device)[idx.long()].reshape(n, -1)  # [n, 256]
    s = 1.0 - 2.0 * _bits(sign, 1, 8).float()
    return g * s


def dequantize(raw: Tensor, c: Codebook) -> Tensor:
    """Block bytes [n, c.nbytes] -> weights [n, 256] fp32, as llama.cpp decodes them."""
    f = split(raw, c)
    return scales(f, c).repeat_interleave(c.group, dim=1) * signed_vectors(f.idx, f.sign, c)
