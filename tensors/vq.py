"""Vector-codebook weights (GPTVQ, van Baalen et al., 2024): the layout and its reference decode.

W: [N, K] is cut into codebook groups, rectangles of R_g rows × C_g columns that tile it. Within
a row, every `dim` consecutive weights form a vector coded by one index into its group's
codebook of E = 2^(bits·dim) points of dimension `dim`:
  Ŵ[n, v·dim : (v+1)·dim] = f[n, block] · scale[g] · C[g, idx[n, v]]
  idx      bits·dim bits each, packed along the row (`packing.py`, 2 to 8 bits)
  C        int8 [G_r, G_c, E, dim]  symmetric, one fp16 `scale` per codebook
  f        optional 4-bit log-domain block scales 2^(−e/2), e ∈ [0, 15], one per row and
           `scale_block` columns (GPTVQ's blockwise normalization), packed two a byte as one
           sequence over the rows
Bits per weight = bits + (8·E·dim + 16) / (R_g·C_g) [+ 4 / scale_block]: everything stored.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .packing import pack_codes, packed_width, unpack_codes

BITS = (2, 3, 4)
DIMS = (1, 2, 4)
MAX_INDEX_BITS = 8   # one byte an index at most: codebooks of up to 256 points
MAX_GROUP_COLS = 256  # GPTVQ's column span of a codebook
SCALE_BITS = 4        # block scales: exponents e in [0, 15], factor 2^(−e/2)
TARGET_OVERHEAD = 0.125  # the default group size spends this many bits a weight on codebooks
# Configs refuse codebooks that cost more than this share of the index bits (a codebook as large
# as the weights it codes is a lookup table, not compression).
MAX_OVERHEAD_SHARE = 0.25


def check_bits_dim(bits: int, dim: int) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS} bits per weight, got {bits!r}")
    if isinstance(dim, bool) or dim not in DIMS:
        raise ValueError(f"dim must be one of {DIMS} (weights per codebook vector), got {dim!r}")
    if bits * dim > MAX_INDEX_BITS:
        raise ValueError(f"bits={bits} with dim={dim} needs codebooks of 2^{bits * dim} points; "
                         f"at most 2^{MAX_INDEX_BITS} (bits·dim <= {MAX_INDEX_BITS}): lower dim")


def entries(bits: int, dim: int) -> int:
    """Codebook size E = 2^(bits·dim)."""
    return 1 << (bits * dim)


def default_group_size(bits: int, dim: int) -> int:
    """Weights per codebook at which the int8 codebook costs TARGET_OVERHEAD bits a weight
    (GPTVQ's 2.125-bit settings: 256 at d = 1, 2048 at d = 2, 65536 at d = 4 for 2 bits)."""
    return round(8 * entries(bits, dim) * dim / TARGET_OVERHEAD)


def overhead_bits(bits: int, dim: int, group_size: int, scale_block: int | None = None) -> float:
    """Bits a weight spent beside the indices: codebook entries and scale, block scales."""
    extra = (8 * entries(bits, dim) * dim + 16) / group_size
    return extra + (SCALE_BITS / scale_block if scale_block else 0.0)


def check_overhead(bits: int, dim: int, group_size: int | None, scale_block: int | None = None,
                   field: str = "group_size") -> None:
    """Refuse a group size whose codebooks and scales cost over MAX_OVERHEAD_SHARE of `bits`."""
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"{field} must be a positive integer or None, got {group_size!r}")
    need = default_group_size(bits, dim)
    extra = overhead_bits(bits, dim, group_size or need, scale_block)
    if extra > MAX_OVERHEAD_SHARE * bits:
        raise ValueError(f"{field}={group_size}: codebooks and scales would cost {extra:.3f} bits "
                         f"a weight beside the {bits}-bit indices, more than "
                         f"{MAX_OVERHEAD_SHARE:.0%} of them; use {field} >= {need} (or None: "
                         f"{need}, 0.125 bits) or a smaller dim")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def group_shape(N: int, K: int, dim: int, group_size: int, multiple: int = 1
                ) -> tuple[int, int]:
    """(R_g, C_g): the rectangle tiling [N, K] whose area is nearest `group_size` (in ratio),
    columns a multiple of `dim` (and of `multiple`: block scales) and at most MAX_GROUP_COLS
    (ties: the wider). A layer smaller than a group is one group."""
    step = math.lcm(dim, multiple)
    cols = [c for c in _divisors(K) if c % step == 0 and c <= max(MAX_GROUP_COLS, step)]
    if not cols:
        raise ValueError(f"in_features={K} is not a multiple of dim={dim}; leave this layer out "
                         f"with filter_fn or use dim=1")
    best = min(((r, c) for c in cols for r in _divisors(N)),
               key=lambda rc: (abs(math.log(rc[0] * rc[1] / group_size)), -rc[1]))
    return best


