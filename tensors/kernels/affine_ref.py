"""Reference (plain torch) dequantize-and-multiply for the packed affine grid.

This is the CPU path and the ground truth the Triton kernels are tested against. It is written in
ops Inductor fuses, so under `torch.compile` on CPU the unpack, dequantize and matmul become C++.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..grid import expand_groups
from ..packing import unpack_codes


def dequantize_packed(qdata: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int,
                      group_size: int, along_output: bool, in_features: int,
                      dtype: torch.dtype) -> Tensor:
    """Packed codes -> W: [N, K] in `dtype`. scale/zero_point are in row form (see grid.py):
    [N, G] for input grouping, [K, G] for output grouping."""
    codes = unpack_codes(qdata, bits, in_features)  # [N, K] uint8
    if along_output:
        codes = codes.t()  # row form [K, N]
    C = codes.shape[1]
    s = expand_groups(scale.float(), group_size, C)
    if zero_point is None:
        z = float(2 ** (bits - 1))
    else:
        z = expand_groups(zero_point.float(), group_size, C)
    Wr = (codes.float() - z) * s
    return (Wr.t() if along_output else Wr).to(dtype)


def round_activations(x: Tensor, block: int = 32) -> Tensor:
    """x rounded to 8 bits per block of `block` inputs along the last dim (llama.cpp's Q8_0):
    x̂ = d·round(x/d) with d = max|x_block| / 127, ties to even; computed in fp32 as the C++
    kernel does (x times 1/d), returned in x's dtype. K a multiple of `block`."""
    K = x.shape[-1]
    xb = x.float().reshape(*x.shape[:-1], K // block, block)  # [..., K/32, 32]
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    xq = torch.round(xb * inv).clamp(-127, 127)
    return (xq * d).reshape(x.shape).to(x.dtype)


def affine_linear_ref(x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor | None,
                      bias: Tensor | None, bits: int, group_size: int, along_output: bool,
                      in_features: int) -> Tensor:
    """y = x Wᵀ + b with W dequantized from the packed grid. x: [..., K] -> y: [..., N]."""
    W = dequantize_packed(qdata, scale, zero_point, bits, group_size, along_output,
                          in_features, x.dtype)
    return F.linear(x, W, bias)
