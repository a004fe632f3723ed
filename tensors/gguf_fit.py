"""Choosing a GGUF block's header — its scales, minimums and super-block factors — for given
weights. Rounding methods then pick the codes on the grid the header defines.

Legacy types (Q4_0, Q5_0, Q8_0) put the block's signed extreme on the level -2^(bits-1), as
llama.cpp's reference quantizer and discq's symmetric affine grid do; Q4_1/Q5_1 span the block's
[min, max]. k-quants first fit every sub-block's real-valued (scale, min) by a small search over
candidate scales with a least-squares refit (the search llama.cpp's k-quant quantizers run), then
quantize those to the super-block's fp16 factors and 4- or 6-bit sub-scales. A sub-scale never
rounds to 0 and no factor is 0, so every group's step a is nonzero and `(w - b) / a` is always
defined (llama.cpp allows a zero sub-scale; discq's grid is then the same minus that point).
The 4-bit i-quants (IQ4_NL, IQ4_XS) fit a signed factor per group of 32 onto their non-linear
level table by the same candidate search with a least-squares refit; IQ4_XS then quantizes the
eight factors of a super-block to d·(ls - 32) as Q3_K does.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .gguf_layout import (
    BlockType,
    pack_iq4_scales,
    pack_q3_scales,
    pack_six_bit_pairs,
    to_fp16_bytes,
)
from .grid import min_scale, round_up_to, signed_extreme_scale

TINY = min_scale(torch.float16)  # the smallest normal fp16: no factor is 0
CHUNK = 2**14  # groups per search step (bounds the [groups, candidates, group] temporaries)


def fit_header(w: Tensor, t: BlockType) -> Tensor:
    """w: [n, block] -> header bytes [n, t.header_bytes] (its fields in struct order)."""
    w = w.float()
    if t.levels is not None:
        return _levels_header(w, t)
    if t.block == 32:
        return _legacy_header(w, t)
    x = w.view(-1, t.group)  # [n·G, g]
    G = t.block // t.group
    if t.name in ("Q3_K", "Q6_K"):
        a = _chunked(_search_symmetric, x, 2 ** (t.bits - 1)).view(-1, G)
        return _signed_header(a, t)
    a, mn = _chunked(_search_asymmetric, x, t.qmax)
    return _min_header(a.view(-1, G), mn.view(-1, G), t)


def _legacy_header(w: Tensor, t: BlockType) -> Tensor:
    fp16 = torch.float16
    if t.name in ("Q4_1", "Q5_1"):
        lo, hi = w.amin(-1), w.amax(-1)
        d = round_up_to(((hi - lo) / t.qmax).clamp(min=min_scale(fp16)), fp16)
        return torch.cat([to_fp16_bytes(d), to_fp16_bytes(lo)], dim=1)
    return to_fp16_bytes(signed_extreme_scale(w, 2 ** (t.bits - 1), fp16)[:, 0])


def _chunked(search, x: Tensor, nmax: int):
    parts = [search(x[i:i + CHUNK], nmax) for i in range(0, x.shape[0], CHUNK)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def _search_asymmetric(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Per group: w ≈ a·L + mn, L ∈ [0, nmax], a >= 0, mn <= 0, by weighted least squares over
    candidate steps (range / (nmax + δ), δ ∈ [-1, 1]); weights av|x| + |x| favour the large
    weights, as llama.cpp's. x: [m, g] -> a, mn: [m]."""
    wt = x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()  # [m, g]
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    span = (x.amax(-1, keepdim=True) - lo).clamp(min=TINY)
    delta = torch.linspace(-1, 1, 21, device=x.device)
    iscale = (nmax + delta) / span  # [m, c]
    L = torch.round(iscale[..., None] * (x - lo)[:, None]).clamp(0, nmax)  # [m, c, g]
    W, X = wt[:, None], x[:, None]
    sw, sl, sl2 = W.sum(-1), (W * L).sum(-1), (W * L * L).sum(-1)
    sx, slx = (W * X).sum(-1), (W * L * X).sum(-1)
    det = sw * sl2 - sl * sl
    # a constant group (every L equal) leaves the 2x2 system singular: fit a alone
    flat = det <= 1e-6 * sw * sl2
    det = torch.where(flat, 1.0, det)
    a, mn = (sw * slx - sl * sx) / det, (sl2 * sx - sl * slx) / det
    clipped = flat | (mn > 0)  # the offset must stay <= 0 (llama.cpp stores -min >= 0)
    a = torch.where(clipped, slx / sl2.clamp(min=1e-30), a).clamp(min=0)
    mn = torch.where(clipped, 0.0, mn)
    err = (W * (a[..., None] * L + mn[..., None] - X).pow(2)).sum(-1)  # [m, c]
    best = err.argmin(-1, keepdim=True)
    return a.gather(-1, best)[:, 0], mn.gather(-1, best)[:, 0]


