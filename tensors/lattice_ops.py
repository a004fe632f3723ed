"""The `discq::e8p_linear` custom op: rotate, decode the lattice codes, multiply, rotate back
(on CPU, 2-bit codes: all of it in one C++ call, `discq::e8p_linear_cpu`).

One node for `torch.compile(fullgraph=True)` and `torch.export` (the fake implementation gives
the shape); registered when discq is imported, so saved programs reload. Autograd covers the
activations, the bias and the sign vectors s_in/s_out (which fine-tuning trains as real
numbers); the codes, the scale and the orthogonal factors are constants.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels import affine_cpu, e8p_ref, lattice_cpu
from .kernels.e8p_ref import e8p_linear_backward, e8p_linear_ref


@torch.library.custom_op("discq::e8p_decode", mutates_args=())
def e8p_decode(qdata: Tensor, bits: int) -> Tensor:
    """The unscaled rotated-basis weight [N, K] fp32 of packed lattice codes. An op of its own
    so that traced backward graphs (which decode the weight again) see one node, not a lookup
    into the cached codebook table."""
    return _decoder(qdata)(qdata, bits)


def _decoder(qdata: Tensor):
    """Triton's decode on CUDA (kernels/e8p_triton.py), the torch reference elsewhere."""
    if qdata.is_cuda:
        try:
            from .kernels.e8p_triton import decode_weight_triton
            return decode_weight_triton
        except ImportError:  # no triton: the reference runs on CUDA too
            pass
    return e8p_ref.decode_weight


@e8p_decode.register_fake
def _e8p_decode_fake(qdata, bits):
    return qdata.new_empty(qdata.shape[0], qdata.shape[1] // bits * 8, dtype=torch.float32)


@torch.library.custom_op("discq::e8p_linear", mutates_args=())
def e8p_linear(x: Tensor, qdata: Tensor, scale: Tensor, s_in: Tensor, s_out: Tensor,
               q_in: Tensor, q_out: Tensor, bias: Tensor | None, bits: int) -> Tensor:
    """y = s_out ⊙ T_outᵀ(scale·Ŵ̃ · T_in(s_in ⊙ x)) + b (see `kernels/e8p_ref.py`)."""
    if bits == 2 and affine_cpu.serves(x):  # the whole linear in one C++ call
        return lattice_cpu.e8p_linear(x, qdata, scale, s_in, s_out, q_in, q_out, bias)
    return e8p_linear_ref(x, qdata, scale, s_in, s_out, q_in, q_out, bias, bits,
                          decode=_decoder(qdata))


@e8p_linear.register_fake
def _e8p_linear_fake(x, qdata, scale, s_in, s_out, q_in, q_out, bias, bits):
    return x.new_empty(*x.shape[:-1], qdata.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, qdata, scale, s_in, s_out, q_in, q_out, bias, bits = inputs
    ctx.save_for_backward(x, qdata, scale, s_in, s_out, q_in, q_out)
    ctx.bits, ctx.has_bias = bits, bias is not None


def _backward(ctx, grad_y: Tensor):
    x, qdata, scale, s_in, s_out, q_in, q_out = ctx.saved_tensors
    need = ctx.needs_input_grad
    W = torch.ops.discq.e8p_decode(qdata, ctx.bits)  # [N, K]
    g_x, g_s_in, g_s_out = e8p_linear_backward(grad_y, x, W, scale, s_in, s_out, q_in, q_out,
                                               need_s_out=need[4])
    batch = tuple(range(grad_y.dim() - 1))
    g_b = grad_y.sum(batch) if ctx.has_bias and need[7] else None
    return (g_x if need[0] else None, None, None,
            g_s_in.to(s_in.dtype) if need[3] else None,
            g_s_out.to(s_out.dtype) if need[4] else None, None, None, g_b, None)


e8p_linear.register_autograd(_backward, setup_context=_setup_context)
