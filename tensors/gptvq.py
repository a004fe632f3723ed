"""`VectorQuantizedTensor`: a weight coded with vector codebooks (GPTVQ; layout in `vq.py`), and
its op `discq::vq_linear`.

Fields:
  qdata        uint8 [N, index_width]   packed indices, bits·dim bits per vector of `dim` weights
  codebook     int8  [G_r, G_c, E, dim] one codebook per group of rows × columns
  scale        fp16  [G_r, G_c]         each codebook's scale
  block_scale  uint8 [1, N·K/scale_block/2] or absent: 4-bit log-domain block scales
Attributes: bits, vector_dim (weights a vector), scale_block (0: none), shape, dtype.

`F.linear` never forms W for few activation rows on CPU (the C++ kernel decodes a row at a
time); otherwise the weight is decoded (Triton on CUDA) and multiplied.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import vq
from .kmeans import assign, kmeans
from .base import QuantizedTensor, register_format
from .kernels import vq_cpu

KERNEL_ROWS = 16  # up to this many activation rows the fused CPU kernel; above, decode + GEMM


# ---- the op ---------------------------------------------------------------------------------

def decode(qdata: Tensor, codebook: Tensor, scale: Tensor, block_scale: Tensor | None,
           bits: int, dim: int, K: int, scale_block: int) -> Tensor:
    """Ŵ [N, K] fp32: Triton's decode on CUDA (kernels/vq_triton.py), the reference elsewhere."""
    if qdata.is_cuda:
        try:
            from .kernels.vq_triton import decode_weight_triton
            return decode_weight_triton(qdata, codebook, scale, block_scale, bits, dim, K,
                                        scale_block)
        except ImportError:  # no triton: the reference runs on CUDA too
            pass
    return vq.decode_weight(qdata, codebook, scale, block_scale, bits, dim, K, scale_block)


@torch.library.custom_op("discq::vq_linear", mutates_args=())
def vq_linear(x: Tensor, qdata: Tensor, codebook: Tensor, scale: Tensor,
              block_scale: Tensor | None, bias: Tensor | None, bits: int, dim: int,
              scale_block: int) -> Tensor:
    """y = x Ŵᵀ + b. x: [..., K] -> [..., N]."""
    K = x.shape[-1]
    if x.numel() // K <= KERNEL_ROWS and vq_cpu.supports(x):
        y = vq_cpu.vq_linear(x, qdata, codebook, scale, block_scale, bits, dim, scale_block)
    else:
        W = decode(qdata, codebook, scale, block_scale, bits, dim, K, scale_block)
        y = x @ W.to(x.dtype).t()
    return y if bias is None else y + bias