def _search_symmetric(x: Tensor, nmax: int) -> Tensor:
    """Per group: w ≈ a·L, L ∈ [-nmax, nmax - 1], candidates putting the signed extreme near
    -nmax, a by least squares. Unweighted: llama.cpp weights by x² here, which on SmolLM2's
    ffn_down costs 10% (Q3_K) and 8% (Q6_K) more squared error. x: [m, g] -> a: [m] (signed)."""
    extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # [m, 1]
    extreme = torch.where(extreme == 0, TINY, extreme)
    delta = torch.linspace(-0.9, 0.9, 19, device=x.device)
    iscale = -(nmax + delta) / extreme  # [m, c]
    L = torch.round(iscale[..., None] * x[:, None]).clamp(-nmax, nmax - 1)  # [m, c, g]
    X = x[:, None]
    a = (L * X).sum(-1) / (L * L).sum(-1).clamp(min=1e-30)
    err = (a[..., None] * L - X).pow(2).sum(-1)
    return a.gather(-1, err.argmin(-1, keepdim=True))[:, 0]


def level_boundaries(levels, device=None) -> Tensor:
    """Midpoints between consecutive levels (ascending): `bucketize(x, them)` is the index of
    the level nearest x."""
    lv = torch.tensor(levels, dtype=torch.float32, device=device)
    return (lv[1:] + lv[:-1]) / 2


def _search_levels(x: Tensor, levels: tuple[int, ...]) -> Tensor:
    """Per group: w ≈ a·levels[L], a signed, by least squares over candidates that put the
    group's signed extreme near the lowest or the highest level (both orientations of the
    asymmetric table), as llama.cpp's IQ4 search; unweighted, as `_search_symmetric`.
    x: [m, g] -> a: [m]."""
    lv = torch.tensor(levels, dtype=torch.float32, device=x.device)
    mids = level_boundaries(levels, x.device)
    extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # [m, 1]
    extreme = torch.where(extreme == 0, TINY, extreme)
    spread = torch.arange(-6.0, 7.0, 2.0, device=x.device)  # every other step: as good, half the cost
    target = torch.cat([lv[0] + spread, lv[-1] + spread])  # [c]
    a0 = extreme / target  # [m, c]
    V = lv[torch.bucketize((x[:, None] / a0[..., None]).contiguous(), mids)]  # [m, c, g]
    X = x[:, None]
    a = (V * X).sum(-1) / (V * V).sum(-1).clamp(min=1e-30)
    err = (a[..., None] * V - X).pow(2).sum(-1)
    return a.gather(-1, err.argmin(-1, keepdim=True))[:, 0]


def _levels_header(w: Tensor, t: BlockType) -> Tensor:
    """IQ4_NL: d = the block's a in fp16. IQ4_XS: each group's a as d·(ls - 32), ls in
    [0, 63], the largest |a| on ls = 0 (as `_signed_header`; ls - 32 is never 0)."""
    a = _chunked(lambda x, _: _search_levels(x, t.levels), w.reshape(-1, t.group), 0)
    if t.block == t.group:
        d = torch.where(a.abs() < TINY, TINY, a)
        return to_fp16_bytes(d)
    a = a.view(-1, t.block // t.group)  # [n, 8]
    amax = a.gather(-1, a.abs().argmax(-1, keepdim=True))[:, 0]
    d = amax / -32
    d = torch.where(d.abs() < TINY, TINY, d).half().float()
    s = torch.round(a / d[:, None]).clamp(-32, 31)
    s = torch.where(s == 0, 1.0, s)
    return torch.cat([to_fp16_bytes(d), pack_iq4_scales((s + 32).to(torch.uint8))], dim=1)


def _min_header(a: Tensor, mn: Tensor, t: BlockType) -> Tensor:
    """Q2_K/Q4_K/Q5_K: (a, mn) [n, G] -> d·sc ≈ a, dmin·m ≈ -mn with sc, m < 2^k."""
    top = 15 if t.name == "Q2_K" else 63
    d = (a.amax(-1) / top).clamp(min=TINY).half().float()  # [n]
    dmin = (-mn).amax(-1).div(top).half().float()
    sc = torch.round(a / d[:, None]).clamp(1, top)
    m = torch.round(-mn / dmin.clamp(min=TINY)[:, None]).clamp(0, top)
    if t.name == "Q2_K":
        scales = (sc + 16 * m).to(torch.uint8)
        return torch.cat([scales, to_fp16_bytes(d), to_fp16_bytes(dmin)], dim=1)
    return torch.cat([to_fp16_bytes(d), to_fp16_bytes(dmin), pack_six_bit_pairs(sc, m)], dim=1)


def _signed_header(a: Tensor, t: BlockType) -> Tensor:
    """Q3_K/Q6_K: signed a [n, G] -> d·s ≈ a; the largest |a| lands on s = -32 (-128)."""
    low = -32 if t.name == "Q3_K" else -128
    amax = a.gather(-1, a.abs().argmax(-1, keepdim=True))[:, 0]
    d = amax / low
    d = torch.where(d.abs() < TINY, TINY, d).half().float()
    s = torch.round(a / d[:, None]).clamp(low, -low - 1)
    s = torch.where(s == 0, 1.0, s)  # a zero sub-scale would make the whole group one value
    if t.name == "Q3_K":
        return torch.cat([pack_q3_scales((s + 32).to(torch.uint8)), to_fp16_bytes(d)], dim=1)
    return torch.cat([s.to(torch.int8).view(torch.uint8), to_fp16_bytes(d)], dim=1)
