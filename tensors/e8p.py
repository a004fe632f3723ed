"""E8P: QuIP#'s 2-bit lattice codebook, 8 weights in one 16-bit code.

The points are x ± ¼·1 for x in a subset of D̂8 = {x ∈ (ℤ + ½)^8 : Σx even} (a coset of E8's
sublattice D8 that E8 contains, so the codebook is a piece of E8 + ¼). A point is stored as
  bits 0–7   which of 256 absolute-value patterns |x| (table `abs_patterns`),
  bits 8–14  the signs of coordinates 0–6 (1 = negative),
  bit 15     the shift: 0 → +¼, 1 → −¼.
The sign of coordinate 7 is not stored: every entry of |x| is an odd multiple of ½, so flipping
one sign changes Σx by an odd integer, and exactly one choice of the last sign makes Σx even.
Writing p(a) = Σ|x| mod 2, the point is in D̂8 iff the number of negative signs ≡ p(a) (mod 2).

The 256 patterns: the 227 distinct |x| of D̂8 points with ‖x‖² ≤ 10, and 29 of norm² 12. The
norm-12 patterns are of two kinds: five 3/2 and three ½ (56 patterns, the kind QuIP# draws
from), or one 5/2, two 3/2 and five ½ (168). Coordinate permutations leave the 227-pattern core
unchanged and map the 56 onto one another, and after incoherence processing the coordinates of
a weight block are exchangeable, so what matters is only that the 29 treat the coordinates
evenly: we add them greedily, each time the lexicographically first triple of ½-positions that
keeps the per-coordinate counts of ½ most even (every coordinate ends with 10 or 11). Mean
squared error per coordinate on 400k i.i.d. N(0, 1) blocks: this choice 0.09177; the first 29
in plain lexicographic order (coordinate 0 gets 21 halves) 0.09185; random 29-subsets of the 56
0.09177–0.09179; random 29 of the 5/2 kind 0.09180–0.09185.

The order of `abs_patterns` is part of the stored format: changing it changes every code.

Tables are built on first use and cached (`functools.cache`), never at import, never in forward.
"""
from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor

from .kernels import lattice_cpu

SHIFT = 0.25       # the ±¼ offset chosen by bit 15
N_CORE = 227       # patterns of norm² ≤ 10
N_EXTRA = 29       # patterns of norm² 12
CHUNK = 4096       # vectors per step of the nearest-point search (bounds its memory)


def _core_patterns() -> list[tuple[int, ...]]:
    """2|x| for the 227 patterns of norm² ≤ 10: odd entries 1, 3, 5 with Σ(2x_i)² ≤ 40,
    sorted by norm, then lexicographically."""
    pats = [p for p in itertools.product((1, 3, 5), repeat=8) if sum(v * v for v in p) <= 40]
    return sorted(pats, key=lambda p: (sum(v * v for v in p), p))


def _extra_patterns() -> list[tuple[int, ...]]:
    """2|x| for the 29 norm² 12 patterns: five 3/2 and three ½, the triples of ½-positions
    added greedily to keep the per-coordinate counts of ½ even (see the module docstring)."""
    triples = list(itertools.combinations(range(8), 3))
    counts, chosen = [0] * 8, []

    def unevenness(t: tuple[int, ...]) -> tuple:
        c = [n + (i in t) for i, n in enumerate(counts)]
        return max(c), sorted(c, reverse=True)

    while len(chosen) < N_EXTRA:
        best = min((t for t in triples if t not in chosen), key=unevenness)  # first on ties
        chosen.append(best)
        for i in best:
            counts[i] += 1
    return [tuple(1 if i in t else 3 for i in range(8)) for t in chosen]


@functools.cache
def _abs_patterns_cpu() -> Tensor:
    pats = _core_patterns() + _extra_patterns()
    return torch.tensor(pats, dtype=torch.float32) / 2  # [256, 8]


@functools.cache
def abs_patterns(device: torch.device | str = "cpu") -> Tensor:
    """The 256 absolute-value patterns: [256, 8] float32, entries in {½, 3/2, 5/2}."""
    return _abs_patterns_cpu().to(device)


