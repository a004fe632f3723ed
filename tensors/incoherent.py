"""`IncoherentQuantizedTensor`: an affine-quantized weight in a randomly rotated basis.

Stores W̃ = R_out W R_inᵀ on the affine grid (fields as in `AffineQuantizedTensor`) plus the
rotations' ±1 sign vectors s_in [K], s_out [N] and their small orthogonal factors q_in, q_out
(see hadamard.py). `F.linear` rotates the activations instead of the weight:
y = R_outᵀ · W̃ · R_in x + b; no dense n×n rotation is ever stored or formed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .affine import AffineQuantizedTensor
from .base import QuantizedTensor, register_format
from .grid import AffineGrid
from .hadamard import layer_rotation, rotate, rotate_weight, split_size, unrotate
from .ops import composite_op


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
        s_in, s_out, q_in, q_out = layer_rotation(*W.shape, seed)
        Wt = rotate_weight(W.detach().float(), s_out, s_in, q_out, q_in).to(W.dtype)
        inner = AffineQuantizedTensor.from_hp(Wt, grid)
        return cls.wrap(inner, s_in, s_out, q_in, q_out)

    @classmethod
    def wrap(cls, inner: AffineQuantizedTensor, s_in, s_out, q_in, q_out):
        """The rotated-basis weight `inner` with its rotations (fp16 signs, fp32 factors)."""
        return cls(inner.qdata, inner.scale, s_in.half(), s_out.half(), q_in.float(),
                   q_out.float(), inner.bits, inner.group_size, inner.group_along, inner.shape,
                   inner.dtype, zero_point=inner.zero_point)

    @classmethod
    def stack_outputs(cls, weights) -> None:
        """Not stackable: the output rotation mixes every output channel of its own weight."""
        return None

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

    def linear_call(self, x, bias, t):
        return torch.ops.discq.incoherent_linear.default, (
            x, t["qdata"], t["scale"], t.get("zero_point"), t["s_in"], t["s_out"], t["q_in"],
            t["q_out"], bias, self.bits, self.group_size, self.group_along == "output",
            self.shape[1])

    linear = QuantizedTensor.linear  # not the plain-affine eager shortcut

    def __repr__(self) -> str:
        return super().__repr__().replace("AffineQuantizedTensor(", "IncoherentQuantizedTensor(", 1)


@composite_op("incoherent_linear(Tensor x, Tensor qdata, Tensor scale, Tensor? zero_point, "
              "Tensor s_in, Tensor s_out, Tensor q_in, Tensor q_out, Tensor? bias, int bits, "
              "int group_size, bool along_output, int in_features) -> Tensor")
def _incoherent_linear(x, qdata, scale, zero_point, s_in, s_out, q_in, q_out, bias, bits,
                       group_size, along_output, in_features):
    """y = R_outᵀ W̃ R_in x + b: the activations are rotated, never the weight."""
    xr = rotate(x, s_in, q_in)  # [..., K]
    yr = torch.ops.discq.affine_linear(xr, qdata, scale, zero_point, None, bits, group_size,
                                       along_output, in_features)
    y = unrotate(yr, s_out, q_out)  # [..., N]
    return y if bias is None else y + bias
