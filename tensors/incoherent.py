"""`IncoherentQuantizedTensor`: an affine-quantized weight in a randomly rotated basis.

Stores W̃ = R_out W R_inᵀ on the affine grid (fields as in `AffineQuantizedTensor`) plus the
rotations' ±1 sign vectors s_in [K], s_out [N] and their small orthogonal factors q_in, q_out
(see hadamard.py). `F.linear` rotates the activations instead of the weight:
y = R_outᵀ · W̃ · R_in x + b; no dense n×n rotation is ever stored or formed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .affine import AffineQuantizedTensor
from .base import register_format
from .grid import AffineGrid
from .hadamard import (
    random_orthogonal,
    random_signs,
    rotate,
    rotate_weight,
    split_size,
    unrotate,
)

aten = torch.ops.aten


def rotation(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """(signs [n], orthogonal factor [m, m]) of a seeded randomized Hadamard transform."""
    m, _ = split_size(n)
    return random_signs(n, seed), random_orthogonal(m, seed + 1)


@register_format("affine_incoherent")
class IncoherentQuantizedTensor(AffineQuantizedTensor):
    tensor_data_names = ["qdata", "scale", "s_in", "s_out", "q_in", "q_out"]
    tensor_attribute_names = ["bits", "group_size", "group_along", "shape", "dtype"]
    optional_tensor_data_names = ["zero_point"]

    def __new__(cls, qdata, scale, s_in, s_out, q_in, q_out, bits, group_size, group_along,
                shape, dtype, zero_point=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata, scale, s_in, s_out, q_in, q_out, bits, group_size, group_along,
                 shape, dtype, zero_point=None):
        super().__init__(qdata, scale, bits, group_size, group_along, shape, dtype, zero_point)
        self.lowrank_u = self.lowrank_v = None  # LoRC is not combined with incoherence
        self.s_in, self.s_out, self.q_in, self.q_out = s_in, s_out, q_in, q_out

    @classmethod
    def from_hp(cls, W: Tensor, grid: AffineGrid, seed: int = 0) -> IncoherentQuantizedTensor:
        s_in, q_in = rotation(W.shape[1], seed)
        s_out, q_out = rotation(W.shape[0], seed + 7919)
        Wt = rotate_weight(W.detach().float(), s_out, s_in, q_out, q_in).to(W.dtype)
        inner = AffineQuantizedTensor.from_hp(Wt, grid)
        return cls.wrap(inner, s_in, s_out, q_in, q_out)

    @classmethod
    def wrap(cls, inner: AffineQuantizedTensor, s_in, s_out, q_in, q_out):
        """The rotated-basis weight `inner` with its rotations (fp16 signs, fp32 factors)."""
        return cls(inner.qdata, inner.scale, s_in.half(), s_out.half(), q_in.float(),
                   q_out.float(), inner.bits, inner.group_size, inner.group_along, inner.shape,
                   inner.dtype, zero_point=inner.zero_point)

    def rotated(self) -> AffineQuantizedTensor:
        """W̃ as a plain affine tensor."""
        return AffineQuantizedTensor(self.qdata, self.scale, self.bits, self.group_size,
                                     self.group_along, self.shape, self.dtype, self.zero_point)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        Wt = self.rotated().dequantize(torch.float32)
        A = unrotate(Wt, self.s_in.float(), self.q_in)  # W̃ R_in, row by row
        return unrotate(A.t(), self.s_out.float(), self.q_out).t().to(dtype or self.dtype)

    def validate(self) -> None:
        super().validate()
        N, K = self.shape
        if self.s_in.shape != (K,) or self.s_out.shape != (N,):
            raise ValueError(f"sign vectors are {tuple(self.s_in.shape)}/{tuple(self.s_out.shape)},"
                             f" expected ({K},)/({N},)")
        for name, q, n in (("q_in", self.q_in, K), ("q_out", self.q_out, N)):
            if q.shape != (split_size(n)[0],) * 2:
                raise ValueError(f"{name} is {tuple(q.shape)}, expected the odd factor of {n}")

    def __repr__(self) -> str:
        return super().__repr__().replace("AffineQuantizedTensor(", "IncoherentQuantizedTensor(", 1)


def _linear(x: Tensor, w: IncoherentQuantizedTensor, bias: Tensor | None) -> Tensor:
    xr = rotate(x, w.s_in, w.q_in)  # [..., K]
    yr = torch.ops.discq.affine_linear(xr, w.qdata, w.scale, w.zero_point, None, w.bits,
                                       w.group_size, w.group_along == "output", w.shape[1])
    y = unrotate(yr, w.s_out, w.q_out)  # [..., N]
    return y if bias is None else y + bias


@IncoherentQuantizedTensor.implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return _linear(args[0], args[1], bias)


@IncoherentQuantizedTensor.implements(aten.linear.default)
def _(func, types, args, kwargs):
    return _linear(args[0], args[1], args[2] if len(args) > 2 else None)