@functools.cache
def pattern_parity(device: torch.device | str = "cpu") -> Tensor:
    """p(a) = Σ|x| mod 2 per pattern: [256] int64; a point's number of negative signs must
    have this parity."""
    return (abs_patterns(device).sum(-1).round().long() % 2)


@functools.cache
def decode_table(device: torch.device | str = "cpu") -> Tensor:
    """All 2^16 points: [65536, 8] float32, row c = the point of code c."""
    c = torch.arange(65536, device=device)
    return _decode_bits(c, device)


def _decode_bits(c: Tensor, device) -> Tensor:
    """Points of codes c: [...] int64 in [0, 2^16) -> [..., 8] float32 (from the bit layout)."""
    a = c & 0xFF
    s = (c >> 8) & 0x7F
    i = torch.arange(7, device=device)
    neg7 = (s.unsqueeze(-1) >> i) & 1  # [..., 7]
    neg_last = (neg7.sum(-1) + pattern_parity(device)[a]) & 1  # makes Σx even
    neg = torch.cat([neg7, neg_last.unsqueeze(-1)], -1).bool()  # [..., 8]
    mag = abs_patterns(device)[a]
    shift = torch.where(((c >> 15) & 1).bool(), -SHIFT, SHIFT).unsqueeze(-1)
    return torch.where(neg, -mag, mag) + shift


def decode(codes: Tensor) -> Tensor:
    """codes: [...] integer (int16 read as its 16 bits, or 0..65535) -> points [..., 8] fp32."""
    return decode_table(codes.device)[codes.long() & 0xFFFF]


@functools.cache
def pattern_index(device: torch.device | str = "cpu") -> Tensor:
    """Pattern number of each |x| with entries in {½, 3/2, 5/2, 7/2}, keyed by the base-4
    number Σ_i (|x_i| − ½)·4^i; −1 where |x| is not one of the 256: [65536] int64."""
    digits = (abs_patterns(device) - 0.5).long()  # [256, 8] in 0..2
    keys = (digits * 4 ** torch.arange(8, device=device)).sum(-1)
    out = torch.full((4**8,), -1, dtype=torch.long, device=device)
    out[keys] = torch.arange(256, device=device)
    return out


