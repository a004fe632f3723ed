"""Viterbi search of the bitshift trellis (`trellis.py`): the walk whose emitted values are
nearest, in squared error, to a sequence; and QTIP's tail-biting quantization of tiles.

One step over all 2^L states of all sequences at once. The 2^kV states that share their top
L − kV bits (a *group* u = s >> kV) share one predecessor set {(j << (L − kV)) | u}, so a step
takes one minimum per group,
    m_t(u) = min_j D_{t−1}((j << (L − kV)) | u),    D_t(s) = m_t(s >> kV) + ‖x_t − c(s)‖²,
and keeps one back-pointer j (kV bits, a byte) per group and step: 2^(L−kV) bytes a step, not
an int64 per state.

`viterbi` is the torch reference (any device); `quantize_tiles` runs the C++ kernel
(`kernels/trellis_cpu.cpp`) on CPU when it is built, the reference otherwise.
"""
from __future__ import annotations

import torch
from torch import Tensor

INF = float("inf")


def _constrain(D: Tensor, allowed: Tensor) -> Tensor:
    return torch.where(allowed, D, torch.full_like(D, INF))


def viterbi(x: Tensor, values: Tensor, kV: int, overlap: Tensor | None = None) -> Tensor:
    """Best walks for sequences x: [B, T, V] over a trellis of 2^L states whose values are
    `values` [2^L, V]; `overlap` [B] (optional): only walks starting in a state with top
    L − kV bits = overlap and ending in one with low L − kV bits = overlap. Returns the states
    [B, T] int64."""
    B, T, _ = x.shape
    L = values.shape[0].bit_length() - 1
    S, G = 1 << L, 1 << (L - kV)
    x, values = x.float(), values.float().to(x.device)
    state = torch.arange(S, device=x.device)

    def cost(t: int) -> Tensor:  # [B, S]
        return (x[:, t, None, :] - values).pow(2).sum(-1)

    D = cost(0)
    if overlap is not None:
        D = _constrain(D, (state >> kV) == overlap[:, None])
    back = torch.empty(T, B, G, dtype=torch.uint8, device=x.device)
    for t in range(1, T):
        m, back[t] = D.view(B, 1 << kV, G).min(1)  # [B, G]: best predecessor per group
        D = m.repeat_interleave(1 << kV, -1) + cost(t)
    if overlap is not None:
        D = _constrain(D, (state & (G - 1)) == overlap[:, None])
    out = torch.empty(B, T, dtype=torch.int64, device=x.device)
    out[:, -1] = D.argmin(-1)
    for t in range(T - 1, 0, -1):
        u = out[:, t] >> kV
        j = back[t].gather(1, u[:, None])[:, 0].long()
        out[:, t - 1] = (j << (L - kV)) | u
    return out


def walk_error(x: Tensor, values: Tensor, states: Tensor) -> Tensor:
    """Squared error of walks: x [B, T, V], states [B, T] -> [B]."""
    return (x.float() - values.float().to(x.device)[states]).pow(2).sum((-1, -2))


def tail_biting(x: Tensor, values: Tensor, kV: int, search=viterbi) -> Tensor:
    """QTIP's tail-biting walks [B, T] for x [B, T, V]: search the sequence rotated by half
    without constraint, read the overlap (top L − kV bits) of the state where the original
    sequence starts, then search the original sequence with start and end held to it."""
    T = x.shape[1]
    half = T // 2
    rolled = search(x.roll(half, 1), values, kV)
    overlap = rolled[:, half] >> kV
    return search(x, values, kV, overlap)


def quantize_tiles(x: Tensor, values: Tensor, kV: int, batch: int = 16) -> Tensor:
    """Tail-biting walks of tiles x: [B, T, V] -> states [B, T] int64: the C++ kernel on CPU
    (all tiles, threads over tiles), else the reference in batches of `batch` tiles (its
    back-pointers take T·2^(L−kV) bytes a tile)."""
    from .kernels import trellis_cpu
    if x.device.type == "cpu" and trellis_cpu.available():
        return tail_biting(x, values, kV, search=trellis_cpu.viterbi)
    return torch.cat([tail_biting(part, values, kV) for part in x.split(batch)])
