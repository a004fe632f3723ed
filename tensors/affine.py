"""`AffineQuantizedTensor`: a weight on the uniform affine grid, codes bit-packed.

Fields:
  qdata       uint8 [N, packed_width(K, bits)]  codes packed along the input dimension
  scale       [R, G] in row form (R = N for input grouping, R = K for output grouping)
  zero_point  [R, G] uint8 or None (symmetric grid: the zero is fixed at 2^(bits-1))
Attributes: bits, group_size (the resolved group length), group_along, shape, dtype.

`F.linear` with this tensor as weight calls the `discq::affine_linear` custom op, so compiled and
exported graphs see one node. Nothing is packed or fitted in forward: `from_hp` does all of it.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import ops  # registers torch.ops.discq.*; ops.dispatch picks the kernel
from .base import QuantizedTensor, register_format
from .grid import (
    AffineGrid,
    check_bits,
    from_rows,
    quantize_rows,
    resolved_group_size,
    storage_dtype,
    to_rows,
)
from .kernels.affine_ref import dequantize_packed
from .packing import pack_codes, packed_width, unpack_codes


@register_format("affine")
class AffineQuantizedTensor(QuantizedTensor):
    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["bits", "group_size", "group_along", "shape", "dtype"]
    optional_tensor_data_names = ["zero_point", "lowrank_u", "lowrank_v"]

    def __new__(cls, qdata, scale, bits, group_size, group_along, shape, dtype,
                zero_point=None, lowrank_u=None, lowrank_v=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata: Tensor, scale: Tensor, bits: int, group_size: int,
                 group_along: str, shape, dtype: torch.dtype, zero_point: Tensor | None = None,
                 lowrank_u: Tensor | None = None, lowrank_v: Tensor | None = None):
        self.lowrank_u, self.lowrank_v = lowrank_u, lowrank_v  # LoRC: W ≈ Ŵ + U V
        self.qdata = qdata
        self.scale = scale
        self.zero_point = zero_point
        self.bits = bits
        self.group_size = group_size
        self.group_along = group_along

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_hp(cls, W: Tensor, grid: AffineGrid) -> AffineQuantizedTensor:
        """Round W: [N, K] to the nearest point of `grid` and pack the codes."""
        codes_r, scale, zero = quantize_rows(to_rows(W.detach(), grid), grid,
                                             storage_dtype(grid, W.dtype))
        return cls.from_codes(from_rows(codes_r, grid), scale, zero, grid, W.dtype)

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor | None, grid: AffineGrid,
                   dtype: torch.dtype) -> AffineQuantizedTensor:
        """Pack codes: [N, K] (weight orientation) with row-form scale/zero [R, G]. Used by every
        rounding method: they choose codes, this stores them."""
        N, K = codes.shape
        g = resolved_group_size(grid, K if grid.group_along == "input" else N)
        return cls(pack_codes(codes, grid.bits), scale, grid.bits, g, grid.group_along,
                   torch.Size([N, K]), dtype, zero_point=zero)

    @classmethod
    def stack_outputs(cls, weights: list[QuantizedTensor]) -> AffineQuantizedTensor | None:
        """Input groups only (a row's codes, scales and zero points are that row's alone), one
        grid, no low-rank term."""
        w0 = weights[0]

        def kind(w):
            return (type(w), w.bits, w.group_size, w.group_along, w.shape[1], w.dtype,
                    w.scale.dtype, w.zero_point is None, w.lowrank_u is None, w.qdata.device)
        if (w0.group_along != "input" or w0.lowrank_u is not None
                or any(kind(w) != kind(w0) for w in weights)):
            return None
        z = None if w0.zero_point is None else torch.cat([w.zero_point for w in weights])
        N = sum(w.shape[0] for w in weights)
        return cls(torch.cat([w.qdata for w in weights]), torch.cat([w.scale for w in weights]),
                   w0.bits, w0.group_size, "input", torch.Size([N, w0.shape[1]]), w0.dtype,
                   zero_point=z)

    # ---- views ----------------------------------------------------------------------------
    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def grid(self) -> AffineGrid:
        return AffineGrid(self.bits, self.group_size, self.symmetric, self.group_along,
                          self.scale.dtype)

    def codes(self) -> Tensor:
        """Unpacked codes: [N, K] uint8."""
        return unpack_codes(self.qdata, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        W = dequantize_packed(self.qdata, self.scale, self.zero_point, self.bits,
                              self.group_size, self.group_along == "output", self.shape[1],
                              dtype or self.dtype)
        if self.lowrank_u is not None:
            W = W + (self.lowrank_u.float() @ self.lowrank_v.float()).to(W.dtype)
        return W

    def rows(self, idx: Tensor) -> Tensor:
        """Rows idx [n] -> [n, K]; input groups keep each row's codes and scales in that row."""
        if self.group_along != "input" or self.lowrank_u is not None:
            return super().rows(idx)
        # index_select, not [idx]: the backward of advanced indexing (index_put_ with
        # accumulate) sums a repeated row's gradients in a thread-dependent order on CPU
        z = None if self.zero_point is None else self.zero_point.index_select(0, idx)
        return dequantize_packed(self.qdata[idx], self.scale.index_select(0, idx), z, self.bits,
                                 self.group_size, False, self.shape[1], self.dtype)

    def validate(self) -> None:
        N, K = self.shape
        check_bits(self.bits)
        if self.group_along not in ("input", "output") or int(self.group_size) <= 0:
            raise ValueError(f"bad group_along/group_size {self.group_along!r}/{self.group_size}")
        if self.qdata.dtype != torch.uint8 or tuple(self.qdata.shape) != (N, packed_width(K, self.bits)):
            raise ValueError(f"qdata is {tuple(self.qdata.shape)} {self.qdata.dtype}, expected "
                             f"{(N, packed_width(K, self.bits))} uint8 for {self.bits}-bit {N}x{K}")
        R, C = (N, K) if self.group_along == "input" else (K, N)
        G = -(-C // self.group_size)
        if tuple(self.scale.shape) != (R, G) or not self.scale.is_floating_point():
            raise ValueError(f"scale is {tuple(self.scale.shape)} {self.scale.dtype}, expected "
                             f"{(R, G)} float")
        z = self.zero_point
        if z is not None and (tuple(z.shape) != (R, G) or z.dtype != torch.uint8):
            raise ValueError(f"zero_point is {tuple(z.shape)} {z.dtype}, expected {(R, G)} uint8")
        U, V = self.lowrank_u, self.lowrank_v
        if (U is None) != (V is None) or (U is not None and (
                U.dim() != 2 or V.dim() != 2 or U.shape[0] != N or V.shape[1] != K
                or U.shape[1] != V.shape[0])):
            raise ValueError(f"low-rank factors must be U [{N}, r] and V [r, {K}]")

    # ---- F.linear --------------------------------------------------------------------------
    def linear_call(self, x, bias, t):
        meta = (self.bits, self.group_size, self.group_along == "output", self.shape[1])
        if t.get("lowrank_u") is None:
            return torch.ops.discq.affine_linear.default, (
                x, t["qdata"], t["scale"], t.get("zero_point"), bias, *meta)
        # LoRC: y = x Ŵᵀ + (x Vᵀ) Uᵀ + b, one composite op (ops.py)
        return torch.ops.discq.affine_lowrank_linear.default, (
            x, t["qdata"], t["scale"], t.get("zero_point"), t["lowrank_u"], t["lowrank_v"],
            bias, *meta)

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if self.lowrank_u is None and _plain_eager(x, bias):
            # the custom op's Python dispatch costs more than a small layer's matmul (~35 µs
            # on 2 CPU cores): plain eager inference calls the kernel directly
            return ops.dispatch(x, self.qdata, self.scale, self.zero_point, bias, self.bits,
                                self.group_size, self.group_along == "output", self.shape[1])
        return super().linear(x, bias)

    def __repr__(self) -> str:
        sym = "symmetric" if self.symmetric else "asymmetric"
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, bits={self.bits}, "
                f"group_size={self.group_size}, group_along={self.group_along!r}, {sym}, "
                f"scale_dtype={self.scale.dtype}, dtype={self.dtype}, device={self.device})")


def _plain_eager(x: Tensor, bias: Tensor | None) -> bool:
    """No compiler, tracer or dispatch mode around, and nothing to differentiate."""
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad))
    return (type(x) is Tensor and not needs_grad and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode())
