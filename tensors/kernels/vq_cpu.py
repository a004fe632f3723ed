"""`discq::vq_linear_cpu` (`vq_cpu.cpp`, built into the same library as the affine kernel by
`affine_cpu.load`): x Ŵᵀ for vector-codebook weights, each row decoded on the fly. Declared here
with a fake so compile and export can trace it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import affine_cpu

torch.library.define(
    "discq::vq_linear_cpu",
    "(Tensor x, Tensor qdata, Tensor codebook, Tensor scale, Tensor? block_scale, int bits, "
    "int dim, int scale_block) -> Tensor")


@torch.library.register_fake("discq::vq_linear_cpu")
def _linear_fake(x, qdata, codebook, scale, block_scale, bits, dim, scale_block):
    return x.new_empty(x.shape[0], qdata.shape[0])


supports = affine_cpu.serves  # CPU floats, no gradient, library available


def vq_linear(x: Tensor, qdata: Tensor, codebook: Tensor, scale: Tensor,
              block_scale: Tensor | None, bits: int, dim: int, scale_block: int) -> Tensor:
    """x: [..., K] -> x Ŵᵀ [..., N] in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    y = torch.ops.discq.vq_linear_cpu(x2, qdata, codebook, scale, block_scale, bits, dim,
                                      scale_block)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
