"""`torch.library` custom ops for quantized matmuls.

Each op is one node for `torch.compile(fullgraph=True)` and `torch.export` (a fake implementation
gives shapes), and is registered on import of discq, so a saved `ExportedProgram` reloads.
Inductor is additionally given a decomposition of the op into plain torch ops, so on CPU the
unpack, dequantize and matmul are compiled to fused C++ instead of running as an opaque call.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels.affine_ref import affine_linear_ref, dequantize_packed


@torch.library.custom_op("discq::affine_linear", mutates_args=())
def affine_linear(x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor | None,
                  bias: Tensor | None, bits: int, group_size: int, along_output: bool,
                  in_features: int) -> Tensor:
    """y = x Ŵᵀ + b for the packed affine grid (see `kernels/affine_ref.py` for the layout).
    CUDA runs the fused Triton kernels, other devices the torch reference (a device branch:
    a triton_op with a CPU kernel would fail under compile on CPU)."""
    if x.is_cuda and _triton_op() is not None:
        return _triton_op()(x, qdata, scale, zero_point, bias, bits, group_size, along_output,
                            in_features)
    return affine_linear_ref(x, qdata, scale, zero_point, bias, bits, group_size,
                             along_output, in_features)


def _triton_op():
    """`discq::affine_linear_triton` (kernels/affine_triton.py), or None without triton."""
    try:
        from .kernels import affine_triton  # noqa: F401  (registers the op)
    except ImportError:
        return None
    return torch.ops.discq.affine_linear_triton


@affine_linear.register_fake
def _affine_linear_fake(x, qdata, scale, zero_point, bias, bits, group_size, along_output,
                        in_features):
    N = qdata.shape[0]
    return x.new_empty(*x.shape[:-1], N)


def _setup_context(ctx, inputs, output):
    x, qdata, scale, zero_point, bias, bits, group_size, along_output, in_features = inputs
    ctx.save_for_backward(qdata, scale, zero_point)
    ctx.meta = (bits, group_size, along_output, in_features, bias is not None)


def _backward(ctx, grad_y):
    """Gradients for the activations and the bias (codes and scales are not trained here), so
    fine-tuning can train everything around a quantized layer."""
    qdata, scale, zero_point = ctx.saved_tensors
    bits, group_size, along_output, in_features, has_bias = ctx.meta
    W = dequantize_packed(qdata, scale, zero_point, bits, group_size, along_output,
                          in_features, grad_y.dtype)  # [N, K]
    grad_x = grad_y @ W  # [..., K]
    grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if has_bias else None
    return grad_x, None, None, None, grad_b, None, None, None, None


affine_linear.register_autograd(_backward, setup_context=_setup_context)


def _inductor_decomposition(x, qdata, scale, zero_point, bias, bits, group_size, along_output,
                            in_features):
    """CPU: the reference in plain ops, which Inductor fuses into C++. CUDA: the Triton
    triton_op, whose kernels Inductor sees and schedules."""
    if x.is_cuda and _triton_op() is not None:
        return _triton_op()(x, qdata, scale, zero_point, bias, bits, group_size, along_output,
                            in_features)
    return affine_linear_ref(x, qdata, scale, zero_point, bias, bits, group_size, along_output,
                             in_features)


def _register_inductor_decomposition() -> None:
    # Inductor's table only: torch.export keeps the op as one node, Inductor lowers it.
    from torch._inductor.decomposition import register_decomposition
    register_decomposition(torch.ops.discq.affine_linear.default)(_inductor_decomposition)


_register_inductor_decomposition()
