"""`discq::gguf_linear_cpu`: y = x Ŵᵀ + b with Ŵ in llama.cpp's blocks, fused on CPU
(`gguf_cpu.cpp`, built into the same library as the affine kernel by `affine_cpu.load`).

Declared here (schema and fake, so compile and export can trace it); `tensors/gguf.py` calls it
for CPU inference and keeps the decode-then-matmul reference for gradients and other devices.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import affine_cpu

torch.library.define(
    "discq::gguf_linear_cpu",
    "(Tensor x, Tensor qdata, Tensor? bias, str ggml_type, int in_features) -> Tensor")


@torch.library.register_fake("discq::gguf_linear_cpu")
def _fake(x, qdata, bias, ggml_type, in_features):
    return x.new_empty(x.shape[0], qdata.shape[0])


def supports(x: Tensor) -> bool:
    """CPU floats with nothing to differentiate (the kernel has no backward), and the library
    built or buildable."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    return (x.device.type == "cpu" and x.dtype in affine_cpu.FLOATS and not needs_grad
            and affine_cpu.load())


def gguf_linear(x: Tensor, qdata: Tensor, bias: Tensor | None, ggml_type: str,
                in_features: int) -> Tensor:
    """x: [..., K] -> [..., N] through the C++ kernel."""
    y = torch.ops.discq.gguf_linear_cpu(x.reshape(-1, x.shape[-1]), qdata, bias, ggml_type,
                                        in_features)
    return y.reshape(*x.shape[:-1], qdata.shape[0])
