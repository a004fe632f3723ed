"""k-means assignment on CPU (`kmeans_cpu.cpp`, built into the same library as the affine
kernel by `affine_cpu.load`): `discq::argmin_bmm_cpu`, the index of the smallest entry of each
row of a batched product, computed a row at a time without storing the product."""
from __future__ import annotations

import torch
from torch import Tensor

from . import affine_cpu

torch.library.define("discq::argmin_bmm_cpu", "(Tensor A, Tensor B) -> Tensor")


@torch.library.register_fake("discq::argmin_bmm_cpu")
def _fake(A, B):
    return A.new_empty(A.shape[0], A.shape[1], dtype=torch.int64)


def serves(A: Tensor) -> bool:
    """Whether the C++ kernel takes A: float32 on CPU, nothing to differentiate, library
    loaded."""
    return (A.device.type == "cpu" and A.dtype == torch.float32 and not A.requires_grad
            and affine_cpu.load())


def argmin_bmm(A: Tensor, B: Tensor) -> Tensor:
    """A: [G, P, k], B: [G, k, E] -> (A @ B).argmin(-1) [G, P] int64 (the first on ties, up to
    float rounding of the sums)."""
    return torch.ops.discq.argmin_bmm_cpu(A.contiguous(), B.float().contiguous())
