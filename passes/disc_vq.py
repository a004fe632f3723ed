"""DiscQuant over vector codebooks (`disc_config(codebook="gptvq")`): GPTVQ's format, with every
vector's codeword chosen by KL distillation instead of by Hessian error feedback.

The codebooks are fitted once on W (k-means per group of about `codebook_group_size` weights,
Mahalanobis-spread initial points, stored int8 with one scale, as GPTVQ stores them). For each
vector y of `vector_dim` weights the two candidates are its two nearest codewords, down (the
nearest: what nearest-point rounding picks) and up (the second). One variable x ∈ [0, 1] per
vector: ŷ = down + x·(up − down). The pull term uses y's position projected on that segment,
t = ⟨y − down, up − down⟩ / ‖up − down‖², exactly as on the affine grid, so with zero KL weight
every x goes to the nearer end: nearest-point rounding. Memory per vector: x, its gradient and
AdamW's moments (16 bytes), two uint8 indices and the fp16 pull.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from discq.tensors import kmeans, vq
from discq.tensors.gptvq import KMeansCodebooks, VectorQuantizedTensor, kmeans_codebooks
from torch import Tensor, nn

from .disc import DiscConfig, Relaxation, register_codebook

KMEANS_ITERS = 100  # GPTVQ's


class RelaxedVectorLinear(Relaxation):
    """Stands in for an nn.Linear during DiscQuant on vector codebooks (forward and pull term
    from `Relaxation`)."""

    rotation = None

    def __init__(self, linear: nn.Linear, bits: int, dim: int, group_size: int, init: str,
                 generator: torch.Generator):
        super().__init__()
        self.original, self.bits, self.dim, self.teacher = linear, bits, dim, False
        fit = kmeans_codebooks(linear.weight, bits, dim, group_size, KMEANS_ITERS)
        self.register_buffer("codebook", fit.codebook, persistent=False)
        self.register_buffer("scale", fit.scale, persistent=False)
        x0 = self._fit_candidates(fit)
        if init == "uniform":
            x0 = torch.rand(x0.shape, generator=generator).to(x0.device)
        self.x = nn.Parameter(x0)  # [N, K/d] fp32

    @torch.no_grad()
    def _fit_candidates(self, fit: KMeansCodebooks) -> Tensor:
        """Sets the two candidate indices, the pull 1 − 2t and the RTN noise from the fitted
        codebooks; returns x at nearest-point rounding (zeros)."""
        X, values = fit.X, fit.values()  # [G, P, d], [G, E, d]
        ones = torch.ones_like(X[:1, :1])
        two = kmeans.weighted_distances(X, ones, values).topk(2, -1, largest=False).indices
        down = values.gather(1, two[..., :1].expand_as(X))  # [G, P, d]
        up = values.gather(1, two[..., 1:].expand_as(X))
        diff = up - down
        n2 = diff.pow(2).sum(-1)
        t = ((X - down) * diff).sum(-1) / n2.clamp(min=1e-12)
        self.register_buffer("down", fit.back(two[..., 0]).to(torch.uint8), persistent=False)
        self.register_buffer("up", fit.back(two[..., 1]).to(torch.uint8), persistent=False)
        self.register_buffer("pull", fit.back(torch.where(n2 > 0, 1 - 2 * t, 0.0)).half(),
                             persistent=False)
        # the affine grid's normalization: 12·E[(rounded − W)²]
        self.rtn_noise = 12 * float((down - X).pow(2).mean())
        return torch.zeros(fit.N, fit.K // self.dim, device=X.device)

    def _vectors(self, idx: Tensor) -> Tensor:
        """Codewords of indices [N, K/d]: [N, K/d, d] fp32, as one embedding lookup into all
        codebooks stacked [G·E, d] (twice as fast as indexing by group and index; it runs for
        every layer at every forward, and again in checkpointed backwards)."""
        N, V = idx.shape
        GR, GC, E, d = self.codebook.shape
        r, c = vq.group_of_vectors(N, V * d, d, N // GR, V * d // GC, idx.device)
        values = vq.codebook_values(self.codebook, self.scale).view(-1, d)
        return F.embedding((r * GC + c) * E + idx.long(), values)

    def weight_hat(self) -> Tensor:
        """Ŵ(x) [N, K], differentiable in x."""
        down = self._vectors(self.down)
        W = down + self.x_now().unsqueeze(-1) * (self._vectors(self.up) - down)
        return W.flatten(1).to(self.original.weight.dtype)

    @torch.no_grad()
    def rounded(self) -> VectorQuantizedTensor:
        """The vector-codebook weight of round(x): each vector's down or up codeword."""
        idx = torch.where(self.x >= 0.5, self.up, self.down)
        return VectorQuantizedTensor.from_indices(idx, self.codebook, self.scale, self.bits,
                                                  self.dim, self.original.weight.dtype)


def _check_vq(config: DiscConfig) -> None:
    vq.check_bits_dim(config.bits, config.vector_dim)
    vq.check_overhead(config.bits, config.vector_dim, config.codebook_group_size,
                      field="codebook_group_size")


def _relax_vq(linear: nn.Linear, config: DiscConfig, fqn: str, generator
              ) -> RelaxedVectorLinear:
    g = config.codebook_group_size or vq.default_group_size(config.bits, config.vector_dim)
    return RelaxedVectorLinear(linear, config.bits, config.vector_dim, g, config.init, generator)


register_codebook("gptvq", _relax_vq, _check_vq)
