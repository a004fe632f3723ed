"""`torch.library` custom ops for quantized matmuls.

Each op is one node for `torch.compile(fullgraph=True)` and `torch.export` (a fake implementation
gives shapes), and is registered on import of discq, so a saved `ExportedProgram` reloads.

Where the matmul runs, by device and number of activation rows M:
- CUDA: the fused Triton kernels (`kernels/affine_triton.py`), seen by Inductor as a triton_op.
- CPU: the C++ kernel (`kernels/affine_cpu.cpp`). Up to 64 activation rows (decode, short
  prefill) it reads the packed codes once and never writes the dequantized weight — decode is
  bandwidth-bound, so this is where b-bit weights beat fp32; above, it dequantizes once and
  runs one fp32 GEMM. Where the kernel cannot serve (no compiler, output grouping, groups not
  a multiple of 8), the torch reference in plain ops, which Inductor fuses.
Inductor is given a decomposition that makes the same choice, so compiled programs call the
kernels directly.

`discq::affine_linear_q8` is the same product with x first rounded to 8 bits per block of 32
(llama.cpp's Q8_0 activations); on CPU its kernel (`kernels/affine_q8_cpu.cpp`) multiplies in
integers. Only `plain_linears(..., int8_activations=True)` calls it (`INT8_ACTIVATIONS`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from .kernels import affine_cpu
from .kernels.affine_ref import affine_linear_ref, dequantize_packed, round_activations


@torch.library.custom_op("discq::affine_linear", mutates_args=())
def affine_linear(x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor | None,
                  bias: Tensor | None, bits: int, group_size: int, along_output: bool,
                  in_features: int) -> Tensor:
    """y = x Ŵᵀ + b for the packed affine grid (see `kernels/affine_ref.py` for the layout)."""
    return dispatch(x, qdata, scale, zero_point, bias, bits, group_size, along_output,
                     in_features)


def dispatch(x, qdata, scale, zero_point, bias, bits, group_size, along_output, in_features):
    """The kernel for this device and shape (a device branch: a triton_op with a CPU kernel
    would fail under compile on CPU)."""
    if x.is_cuda and _triton_op() is not None:
        return _triton_op()(x, qdata, scale, zero_point, bias, bits, group_size, along_output,
                            in_features)
    if (affine_cpu.supports(x, scale, zero_point, bits, group_size, along_output)
            and affine_cpu.load()):
        return affine_cpu.affine_linear(x, qdata, scale, zero_point, bias, bits, group_size,
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


@torch.library.custom_op("discq::affine_linear_q8", mutates_args=())
def affine_linear_q8(x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor | None,
                     bias: Tensor | None, bits: int, group_size: int, along_output: bool,
                     in_features: int) -> Tensor:
    """`affine_linear` with x rounded to 8 bits per block of 32 inputs (x̂, llama.cpp's Q8_0
    activations): y = x̂ Ŵᵀ + b. On CPU the integer-dot kernel (`kernels/affine_q8_cpu.cpp`);
    elsewhere x̂ formed in torch, then `affine_linear`'s kernels."""
    return dispatch_q8(x, qdata, scale, zero_point, bias, bits, group_size, along_output,
                       in_features)


def dispatch_q8(x, qdata, scale, zero_point, bias, bits, group_size, along_output, in_features):
    if x.shape[-1] % 32:
        raise ValueError(f"8-bit activations round blocks of 32 inputs; in_features is "
                         f"{x.shape[-1]}: use float activations for this layer")
    if (affine_cpu.supports_q8(x, scale, zero_point, bits, group_size, along_output)
            and affine_cpu.load()):
        return affine_cpu.affine_linear(x, qdata, scale, zero_point, bias, bits, group_size,
                                        in_features, int8_activations=True)
    return dispatch(round_activations(x), qdata, scale, zero_point, bias, bits, group_size,
                    along_output, in_features)


@affine_linear_q8.register_fake
def _affine_linear_q8_fake(x, qdata, scale, zero_point, bias, bits, group_size, along_output,
                           in_features):
    return x.new_empty(*x.shape[:-1], qdata.shape[0])


# op with float activations -> its twin with 8-bit activations and the same arguments
# (discq.inference.plain_linears(..., int8_activations=True) swaps them)
INT8_ACTIVATIONS = {torch.ops.discq.affine_linear.default: torch.ops.discq.affine_linear_q8.default}


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


_LIB = torch.library.Library("discq", "FRAGMENT")


def composite_op(schema: str):
    """Decorator: define `discq::<schema>` with the function as its CompositeImplicitAutograd
    kernel. For formats whose linear is a few ops around a kernel op (a rotation, a low-rank
    term): one node in the graphs the export pass writes, decomposed by autograd, compile and
    `run_decompositions` into ops that each have their own kernels and gradients."""
    def deco(fn):
        name = schema.split("(", 1)[0]
        _LIB.define(schema)
        _LIB.impl(name, fn, "CompositeImplicitAutograd")
        return getattr(torch.ops.discq, name).default
    return deco


@composite_op("affine_lowrank_linear(Tensor x, Tensor qdata, Tensor scale, Tensor? zero_point, "
              "Tensor lowrank_u, Tensor lowrank_v, Tensor? bias, int bits, int group_size, "
              "bool along_output, int in_features) -> Tensor")
def _affine_lowrank_linear(x, qdata, scale, zero_point, U, V, bias, bits, group_size,
                           along_output, in_features):
    """y = x Ŵᵀ + (x Vᵀ) Uᵀ + b (LoRC: rank r, two thin matmuls)."""
    y = torch.ops.discq.affine_linear(x, qdata, scale, zero_point, bias, bits, group_size,
                                      along_output, in_features)
    return y + (x @ V.t().to(x.dtype)) @ U.t().to(x.dtype)


def _register_inductor_decomposition() -> None:
    # Inductor's table only: torch.export keeps the op as one node, Inductor lowers it to the
    # same choice as eager: the Triton triton_op, the C++ kernel (an extern call) or plain ops.
    from torch._inductor.decomposition import register_decomposition
    register_decomposition(torch.ops.discq.affine_linear.default)(dispatch)
    register_decomposition(torch.ops.discq.affine_linear_q8.default)(dispatch_q8)


def _tag_compile_caches() -> None:
    """torch.compile's on-disk caches key a program by its graph, not by how discq lowers its
    ops, so a program cached under an earlier discq could call kernels that no longer exist.
    Key them also by a hash of the lowering code (unless the user set a tag of their own)."""
    import torch.compiler.config as compiler_config
    if compiler_config.cache_key_tag:
        return
    here = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted([*here.rglob("*.py"), *here.rglob("*.cpp"), *here.rglob("*.h")]):
        h.update(f.read_bytes())
    compiler_config.cache_key_tag = f"discq-{h.hexdigest()[:12]}"


_register_inductor_decomposition()
_tag_compile_caches()
affine_cpu.load(build=False)  # an earlier build, if any: saved AOTInductor packages may call it
