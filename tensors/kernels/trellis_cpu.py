"""The trellis ops on CPU (`trellis_cpu.cpp`, built into the same library as the affine kernel by
`affine_cpu.load`): `discq::viterbi_cpu` (the search `viterbi.viterbi` defines),
`discq::trellis_linear_cpu` (x Ŵᵀ decoding the 16×16 tiles on the fly, in AVX2 lanes) and
`discq::qtip_linear_cpu` (the whole rotated linear of `qtip.qtip_linear`). Declared here with
fakes so compile and export can trace them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import affine_cpu

torch.library.define(
    "discq::viterbi_cpu",
    "(Tensor x, Tensor values, int L, int kV, Tensor? overlap) -> Tensor")
torch.library.define(
    "discq::trellis_linear_cpu",
    "(Tensor x, Tensor qdata, Tensor? lut, int bits, str code, int L) -> Tensor")
torch.library.define(
    "discq::qtip_linear_cpu",
    "(Tensor x, Tensor qdata, Tensor scale, Tensor s_in, Tensor s_out, Tensor q_in, "
    "Tensor q_out, Tensor? lut, Tensor? bias, int bits, str code, int L) -> Tensor")


@torch.library.register_fake("discq::viterbi_cpu")
def _viterbi_fake(x, values, L, kV, overlap):
    return x.new_empty(x.shape[0], x.shape[1], dtype=torch.int64)


@torch.library.register_fake("discq::trellis_linear_cpu")
def _linear_fake(x, qdata, lut, bits, code, L):
    return x.new_empty(x.shape[0], qdata.shape[0] * 16)


@torch.library.register_fake("discq::qtip_linear_cpu")
def _qtip_fake(x, qdata, scale, s_in, s_out, q_in, q_out, lut, bias, bits, code, L):
    return x.new_empty(*x.shape[:-1], qdata.shape[0] * 16)


def available() -> bool:
    """The library is built (or buildable) and loaded."""
    return affine_cpu.load()


def viterbi(x: Tensor, values: Tensor, kV: int, overlap: Tensor | None = None) -> Tensor:
    """`viterbi.viterbi` in C++: x [B, T, V], values [2^L, V] -> states [B, T] int64."""
    L = values.shape[0].bit_length() - 1
    available()
    return torch.ops.discq.viterbi_cpu(x.float().contiguous(), values.float().t().contiguous(),
                                       L, kV, overlap)


supports = affine_cpu.serves  # CPU floats, no gradient, library available


def trellis_linear(x: Tensor, qdata: Tensor, lut: Tensor | None, bits: int, code: str,
                   state_bits: int = 16) -> Tensor:
    """x: [..., K] -> x Ŵᵀ [..., N] (Ŵ unscaled), in x's dtype. HYB without `lut`: the
    default table."""
    from .. import trellis
    lut = trellis.table_of(code, lut)
    x2 = x.reshape(-1, x.shape[-1]).float()
    y = torch.ops.discq.trellis_linear_cpu(x2, qdata, lut, bits, code, state_bits)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def qtip_linear(x: Tensor, qdata: Tensor, scale: Tensor, s_in: Tensor, s_out: Tensor,
                q_in: Tensor, q_out: Tensor, lut: Tensor | None, bias: Tensor | None, bits: int,
                code: str, state_bits: int = 16) -> Tensor:
    """QTIP's whole linear, s_out ⊙ T_outᵀ(scale · Ŵ̃ · T_in(s_in ⊙ x)) + b, in one C++ call:
    x [..., K] -> [..., N] in x's dtype (any number of rows: above 16 the weight is decoded
    once and multiplied by one GEMM)."""
    from .. import trellis
    return torch.ops.discq.qtip_linear_cpu(x, qdata, scale, s_in, s_out, q_in, q_out,
                                           trellis.table_of(code, lut), bias, bits, code,
                                           state_bits)
