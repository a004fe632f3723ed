"""GPTVQ's rounding of one weight matrix given its Hessian (van Baalen et al., 2024).

GPTQ's column loop (`gptq_core.py`), `dim` columns at a time. With U the upper Cholesky factor
of H⁻¹, jointly rounding the columns S = [j, j + d) of every row to a codeword q and updating the
columns after them optimally (OBS) is
    E_S = (W_S − Q_S) U_SS⁻¹,   W_later ← W_later − E_S U_S,later,
and the codeword that increases the loss least is argmin_c ‖(w − c) U_SS⁻¹‖²: the nearest
codeword after both are mapped by U_SS⁻¹ (d = 1: GPTQ exactly). Lazy blocks of `block_size`
columns defer the update of the rest of the matrix to one matmul a block.

A codebook group (R_g rows × C_g columns) is fitted when the loop first reaches its columns, from
the error-updated weights: optional 4-bit block scales, then Mahalanobis-spread initial points
and k-means whose distances weigh column j by 1/U_jj² (the loss of rounding it alone), then the
int8 codebook (assignments use the stored values). After the loop, `update_codebooks` moves the
codebooks by Adam on tr((W − Ŵ) H (W − Ŵ)ᵀ) with the assignments fixed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from discq.tensors import kmeans, vq
from discq.tensors.gptvq import to_groups
from discq.tensors.grid import expand_groups
from torch import Tensor

from .gptq import proxy_loss
from .gptq_core import SMALL_UPDATE, _few_threads, _prepare, inverse_cholesky_upper

Fit = Callable[[Tensor, Tensor, int], Tensor]  # (X [G, P, d], weights, E) -> C [G, E, d]


@dataclass
class VQLayout:
    bits: int
    dim: int
    R_g: int
    C_g: int
    scale_block: int = 0  # 0: no block scales


@dataclass
class VQResult:
    idx: Tensor              # [N, K/d] int64
    codebook: Tensor         # int8 [G_r, G_c, E, d]
    scale: Tensor            # fp16 [G_r, G_c]
    exponents: Tensor | None  # uint8 [N, K/scale_block] or None

    def factors(self, K: int, scale_block: int) -> Tensor | float:
        """Per-weight block factors [N, K] (1.0 without block scales)."""
        if self.exponents is None:
            return 1.0
        return expand_groups(vq.block_factors(self.exponents), scale_block, K)

    def weight(self, K: int, scale_block: int) -> Tensor:
        """Ŵ [N, K] fp32 from the stored (int8) codebooks."""
        return vq.lookup(self.idx, vq.codebook_values(self.codebook, self.scale)) * \
            self.factors(K, scale_block)


class Codebooks:
    """The codebooks of one weight while the column loop runs, fitted per column group."""

    def __init__(self, N: int, K: int, layout: VQLayout, h: Tensor, fit: Fit):
        self.N, self.K, self.L, self.h, self.fit_fn = N, K, layout, h, fit
        GR, GC = N // layout.R_g, K // layout.C_g
        E, dev = vq.entries(layout.bits, layout.dim), h.device
        self.codebook = torch.zeros(GR, GC, E, layout.dim, dtype=torch.int8, device=dev)
        self.scale = torch.zeros(GR, GC, dtype=torch.float16, device=dev)
        self.values = torch.zeros(GR, GC, E, layout.dim, device=dev)  # int8 · scale
        sb = layout.scale_block
        self.exponents = torch.zeros(N, K // sb, dtype=torch.uint8, device=dev) if sb else None
        self.f = torch.ones(N, K, device=dev)  # per-weight block factor
        self.rows = torch.arange(N, device=dev) // layout.R_g  # row group of each row

    def fit(self, g: int, Wg: Tensor) -> None:
        """Column group g from its current values Wg: [N, C_g]."""
        L, C_g = self.L, self.L.C_g
        cols = slice(g * C_g, (g + 1) * C_g)
        if L.scale_block:
            self._fit_block_scales(g, Wg)
            Wg = Wg / self.f[:, cols]
        X = to_groups(Wg, L.R_g, C_g, L.dim)  # [G_r, P, d]
        w = self.h[cols].reshape(1, 1, C_g // L.dim, L.dim).expand(
            X.shape[0], L.R_g, -1, -1).reshape(X.shape)
        C = self.fit_fn(X, w, vq.entries(L.bits, L.dim))
        self.codebook[:, g], self.scale[:, g] = vq.int8_codebook(C)
        self.values[:, g] = vq.codebook_values(self.codebook[:, g], self.scale[:, g])

    def _fit_block_scales(self, g: int, Wg: Tensor) -> None:
        """4-bit exponents of the blocks of column group g, relative to each codebook group's
        largest block."""
        L, sb = self.L, self.L.scale_block
        m = Wg.abs().reshape(self.N, L.C_g // sb, sb).amax(-1)  # [N, C_g/sb]
        GR = self.N // L.R_g
        e = vq.block_exponents(m.reshape(GR, -1)).reshape(self.N, -1)
        b0 = g * L.C_g // sb
        self.exponents[:, b0:b0 + L.C_g // sb] = e
        self.f[:, g * L.C_g:(g + 1) * L.C_g] = vq.block_factors(e).repeat_interleave(sb, 1)

    def nearest(self, w: Tensor, j: int, T: Tensor) -> tuple[Tensor, Tensor]:
        """Columns [j, j + d) of every row, w: [N, d] -> (indices [N], Ŵ values [N, d]): the
        codeword nearest after mapping by T = U_SS⁻¹ (block factors divided out and back)."""
        L = self.L
        g = j // L.C_g
        f = self.f[:, j:j + L.dim]  # [N, d], constant over a vector
        GR = self.N // L.R_g
        X = (w / f).reshape(GR, L.R_g, L.dim) @ T
        C = self.values[:, g]  # [G_r, E, d]
        a = kmeans.assign(X, torch.ones_like(X[:1, :1]), C @ T).reshape(self.N)
        return a, C[self.rows, a] * f


def gptvq_quantize(W: Tensor, H: Tensor, layout: VQLayout, *, fit: Fit, damp: float = 0.01,
                   block_size: int = 128, name: str = "") -> tuple[VQResult, Tensor]:
    """W: [N, K], H: [K, K] -> (indices, int8 codebooks, scales, block exponents) and the
    prepared W (dead columns zeroed) the proxy loss is measured against."""
    N, K = W.shape
    block_size = max(layout.dim, block_size // layout.dim * layout.dim)
    with _few_threads(W.device.type == "cpu" and N * block_size <= SMALL_UPDATE):
        W, H, _ = _prepare(W, H, act_order=False)
        W0 = W.clone()
        U = inverse_cholesky_upper(H, damp, name)
        books = Codebooks(N, K, layout, 1 / U.diagonal() ** 2, fit)
        idx = torch.zeros(N, K // layout.dim, dtype=torch.int64, device=W.device)
        for i1 in range(0, K, block_size):
            _quantize_block(W, U, i1, min(i1 + block_size, K), books, idx)
    return VQResult(idx, books.codebook, books.scale, books.exponents), W0


def _quantize_block(W: Tensor, U: Tensor, i1: int, i2: int, books: Codebooks, idx: Tensor
                    ) -> None:
    """Columns i1..i2, d at a time, with intra-block error feedback, then the lazy update."""
    d, C_g = books.L.dim, books.L.C_g
    W1 = W[:, i1:i2].clone()
    E = torch.zeros_like(W1)
    for j in range(i1, i2, d):
        if j % C_g == 0:
            books.fit(j // C_g, _current(W, W1, E, U, i1, i2, j, C_g))
        S = slice(j - i1, j - i1 + d)
        T = torch.linalg.solve_triangular(U[j:j + d, j:j + d], torch.eye(d, device=U.device),
                                          upper=True)
        a, q = books.nearest(W1[:, S], j, T)
        idx[:, j // d] = a
        err = (W1[:, S] - q) @ T  # [N, d]
        W1[:, S.stop:] -= err @ U[j:j + d, j + d:i2]
        E[:, S] = err
    W[:, i2:] -= E @ U[i1:i2, i2:]
    W[:, i1:i2] = W1


def _current(W, W1, E, U, i1: int, i2: int, j: int, n: int) -> Tensor:
    """The error-updated values of columns [j, j + n) as the loop stands at column j: [N, n]
    (inside the block from W1; past it, W minus the pending lazy update)."""
    inside = W1[:, j - i1:min(j + n, i2) - i1]
    if j + n <= i2:
        return inside.clone()
    past = W[:, i2:j + n] - E[:, :j - i1] @ U[i1:j, i2:j + n]
    return torch.cat([inside, past], 1)


def update_codebooks(W: Tensor, H: Tensor, res: VQResult, scale_block: int, *, steps: int = 25,
                     lr: float = 1e-3) -> VQResult:
    """GPTVQ's codebook update: Adam on the codebooks' float values with the assignments fixed,
    the loss tr((W − Ŵ) H (W − Ŵ)ᵀ) with its gradient 2(Ŵ − W)H gathered per codeword; when a
    step raises the loss, restart from the best values at a tenth of the rate. The result is
    rounded to int8 again and kept only if its loss is lower than before the update, so the
    proxy loss never increases. `lr` is in units of the weight's RMS."""
    N, K = W.shape
    W, H = W.float(), H.float()
    f = res.factors(K, scale_block)
    unit = float(W.pow(2).mean().sqrt().clamp(min=1e-12))
    start = vq.codebook_values(res.codebook, res.scale)
    GR, GC, E, d = start.shape
    r, c = vq.group_of_vectors(N, K, d, N // GR, K // GC, W.device)
    flat = ((r * GC + c) * E + res.idx).reshape(-1)  # [N·K/d] codeword of each vector

    def loss_and_grad(values: Tensor) -> tuple[float, Tensor]:
        D = vq.lookup(res.idx, values) * f - W  # [N, K]
        DH = D @ H
        g = (2 * DH * f).reshape(-1, d)  # ∂/∂Ŵ, then through the block factors
        grad = values.new_zeros(GR * GC * E, d).index_add_(0, flat, g).view_as(values)
        return float((DH * D).sum()), grad

    best, best_loss = start.clone(), loss_and_grad(start)[0]
    p = (start / unit).clone().requires_grad_()
    opt = torch.optim.Adam([p], lr=lr)
    for _ in range(steps):
        loss, grad = loss_and_grad(p.detach() * unit)
        if loss > best_loss:  # overshot: back to the best point, smaller steps
            lr /= 10
            p = (best / unit).clone().requires_grad_()
            opt = torch.optim.Adam([p], lr=lr)
            continue
        best, best_loss = (p.detach() * unit).clone(), loss
        p.grad = grad * unit
        opt.step()
    codebook, scale = vq.int8_codebook(best)
    new = VQResult(res.idx, codebook, scale, res.exponents)
    before = proxy_loss(W, res.weight(K, scale_block), H)
    return new if proxy_loss(W, new.weight(K, scale_block), H) < before else res