def check_shape(N: int, K: int, dim: int, scale_block: int | None = None) -> None:
    if K % dim:
        raise ValueError(f"in_features={K} is not a multiple of dim={dim}; leave this layer out "
                         f"with filter_fn or use dim=1")
    if scale_block and (K % scale_block or scale_block % dim):
        raise ValueError(f"scale_block={scale_block} must divide in_features={K} and be a "
                         f"multiple of dim={dim}")


# ---- int8 codebooks -------------------------------------------------------------------------

def int8_codebook(C: Tensor) -> tuple[Tensor, Tensor]:
    """C: [..., E, d] float -> (int8 [..., E, d], fp16 scale [...]): symmetric, max |C| ↦ 127."""
    amax = C.abs().amax((-2, -1)).float()
    scale = (amax / 127).clamp(min=1e-8).half()  # rounded first: the codes are made against it
    q = torch.round(C.float() / scale.float()[..., None, None]).clamp(-127, 127)
    return q.to(torch.int8), scale


def codebook_values(codebook: Tensor, scale: Tensor) -> Tensor:
    """The float codebooks [..., E, d] the int8 ones stand for."""
    return codebook.float() * scale.float()[..., None, None]


# ---- indices and block scales ---------------------------------------------------------------

def pack_indices(idx: Tensor, bits: int, dim: int) -> Tensor:
    """idx: [N, K/d] -> uint8 [N, packed_width(K/d, bits·dim)]."""
    return pack_codes(idx, bits * dim)


def unpack_indices(qdata: Tensor, bits: int, dim: int, K: int) -> Tensor:
    """Inverse of `pack_indices`: [N, K/d] int64."""
    return unpack_codes(qdata, bits * dim, K // dim).long()


def index_width(K: int, bits: int, dim: int) -> int:
    return packed_width(K // dim, bits * dim)


def block_exponents(Wabs_max: Tensor) -> Tensor:
    """Per-block maxima m: [..., B] relative to their group's largest -> e = round(−2 log2(m /
    max m)) in [0, 15] (a factor 2^(−e/2): 7.5 octaves in half-octave steps)."""
    ref = Wabs_max.amax(-1, keepdim=True).clamp(min=1e-12)
    e = torch.round(-2 * torch.log2((Wabs_max / ref).clamp(min=2**-8)))
    return e.clamp(0, 2**SCALE_BITS - 1).to(torch.uint8)


SQRT_HALF = 0.70710677  # float32(√½); every kernel forms 2^(−e/2) the same way, bit for bit


def block_factors(e: Tensor) -> Tensor:
    """2^(−e/2) for exponents e (any shape): 2^(−⌊e/2⌋), times √½ for odd e."""
    e = e.to(torch.int32)
    half = torch.where(e % 2 == 1, SQRT_HALF, 1.0)
    return torch.exp2(-(e // 2).float()) * half


def pack_block_scales(e: Tensor) -> Tensor:
    """e: [N, B] uint8 -> [1, packed_width(N·B, 4)]: packed as one sequence, row after row
    (exponent i of the sequence in byte i/2, low nibble first), so no row pads a run."""
    return pack_codes(e.reshape(1, -1), SCALE_BITS)


def block_scale_width(N: int, K: int, scale_block: int) -> int:
    return packed_width(N * (K // scale_block), SCALE_BITS)


def unpack_block_scales(packed: Tensor, N: int, K: int, scale_block: int) -> Tensor:
    """Inverse of `pack_block_scales`: [N, K/scale_block] uint8."""
    return unpack_codes(packed, SCALE_BITS, N * (K // scale_block)).view(N, K // scale_block)


def group_of_vectors(N: int, K: int, dim: int, R_g: int, C_g: int, device=None
                     ) -> tuple[Tensor, Tensor]:
    """Row-group index of each row [N, 1] and column-group index of each vector [1, K/d]."""
    r = torch.arange(N, device=device) // R_g
    c = torch.arange(0, K, dim, device=device) // C_g
    return r[:, None], c[None, :]


def lookup(idx: Tensor, values: Tensor) -> Tensor:
    """Each vector's codeword: indices [N, V] into float codebooks [G_r, G_c, E, d] ->
    [N, V·d] (before block scales)."""
    N, V = idx.shape
    GR, GC, _, d = values.shape
    r, c = group_of_vectors(N, V * d, d, N // GR, V * d // GC, idx.device)
    return values[r, c, idx.long()].reshape(N, V * d)


def decode_weight(qdata: Tensor, codebook: Tensor, scale: Tensor, block_scale: Tensor | None,
                  bits: int, dim: int, K: int, scale_block: int = 0) -> Tensor:
    """The reference decode: Ŵ [N, K] fp32."""
    N = qdata.shape[0]
    W = lookup(unpack_indices(qdata, bits, dim, K), codebook_values(codebook, scale))
    if block_scale is not None:
        f = block_factors(unpack_block_scales(block_scale, N, K, scale_block))  # [N, K/sb]
        W = (W.view(N, K // scale_block, scale_block) * f[..., None]).view(N, K)
    return W