def _lattice_nearest(z: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest point of the whole coset D̂8 to each z: [M, 8] (Conway and Sloane's D_n decoder
    moved by ½): round every coordinate to the nearest odd multiple of ½; if Σx is odd,
    re-round the coordinate that was closest to a tie the other way. Returns (points, squared
    distances [M])."""
    f = torch.floor(z) + 0.5
    err = z - f  # in [−½, ½)
    odd = (f.sum(-1).round().long() & 1).bool()  # [M]
    j = err.abs().argmax(-1, keepdim=True)  # the cheapest coordinate to move
    step = torch.where(err.gather(1, j) >= 0, 1.0, -1.0) * odd[:, None]
    f = f.scatter_add(1, j, step)
    return f, ((z - f) ** 2).sum(-1)


def _index_of(f: Tensor) -> Tensor:
    """Pattern number of |f| for D̂8 points f: [M, 8]; −1 where |f| is not in the codebook."""
    digits = (f.abs() - 0.5).long()  # [M, 8], ≥ 0
    inside = (digits <= 3).all(-1)
    keys = (digits.clamp(max=3) * 4 ** torch.arange(8, device=f.device)).sum(-1)
    return torch.where(inside, pattern_index(f.device)[keys], -1)


def _brute_for_shift(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest point of the unshifted codebook to each z: [M, 8], by trying all 256 patterns.
    Returns (squared distance [M], pattern index [M], negative-sign mask [M, 8])."""
    A = abs_patterns(z.device)  # [256, 8]
    az, neg = z.abs(), z < 0
    # with free signs, pattern a's best point has the signs of z: ‖z‖² + ‖a‖² − 2 a·|z|
    dist = (A * A).sum(-1) - 2 * az @ A.t()  # [M, 256]
    # wrong parity: flip the sign where it costs least, adding 4·min_i a_i|z_i| (a running
    # minimum over the 8 coordinates: [M, 256] operations only, no [M, 256, 8] temporary)
    cost = az[:, :1] * A[:, 0]
    for i in range(1, 8):
        cost = torch.minimum(cost, az[:, i:i + 1] * A[:, i])  # [M, 256]
    bad = (neg.sum(-1, keepdim=True) & 1).bool() ^ pattern_parity(z.device).bool()
    dist = torch.where(bad, dist + 4 * cost, dist)
    best, idx = dist.min(-1)  # [M]
    flip_at = (az * A[idx]).argmin(-1, keepdim=True)  # [M, 1]
    flip = bad.gather(1, idx[:, None]) & (torch.arange(8, device=z.device) == flip_at)
    return best + (z * z).sum(-1), idx, neg ^ flip


def _codes_from(idx: Tensor, neg: Tensor, minus: Tensor) -> Tensor:
    """Pack (pattern index, signs of coordinates 0–6, shift bit) into codes [M] int64."""
    weights = 1 << torch.arange(8, 15, device=idx.device)
    return idx | (neg[:, :7].long() * weights).sum(-1) | (minus.long() << 15)


def _brute_codes(y: Tensor) -> Tensor:
    d_plus, i_plus, n_plus = _brute_for_shift(y - SHIFT)
    d_minus, i_minus, n_minus = _brute_for_shift(y + SHIFT)
    minus = d_minus < d_plus
    idx = torch.where(minus, i_minus, i_plus)
    neg = torch.where(minus[:, None], n_minus, n_plus)
    return _codes_from(idx, neg, minus)


def _nearest_chunk(y: Tensor) -> Tensor:
    """Codes of the nearest points to y: [M, 8]. Fast path: the nearest point of each shifted
    coset D̂8 ± ¼ is exact when its pattern is one of the 256 and no nearer candidate can
    exist in the other shift (whose lattice distance is a lower bound); the remaining
    vectors (large norms) go through the 256-pattern search."""
    f_p, d_p = _lattice_nearest(y - SHIFT)
    f_m, d_m = _lattice_nearest(y + SHIFT)
    i_p, i_m = _index_of(f_p), _index_of(f_m)
    in_p, in_m = i_p >= 0, i_m >= 0
    use_m = in_m & (~in_p | (d_m < d_p))
    done = (in_p & (d_p <= d_m)) | (in_m & (d_m <= d_p)) | (in_p & in_m)
    codes = _codes_from(torch.where(use_m, i_m, i_p).clamp(min=0),
                        torch.where(use_m[:, None], f_m, f_p) < 0, use_m)
    rest = (~done).nonzero().squeeze(1)
    if len(rest):
        codes[rest] = _brute_codes(y[rest])
    return codes


@torch.no_grad()
def encode(y: Tensor) -> Tensor:
    """Code of the nearest E8P point to each 8-vector (exact). y: [..., 8] -> [...] int64."""
    if y.shape[-1] != 8:
        raise ValueError(f"E8P codes 8 values at a time: the last dimension must be 8, got "
                         f"{tuple(y.shape)}")
    flat = y.reshape(-1, 8).float()
    if lattice_cpu.serves(flat):  # the same search in C++, a vector at a time
        codes = lattice_cpu.e8p_encode(flat, abs_patterns("cpu"), pattern_index("cpu"))
        return codes.reshape(y.shape[:-1])
    return encode_batched(flat).reshape(y.shape[:-1])


def encode_batched(flat: Tensor) -> Tensor:
    """The search as tensor operations over a batch (any device; CPU runs the C++ search):
    flat [M, 8] float32 -> codes [M] int64."""
    if not len(flat):
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    return torch.cat([_nearest_chunk(c) for c in flat.split(CHUNK)])


def quantize(y: Tensor) -> tuple[Tensor, Tensor]:
    """(nearest points [..., 8] fp32, their codes [...] int64)."""
    codes = encode(y)
    return decode(codes), codes


def to_int16(codes: Tensor) -> Tensor:
    """Codes 0..65535 as the int16 with the same 16 bits."""
    return (codes.long() & 0xFFFF).to(torch.int32).sub(
        ((codes.long() >> 15) & 1).to(torch.int32) << 16).to(torch.int16)
