"""QuIP#'s lattice ops on CPU (built into the same library as the affine kernel by
`affine_cpu.load`): the searches of `lattice_cpu.cpp`, one vector at a time in C++ (threads over
vectors) — `discq::e8p_encode_cpu`, the exact nearest E8P point (the search `e8p.encode`
defines), and `discq::nearest_cpu`, the nearest point of a small codebook by exhaustive search
(the 1-bit E8 code of the 3-bit residual stage) — and `discq::e8p_linear_cpu`
(`e8p_linear_cpu.cpp`), the whole 2-bit E8P linear in one call."""
from __future__ import annotations

import torch
from torch import Tensor

from . import affine_cpu

torch.library.define("discq::e8p_encode_cpu",
                     "(Tensor y, Tensor patterns, Tensor index) -> Tensor")
torch.library.define("discq::nearest_cpu", "(Tensor y, Tensor points) -> Tensor")
torch.library.define(
    "discq::e8p_linear_cpu",
    "(Tensor x, Tensor qdata, Tensor scale, Tensor s_in, Tensor s_out, Tensor q_in, "
    "Tensor q_out, Tensor? bias, Tensor patterns) -> Tensor")


@torch.library.register_fake("discq::e8p_encode_cpu")
def _encode_fake(y, patterns, index):
    return y.new_empty(y.shape[0], dtype=torch.int64)


@torch.library.register_fake("discq::nearest_cpu")
def _nearest_fake(y, points):
    return y.new_empty(y.shape[0], dtype=torch.int64)


@torch.library.register_fake("discq::e8p_linear_cpu")
def _linear_fake(x, qdata, scale, s_in, s_out, q_in, q_out, bias, patterns):
    return x.new_empty(*x.shape[:-1], qdata.shape[0])


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


def e8p_linear(x: Tensor, qdata: Tensor, scale: Tensor, s_in: Tensor, s_out: Tensor,
               q_in: Tensor, q_out: Tensor, bias: Tensor | None) -> Tensor:
    """QuIP#'s 2-bit linear, s_out ⊙ T_outᵀ(scale·Ŵ̃ · T_in(s_in ⊙ x)) + b, in one C++ call:
    x [..., K] -> [..., N] in x's dtype (any number of rows: above 16 the weight is decoded
    once and multiplied by one GEMM)."""
    from ..e8p import abs_patterns
    return torch.ops.discq.e8p_linear_cpu(x, qdata, scale, s_in, s_out, q_in, q_out, bias,
                                          abs_patterns())
