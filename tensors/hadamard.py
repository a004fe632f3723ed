"""Randomized Hadamard transforms for incoherence processing (QuIP / QuIP#).

For n = m·2^p (2^p the largest power of two dividing n) the transform is T = Q_m ⊗ H_{2^p}:
the fast Walsh–Hadamard transform (orthonormal, O(n log n), no matrix) on blocks of 2^p, and a
seeded random orthogonal m×m factor across blocks (576 = 9·64, 1536 = 3·512). Randomized with a
±1 sign vector s: R(x) = T(s ⊙ x), R⁻¹(y) = s ⊙ Tᵀ(y). T is orthogonal, so R is too.
"""
from __future__ import annotations

import math

import zlib

import torch
from torch import Tensor


def split_size(n: int) -> tuple[int, int]:
    """n = m · 2^p with m odd: (m, 2^p)."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"transform size must be a positive integer, got {n!r}")
    p2 = n & -n
    return n // p2, p2


def fwht(x: Tensor) -> Tensor:
    """Orthonormal Walsh–Hadamard transform along the last dimension (a power of two)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two size, got {n}")
    y, h = x, 1
    while h < n:
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return y.reshape(x.shape) / math.sqrt(n)


def random_orthogonal(m: int, seed: int, dtype=torch.float32) -> Tensor:
    """A seeded random orthogonal m×m matrix (QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R))).to(dtype)


def random_signs(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def transform(x: Tensor, Q: Tensor) -> Tensor:
    """T x along the last dimension, T = Q ⊗ H. x: [..., n], Q: [m, m], n = m·2^p."""
    m = Q.shape[0]
    n = x.shape[-1]
    y = fwht(x.reshape(*x.shape[:-1], m, n // m))  # [..., m, 2^p]
    if m > 1:
        y = torch.einsum("ij,...jk->...ik", Q.to(y.dtype), y)
    return y.reshape(x.shape)


def transform_t(y: Tensor, Q: Tensor) -> Tensor:
    """Tᵀ y (the inverse): H is symmetric, so only Q is transposed."""
    return transform(y, Q.t())


def rotate(x: Tensor, s: Tensor, Q: Tensor) -> Tensor:
    """R(x) = T(s ⊙ x) along the last dimension."""
    return transform(x * s.to(x.dtype), Q)


def unrotate(y: Tensor, s: Tensor, Q: Tensor) -> Tensor:
    """R⁻¹(y) = s ⊙ Tᵀ y."""
    return transform_t(y, Q) * s.to(y.dtype)


def rotate_weight(W: Tensor, s_out: Tensor, s_in: Tensor, Q_out: Tensor, Q_in: Tensor) -> Tensor:
    """W̃ = R_out W R_inᵀ, so that W x = R_out⁻¹ W̃ R_in x. W: [N, K]."""
    Wt = rotate(W, s_in, Q_in)  # rows: W R_inᵀ
    return rotate(Wt.t(), s_out, Q_out).t()


def unrotate_weight(Wt: Tensor, s_out: Tensor, s_in: Tensor, Q_out: Tensor,
                    Q_in: Tensor) -> Tensor:
    """W = R_out⁻¹ W̃ R_in, the inverse of `rotate_weight`. Wt: [N, K]."""
    A = unrotate(Wt, s_in.float(), Q_in)  # rows: W̃ T_in diag(s_in)
    return unrotate(A.t(), s_out.float(), Q_out).t()


def check_rotation(s_in: Tensor, s_out: Tensor, Q_in: Tensor, Q_out: Tensor, N: int,
                   K: int) -> None:
    """ValueError unless the stored rotation of a [N, K] weight has the right shapes: sign
    vectors [K] and [N] (float: fine-tuning makes them real), factors the odd parts' sizes."""
    for name, s, n in (("s_in", s_in, K), ("s_out", s_out, N)):
        if tuple(s.shape) != (n,) or not s.is_floating_point():
            raise ValueError(f"{name} is {tuple(s.shape)} {s.dtype}, expected ({n},) float")
    for name, q, n in (("q_in", Q_in, K), ("q_out", Q_out, N)):
        if tuple(q.shape) != (split_size(n)[0],) * 2:
            raise ValueError(f"{name} is {tuple(q.shape)}, expected the odd factor of {n}")


def rotate_hessian(H: Tensor, s_in: Tensor, Q_in: Tensor) -> Tensor:
    """H̃ = R_in H R_inᵀ: the Hessian of the rotated inputs."""
    return rotate(rotate(H, s_in, Q_in).t(), s_in, Q_in).t()


# ---- seeded rotations: the one place a layer's rotation comes from ------------------------------

def layer_seed(fqn: str, seed: int = 0) -> int:
    """Seed of the rotations of layer `fqn`: a function of its name and the run's seed, so runs
    are reproducible and every method (RTN, GPTQ, DiscQuant, QuIP#) rotates a layer alike."""
    return zlib.crc32(fqn.encode()) + 104729 * seed


def rotation(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """(signs [n], orthogonal factor [m, m]) of a seeded randomized Hadamard transform."""
    m, _ = split_size(n)
    return random_signs(n, seed), random_orthogonal(m, seed + 1)


def layer_rotation(n_out: int, n_in: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(s_in, s_out, q_in, q_out) of a layer W: [n_out, n_in] for seed `seed`."""
    s_in, q_in = rotation(n_in, seed)
    s_out, q_out = rotation(n_out, seed + 7919)
    return s_in, s_out, q_in, q_out