@vq_linear.register_fake
def _linear_fake(x, qdata, codebook, scale, block_scale, bias, bits, dim, scale_block):
    return x.new_empty(*x.shape[:-1], qdata.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, qdata, codebook, scale, block_scale, bias, bits, dim, scale_block = inputs
    ctx.save_for_backward(qdata, codebook, scale, block_scale)
    ctx.meta = (bits, dim, scale_block, x.shape[-1], bias is not None)


def _backward(ctx, grad_y: Tensor):
    """Gradients of the activations and the bias (codes and codebooks are constants here), so
    fine-tuning can train everything around a quantized layer."""
    qdata, codebook, scale, block_scale = ctx.saved_tensors
    bits, dim, scale_block, K, has_bias = ctx.meta
    W = decode(qdata, codebook, scale, block_scale, bits, dim, K, scale_block)
    grad_x = grad_y @ W.to(grad_y.dtype)
    grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if has_bias else None
    return grad_x, None, None, None, None, grad_b, None, None, None


vq_linear.register_autograd(_backward, setup_context=_setup_context)


# ---- the format -----------------------------------------------------------------------------

@register_format("gptvq")
class VectorQuantizedTensor(QuantizedTensor):
    tensor_data_names = ["qdata", "codebook", "scale"]
    optional_tensor_data_names = ["block_scale"]
    tensor_attribute_names = ["bits", "vector_dim", "scale_block", "shape", "dtype"]

    def __new__(cls, qdata, codebook, scale, bits, vector_dim, scale_block, shape, dtype,
                block_scale=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata: Tensor, codebook: Tensor, scale: Tensor, bits: int,
                 vector_dim: int, scale_block: int, shape, dtype: torch.dtype,
                 block_scale: Tensor | None = None):
        self.qdata, self.codebook, self.scale, self.block_scale = qdata, codebook, scale, \
            block_scale
        # not `dim`: a tensor's dim() is a method every tracer calls
        self.bits, self.vector_dim, self.scale_block = bits, vector_dim, scale_block

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_indices(cls, idx: Tensor, codebook: Tensor, scale: Tensor, bits: int, dim: int,
                     dtype: torch.dtype, exponents: Tensor | None = None,
                     scale_block: int = 0) -> VectorQuantizedTensor:
        """idx: [N, K/dim] indices into int8 codebooks [G_r, G_c, E, dim] with fp16 scales
        [G_r, G_c]; `exponents` [N, K/scale_block] the block scales' e (or None)."""
        N, V = idx.shape
        packed = None if exponents is None else vq.pack_block_scales(exponents)
        out = cls(vq.pack_indices(idx, bits, dim), codebook.to(torch.int8).contiguous(),
                  scale.half().contiguous(), bits, dim, scale_block if packed is not None else 0,
                  torch.Size([N, V * dim]), dtype, block_scale=packed)
        out.validate()
        return out

    @classmethod
    def from_hp(cls, W: Tensor, bits: int = 2, dim: int = 2, group_size: int | None = None,
                kmeans_iters: int = 25) -> VectorQuantizedTensor:
        """Data-free coding of W: [N, K]: k-means codebooks per group, nearest codewords (the
        baseline GPTVQ's Hessian feedback improves on)."""
        fit = kmeans_codebooks(W, bits, dim, group_size, kmeans_iters)
        idx = assign(fit.X, torch.ones_like(fit.X[:1, :1]), fit.values())
        return cls.from_indices(fit.back(idx), fit.codebook, fit.scale, bits, dim, W.dtype)

    # ---- views ----------------------------------------------------------------------------
    def indices(self) -> Tensor:
        """[N, K/dim] int64."""
        return vq.unpack_indices(self.qdata, self.bits, self.vector_dim, self.shape[1])

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        W = vq.decode_weight(self.qdata, self.codebook, self.scale, self.block_scale, self.bits,
                             self.vector_dim, self.shape[1], self.scale_block)
        return W.to(dtype or self.dtype)

    def validate(self) -> None:
        N, K = self.shape
        vq.check_bits_dim(self.bits, self.vector_dim)
        vq.check_shape(N, K, self.vector_dim, self.scale_block or None)
        want = (N, vq.index_width(K, self.bits, self.vector_dim))
        if self.qdata.dtype != torch.uint8 or tuple(self.qdata.shape) != want:
            raise ValueError(f"qdata is {tuple(self.qdata.shape)} {self.qdata.dtype}, expected "
                             f"{want} uint8 for {self.bits}-bit dim-{self.vector_dim} {N}x{K}")
        cb, d = self.codebook, self.vector_dim
        E = vq.entries(self.bits, d)
        tiles = (cb.dim() == 4 and min(cb.shape[:2]) > 0 and N % cb.shape[0] == 0
                 and K % cb.shape[1] == 0 and (K // cb.shape[1]) % d == 0)
        if cb.dtype != torch.int8 or not tiles or tuple(cb.shape[2:]) != (E, d):
            raise ValueError(f"codebook is {tuple(cb.shape)} {cb.dtype}, expected int8 "
                             f"[G_r, G_c, {E}, {d}] tiling {N}x{K}")
        if self.scale.dtype != torch.float16 or tuple(self.scale.shape) != tuple(cb.shape[:2]):
            raise ValueError(f"scale is {tuple(self.scale.shape)} {self.scale.dtype}, expected "
                             f"float16 {tuple(cb.shape[:2])}")
        self._validate_block_scale()

    def _validate_block_scale(self) -> None:
        N, K = self.shape
        if (self.block_scale is None) != (self.scale_block == 0):
            raise ValueError(f"scale_block={self.scale_block} but block_scale is "
                             f"{'absent' if self.block_scale is None else 'present'}")
        if self.block_scale is not None:
            want = (1, vq.block_scale_width(N, K, self.scale_block))
            if self.block_scale.dtype != torch.uint8 or tuple(self.block_scale.shape) != want:
                raise ValueError(f"block_scale is {tuple(self.block_scale.shape)} "
                                 f"{self.block_scale.dtype}, expected {want} uint8")

    def linear_call(self, x, bias, t):
        return torch.ops.discq.vq_linear.default, (
            x, t["qdata"], t["codebook"], t["scale"], t.get("block_scale"), bias, self.bits,
            self.vector_dim, self.scale_block)

    def __repr__(self) -> str:
        GR, GC = self.codebook.shape[:2]
        return (f"VectorQuantizedTensor(shape={tuple(self.shape)}, bits={self.bits}, "
                f"dim={self.vector_dim}, codebooks={GR}x{GC} of {self.codebook.shape[2]}, "
                f"scale_block={self.scale_block}, dtype={self.dtype}, device={self.device})")


@dataclass
class KMeansCodebooks:
    """Codebooks fitted by unweighted k-means on W's own vectors: X [G, P, d] the vectors of each
    group, codebook int8 [G_r, G_c, E, d], scale fp16 [G_r, G_c]."""

    X: Tensor
    codebook: Tensor
    scale: Tensor
    N: int
    K: int
    R_g: int
    C_g: int
    dim: int

    def values(self) -> Tensor:
        """The stored codebooks as floats, one per group in `X`'s order: [G, E, d]."""
        return vq.codebook_values(self.codebook, self.scale).flatten(0, 1)

    def back(self, a: Tensor) -> Tensor:
        """Per-vector values [G, P] in weight order [N, K/d]."""
        return from_groups(a, self.N, self.K, self.R_g, self.C_g, self.dim)


def kmeans_codebooks(W: Tensor, bits: int, dim: int, group_size: int | None, iters: int
                     ) -> KMeansCodebooks:
    """k-means codebooks of W: [N, K] per group of about `group_size` weights (default: 0.125
    bits a weight), rounded to int8 (`from_hp` and DiscQuant's relaxation start from them)."""
    vq.check_bits_dim(bits, dim)
    N, K = W.shape
    vq.check_shape(N, K, dim)
    R_g, C_g = vq.group_shape(N, K, dim, group_size or vq.default_group_size(bits, dim))
    X = to_groups(W.detach().float(), R_g, C_g, dim)  # [G, P, d]
    C, _ = kmeans(X, torch.ones_like(X[:1, :1]), vq.entries(bits, dim), iters)
    codebook, scale = vq.int8_codebook(C)
    GR, GC = N // R_g, K // C_g
    return KMeansCodebooks(X, codebook.view(GR, GC, -1, dim), scale.view(GR, GC), N, K, R_g,
                           C_g, dim)


def to_groups(W: Tensor, R_g: int, C_g: int, dim: int) -> Tensor:
    """W: [N, K] -> the vectors of each codebook group, [G_r·G_c, R_g·C_g/dim, dim] (groups in
    row-major order, vectors row by row within a group)."""
    N, K = W.shape
    GR, GC = N // R_g, K // C_g
    X = W.reshape(GR, R_g, GC, C_g // dim, dim).permute(0, 2, 1, 3, 4)
    return X.reshape(GR * GC, R_g * C_g // dim, dim)


def from_groups(a: Tensor, N: int, K: int, R_g: int, C_g: int, dim: int) -> Tensor:
    """Inverse of `to_groups` for per-vector values a: [G, P] -> [N, K/dim]."""
    GR, GC = N // R_g, K // C_g
    return a.reshape(GR, GC, R_g, C_g // dim).permute(0, 2, 1, 3).reshape(N, K // dim)
