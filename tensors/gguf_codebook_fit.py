"""Rounding onto llama.cpp's codebook i-quants (`gguf_codebook`): the nearest codewords with
their signs, the scales of a block, and round to nearest.

Signs come first, as in llama.cpp's quantizers: each 8 weights keep their own signs (with
parity types, when the count of negatives is odd, the weight of smallest |x| takes the wrong
sign — the cheapest flip — and then wants the smallest level, so its target is −|x|); each
vector then takes the codeword nearest its target (exact search over the whole grid: one
matmul). Scales: per group, candidates putting max|w| near the grid's highest level (and one
on its lowest, for groups of equal weights), each refit
by least squares on its nearest codewords, the least squared error kept; then d with the
largest group scale on ls = 15 and each ls rounded (scales are never negative: signs are in
the sign bytes).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .gguf_codebook import BLOCK, SIGNS, Codebook, Fields, grid, join, scales
from .gguf_layout import to_fp16_bytes

CHUNK = 512  # scale groups per search step: bounds the [chunk, candidates, entries] scores


def _signs(x: Tensor, c: Codebook, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x: [m, 8] -> (negative [m, 8] bool: the signs stored, the codewords' targets [m, 8]:
    |x|, or −|x| for the weight given the wrong sign by parity: the least weight·x²)."""
    neg = x < 0
    u = x.abs()
    if c.parity:
        odd = neg.sum(-1) % 2 == 1
        cost = u * u if weight is None else weight * u * u
        flip = torch.zeros_like(neg).scatter_(1, cost.argmin(-1, keepdim=True), True)
        flip &= odd[:, None]
        neg = neg ^ flip
        u = torch.where(flip, -u, u)
    return neg, u


def _distances(t: Tensor, G: Tensor, weight: Tensor | None = None) -> Tensor:
    """Σ_k w_k (t_k − g_k)² − Σ_k w_k t_k² for targets t [v, vec] and every codeword g of
    G [E, vec] (w: weights [v, vec], or 1): [v, E]."""
    if weight is None:
        return (G * G).sum(-1)[None] - 2 * t @ G.t()
    return weight @ (G * G).t() - 2 * (weight * t) @ G.t()


