"""Weighted k-means for vector codebooks (GPTVQ's codebook fit), batched over codebook groups.

Points X: [G, P, d] (G groups of P vectors), per-coordinate weights w broadcastable to X (GPTVQ:
the Hessian's importance of each column). The distortion is
    D(C, a) = Σ_p Σ_i w_pi (x_pi − C[a_p]_i)²
Each iteration assigns every point its nearest codeword under that weighted distance, then sets
every codeword to the weighted mean of its points, coordinate by coordinate: both steps minimize
D with the other held, so D never increases. An empty codeword keeps its place.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels import kmeans_cpu


def mahalanobis_init(X: Tensor, E: int) -> Tensor:
    """E initial codewords per group [G, E, d]: the points sorted by their Mahalanobis distance
    to the group's mean, taken at evenly spaced ranks (spread from the centre to the tails)."""
    G, P, d = X.shape
    Xc = X - X.mean(1, keepdim=True)
    cov = Xc.transpose(1, 2) @ Xc / P  # [G, d, d]
    cov = cov + 1e-8 * cov.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)[:, None, None] \
        * torch.eye(d, dtype=X.dtype, device=X.device)
    dist = (Xc * torch.linalg.solve(cov, Xc.transpose(1, 2)).transpose(1, 2)).sum(-1)  # [G, P]
    order = dist.argsort(dim=1, stable=True)
    ranks = torch.linspace(0, P - 1, E, device=X.device).round().long()
    return X.gather(1, order[:, ranks, None].expand(G, E, d)).clone()


def weighted_distances(X: Tensor, w: Tensor, C: Tensor) -> Tensor:
    """Σ_i w_i (x_i − c_i)² for every point and codeword: [G, P, E] (expanded square, one bmm)."""
    w = w.expand_as(X)
    return ((w * X * X).sum(-1, keepdim=True) - 2 * (w * X) @ C.transpose(1, 2)
            + w @ (C * C).transpose(1, 2))


ASSIGN_CHUNK = 1024  # points per bmm: its [G, chunk, E] distances stay in cache for argmin


def assign(X: Tensor, w: Tensor, C: Tensor) -> Tensor:
    """Nearest codeword of every point under the weighted distance: [G, P] int64. The point's
    own term Σ w x² does not change the argmin, so it is left out and the rest is a bmm:
    [w x, w] · [−2c, c²]ᵀ, a chunk of points at a time (writing all [G, P, E] distances to
    memory and reading them back for argmin costs up to twice as long on a CPU); on CPU the
    C++ kernel does each point's argmin without storing its distances."""
    w = w.expand_as(X)
    A = torch.cat([w * X, w], -1)  # [G, P, 2d]
    B = torch.cat([-2 * C, C * C], -1).transpose(1, 2)  # [G, 2d, E]
    if kmeans_cpu.serves(A):  # the same argmin a row at a time in C++, products never stored
        return kmeans_cpu.argmin_bmm(A, B)
    return torch.cat([a.bmm(B).argmin(-1) for a in A.split(ASSIGN_CHUNK, 1)], 1)


def update(X: Tensor, w: Tensor, a: Tensor, C: Tensor) -> Tensor:
    """Weighted mean of each codeword's points, per coordinate; [G, E, d]."""
    w = w.expand_as(X)
    idx = a[..., None].expand_as(X)
    num = torch.zeros_like(C).scatter_add_(1, idx, w * X)
    den = torch.zeros_like(C).scatter_add_(1, idx, w)
    return torch.where(den > 0, num / den.clamp(min=1e-30), C)


def distortion(X: Tensor, w: Tensor, C: Tensor, a: Tensor) -> Tensor:
    """D(C, a) per group: [G]."""
    chosen = C.gather(1, a[..., None].expand_as(X))
    return (w.expand_as(X) * (X - chosen) ** 2).sum((1, 2))


def kmeans(X: Tensor, w: Tensor, E: int, iters: int = 100) -> tuple[Tensor, Tensor]:
    """(C [G, E, d], a [G, P]) from Mahalanobis-spread initial codewords and up to `iters`
    weighted Lloyd iterations (stops when no assignment changes)."""
    X, w = X.float(), w.float()
    C = mahalanobis_init(X, E)
    a = assign(X, w, C)
    for _ in range(iters):
        C = update(X, w, a, C)
        new = assign(X, w, C)
        if torch.equal(new, a):
            break
        a = new
    return C, a
