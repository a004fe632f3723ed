"""Residual lattice codes for 3 and 4 bits per weight (QuIP#'s RVQ variants of E8P).

A block y of 8 weights is coded in two stages: v₁ = E8P(y) (16 bits), then the residual, scaled
up by r, is coded by a second codebook: v = v₁ + C₂(r·(y − v₁))/r.
  3 bits: C₂ = the 1-bit E8 codebook below (8 bits per 8 weights), r = 2.04;
  4 bits: C₂ = E8P again (16 bits), r = 3.45.
The scales put the residual (per-coordinate RMS ≈ 0.3 after E8P at RMS 1) at the size each
second codebook codes best. Codes: [..., stages] int64, stage 0 the E8P code.

The 1-bit E8 codebook (256 points, the E8 lattice points of norm² ≤ 4 that fit in 8 bits): the
origin; the 240 roots (112 of the form ±eᵢ ± eⱼ, 128 of the form (±½)^8 with an even number of
minus signs); and 15 of the 16 points ±2eᵢ: all +2eᵢ and −2eᵢ for i < 7 (−2e₇ is left out).
Which one is dropped does not matter: coordinate permutations combined with sign changes of
two coordinates are symmetries of E8 that fix the origin and the roots and carry any ±2eᵢ to
any other, so for a source with those symmetries (i.i.d. Gaussian) all 16 choices have the
same error. Point order (part of the stored format): origin, ±eᵢ ± eⱼ (lexicographic in
(i, j, signs)), the (±½)^8 points by their sign bits, then the 15 ±2eᵢ.
"""
from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor

from . import e8p
from .kernels import lattice_cpu

RESIDUAL_SCALE = {3: 2.04, 4: 3.45}
STAGE_BITS = {2: (16,), 3: (16, 8), 4: (16, 16)}  # bits of each stage's code per 8 weights


def _e8_points() -> list[list[float]]:
    pts = [[0.0] * 8]
    for i, j in itertools.combinations(range(8), 2):
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            p = [0.0] * 8
            p[i], p[j] = si, sj
            pts.append(p)
    for bits in range(256):
        neg = [(bits >> k) & 1 for k in range(8)]
        if sum(neg) % 2 == 0:
            pts.append([-0.5 if n else 0.5 for n in neg])
    for sign, n in ((2.0, 8), (-2.0, 7)):
        for i in range(n):
            p = [0.0] * 8
            p[i] = sign
            pts.append(p)
    return pts


@functools.cache
def e8_1bit_points(device: torch.device | str = "cpu") -> Tensor:
    """The 1-bit E8 codebook: [256, 8] float32, row c = the point of code c."""
    return torch.tensor(_e8_points(), dtype=torch.float32, device=device)


@torch.no_grad()
def encode_e8_1bit(y: Tensor) -> Tensor:
    """Code of the nearest point of the 1-bit E8 codebook (exact search over all 256).
    y: [..., 8] -> [...] int64."""
    P = e8_1bit_points(y.device)
    flat = y.reshape(-1, 8).float()
    if lattice_cpu.serves(flat):  # the same search in C++
        return lattice_cpu.nearest(flat, P).reshape(y.shape[:-1])
    out = [((P * P).sum(-1) - 2 * c @ P.t()).argmin(-1) for c in flat.split(e8p.CHUNK)]
    return (torch.cat(out) if out else flat.new_zeros(0, dtype=torch.long)).reshape(y.shape[:-1])


def decode_e8_1bit(codes: Tensor) -> Tensor:
    return e8_1bit_points(codes.device)[codes.long() & 0xFF]


def check_bits(bits: int) -> None:
    if bits not in STAGE_BITS:
        raise ValueError(f"lattice codes exist for 2, 3 or 4 bits per weight, got {bits!r}")


def _second(bits: int):
    """(encode, decode) of the second stage."""
    return (encode_e8_1bit, decode_e8_1bit) if bits == 3 else (e8p.encode, e8p.decode)


@torch.no_grad()
def quantize(y: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Code 8-vectors y: [..., 8] at `bits` bits per weight. Returns (values [..., 8] fp32,
    codes [..., stages] int64). Stage one is exact nearest-point; the residual stage is
    greedy (the usual residual quantization), so the pair is not the joint nearest point."""
    check_bits(bits)
    v1, c1 = e8p.quantize(y)
    if bits == 2:
        return v1, c1.unsqueeze(-1)
    r = RESIDUAL_SCALE[bits]
    enc, dec = _second(bits)
    c2 = enc((y.float() - v1) * r)
    return v1 + dec(c2) / r, torch.stack([c1, c2], -1)


def decode(codes: Tensor, bits: int) -> Tensor:
    """codes: [..., stages] -> values [..., 8] fp32 (inverse of `quantize`'s codes)."""
    check_bits(bits)
    v = e8p.decode(codes[..., 0])
    if bits == 2:
        return v
    return v + _second(bits)[1](codes[..., 1]) / RESIDUAL_SCALE[bits]