def _result(idx: Tensor, neg: Tensor, G: Tensor, c: Codebook) -> tuple[Tensor, Tensor, Tensor]:
    sign = (neg.int() << torch.arange(SIGNS, device=neg.device, dtype=torch.int32)).sum(-1)
    values = G[idx].reshape(-1, SIGNS) * (1.0 - 2.0 * neg.float())
    return idx.view(-1, SIGNS // c.vec).int(), sign.int(), values


def nearest(x: Tensor, c: Codebook, weight: Tensor | None = None
            ) -> tuple[Tensor, Tensor, Tensor]:
    """x: [m, 8] in units of the scale -> (codeword indices [m, 8 / vec] int32, sign bytes [m]
    int32, decoded values [m, 8]), nearest in the distance weighted by `weight` [m, 8] (each
    weight's importance: the Hessian's diagonal, as llama.cpp's importance matrix), if given."""
    neg, u = _signs(x, c, weight)
    G = grid(c, x.device)  # [E, vec]
    w = None if weight is None else weight.reshape(-1, c.vec)
    idx = _distances(u.reshape(-1, c.vec), G, w).argmin(-1)  # least Σ w (t − g)²
    return _result(idx, neg, G, c)


def runner_up(x: Tensor, c: Codebook) -> tuple[Tensor, Tensor, Tensor]:
    """The second-nearest codes with the same signs, as `nearest` returns them: the nearest
    with the one vector of the 8 weights (of 8 / vec) that loses least switched to its
    second-nearest codeword. DiscQuant chooses between the two."""
    neg, u = _signs(x, c)
    G = grid(c, x.device)
    d = _distances(u.reshape(-1, c.vec), G)  # [v, E]
    best = d.topk(2, dim=-1, largest=False)  # values, indices [v, 2]
    loss = (best.values[:, 1] - best.values[:, 0]).view(-1, SIGNS // c.vec)  # [m, per]
    switch = torch.zeros_like(loss, dtype=torch.bool).scatter_(1, loss.argmin(-1, keepdim=True),
                                                               True).view(-1)
    idx = torch.where(switch, best.indices[:, 1], best.indices[:, 0])
    return _result(idx, neg, G, c)


def fit_scales(w: Tensor, c: Codebook, weight: Tensor | None = None) -> Tensor:
    """w: [m, group] -> a [m] >= 0, least (weighted: `weight` [m, group]) squared error.
    Candidates put max|w| near the grid's highest level, and one on its lowest (a group of
    equal weights wants that: each grid has (low, …, low))."""
    levels = grid(c).unique()  # ascending, e.g. 8, 25, 43
    mult = torch.linspace(0.9, 1.2, 5)
    inv = torch.cat([mult / levels[-1], 1 / levels[:1]]).to(w.device)  # [cand]
    weighted = weight is not None  # unweighted: the cheaper plain distance in the search
    weight = torch.ones_like(w) if weight is None else weight.float()
    out = []
    for x, wt in zip(w.split(CHUNK), weight.split(CHUNK)):
        amax = x.abs().amax(-1, keepdim=True).clamp(min=1e-30)  # [k, 1]
        a0 = amax * inv  # [k, cand]
        wc = wt[:, None].expand(-1, len(inv), -1).reshape(-1, SIGNS) if weighted else None
        _, _, v = nearest((x[:, None, :] / a0[..., None]).reshape(-1, SIGNS), c, wc)
        v = v.view(x.shape[0], len(inv), c.group)
        X, Wt = x[:, None], wt[:, None]
        a = ((Wt * v * X).sum(-1) / (Wt * v * v).sum(-1).clamp(min=1e-30)).clamp(min=0)
        err = (Wt * (a[..., None] * v - X).pow(2)).sum(-1)
        out.append(a.gather(-1, err.argmin(-1, keepdim=True))[:, 0])
    return torch.cat(out)


def fit_header(w: Tensor, c: Codebook, weight: Tensor | None = None) -> Fields:
    """w: [n, 256] (`weight`: the same shape, each weight's importance) -> Fields with d and
    ls set (indices and signs zero)."""
    n = w.shape[0]
    wt = None if weight is None else weight.reshape(-1, c.group)
    a = fit_scales(w.float().reshape(-1, c.group), c, wt).view(n, -1)  # [n, 256 / group]
    d = (a.amax(-1) / c.top).clamp(min=6.2e-5).half().float()  # [n]
    ratio = a / d[:, None]  # = f(ls)
    ls = (ratio - 1) / 2 if c.scale == "odd" else ratio / (0.25 if c.scale == "quarter"
                                                           else 0.5) - 0.5
    ls = torch.round(ls).clamp(0, 15).to(torch.int32)
    zeros = torch.zeros(n, BLOCK // c.vec, dtype=torch.int32, device=w.device)
    return Fields(to_fp16_bytes(d), ls, zeros, torch.zeros(n, BLOCK // SIGNS,
                                                             dtype=torch.int32, device=w.device))


def round_with(f: Fields, w: Tensor, c: Codebook) -> Fields:
    """Every vector of w [n, 256] to its nearest codeword on the scales of `f`."""
    a = scales(f, c).repeat_interleave(c.group, dim=1)  # [n, 256]
    idx, sign, _ = nearest((w.float() / a).reshape(-1, SIGNS), c)
    n = w.shape[0]
    return Fields(f.d, f.ls, idx.reshape(n, -1), sign.reshape(n, -1))


def quantize(w: Tensor, c: Codebook) -> Tensor:
    """Round to nearest: w [n, 256] -> block bytes [n, c.nbytes]."""
    return join(round_with(fit_header(w, c), w, c), c)


__all__ = ["nearest", "runner_up", "fit_scales", "fit_header", "round_with", "quantize"]
