"""QuIP#'s lattice searches on CPU (`lattice_cpu.cpp`, built into the same library as the affine
kernel by `affine_cpu.load`), one vector at a time in C++ (threads over vectors):
`discq::e8p_encode_cpu`, the exact nearest E8P point (the search `e8p.encode` defines), and
`discq::nearest_cpu`, the nearest point of a small codebook by exhaustive search (the 1-bit E8
code of the 3-bit residual stage)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import affine_cpu

torch.library.define("discq::e8p_encode_cpu",
                     "(Tensor y, Tensor patterns, Tensor index) -> Tensor")
torch.library.define("discq::nearest_cpu", "(Tensor y, Tensor points) -> Tensor")


@torch.library.register_fake("discq::e8p_encode_cpu")
def _encode_fake(y, patterns, index):
    return y.new_empty(y.shape[0], dtype=torch.int64)


@torch.library.register_fake("discq::nearest_cpu")
def _nearest_fake(y, points):
    return y.new_empty(y.shape[0], dtype=torch.int64)


def available() -> bool:
    """The library is built (or buildable) and loaded."""
    return affine_cpu.load()


def serves(flat: Tensor) -> bool:
    """Whether the C++ searches take these vectors [M, d]: on CPU, at least one, library loaded
    (BlockLDLQ asks for a few thousand vectors per 8 columns, where the batched torch search's
    ~40 operations a call cost more than its arithmetic)."""
    return flat.device.type == "cpu" and len(flat) > 0 and available()


def e8p_encode(y: Tensor, patterns: Tensor, index: Tensor) -> Tensor:
    """y: [M, 8] -> codes [M] int64; `patterns` [256, 8] and `index` [4^8] are e8p.py's
    tables (`abs_patterns`, `pattern_index`)."""
    return torch.ops.discq.e8p_encode_cpu(y.float().contiguous(), patterns, index)


def nearest(y: Tensor, points: Tensor) -> Tensor:
    """y: [M, d], points: [P, d] -> index of the nearest point [M] int64 (first on ties)."""
    return torch.ops.discq.nearest_cpu(y.float().contiguous(), points.float().contiguous())
