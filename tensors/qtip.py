"""`TrellisQuantizedTensor`: a weight coded with QTIP's bitshift trellis (`trellis.py`) in a
randomly rotated basis, and its op `discq::qtip_linear`.

The weight W: [N, K] is stored as W̃ = R_out W R_inᵀ ≈ scale · Ŵ̃, Ŵ̃ the trellis-coded matrix,
16×16 tiles of exactly `bits` bits a weight. Fields:
  qdata   int32 [N/16, K/16, 8·bits]  each tile's tail-biting bitstream
  scale   fp32 []                     one global scale
  s_in fp16 [K], s_out fp16 [N]       the rotations' sign vectors (real after fine-tuning)
  q_in, q_out  fp32 [m, m]            the rotations' small orthogonal factors (hadamard.py)
  lut     fp16 [2^Q, 2] or absent     HYB's table when fine-tuning changed it (absent: the
                                      default table, `trellis.hyb_table`, not stored)
Attributes: bits (2, 3 or 4), code ("1mad", "3inst", "hyb"), state_bits (L, 16 in QTIP),
shape, dtype.

`F.linear` never forms W: y = s_out ⊙ T_outᵀ(scale · Ŵ̃ · T_in(s_in ⊙ x)), with x·Ŵ̃ᵀ from the
C++ kernel on CPU for few rows (tiles decoded on the fly), else decode (Triton on CUDA) then
matmul.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import trellis
from .base import QuantizedTensor, register_format
from .hadamard import (check_rotation, layer_rotation, rotate, rotate_weight, unrotate,
                       unrotate_weight)
from .kernels import trellis_cpu
from .kernels.e8p_ref import e8p_linear_backward
from .viterbi import quantize_tiles

KERNEL_ROWS = 16  # up to this many activation rows the fused CPU kernel; above, decode + GEMM
# RMS of the coded matrix relative to the code's own RMS (QTIP's scale override): BlockLDLQ's
# feedback widens the values it rounds, so they are aimed a little inside the code
SCALE_OVERRIDE = 0.9


def check_shape(N: int, K: int) -> None:
    if N % trellis.TILE or K % trellis.TILE:
        raise ValueError(f"trellis codes take 16×16 tiles: a {N}x{K} weight is not a multiple "
                         f"of 16 on both sides; leave this layer out with filter_fn")


# ---- the op ---------------------------------------------------------------------------------

@torch.library.custom_op("discq::qtip_decode", mutates_args=())
def qtip_decode(qdata: Tensor, lut: Tensor | None, bits: int, code: str,
                state_bits: int) -> Tensor:
    """The unscaled coded matrix [N, K] fp32 (an op of its own so backward graphs see one
    node)."""
    return _decode(qdata, bits, code, lut, state_bits)


def _decode(qdata: Tensor, bits: int, code: str, lut: Tensor | None, state_bits: int) -> Tensor:
    """Triton's decode on CUDA (kernels/trellis_triton.py), the torch reference elsewhere."""
    if qdata.is_cuda:
        try:
            from .kernels.trellis_triton import decode_weight_triton
            return decode_weight_triton(qdata, bits, code, lut, state_bits)
        except ImportError:  # no triton: the reference runs on CUDA too
            pass
    return trellis.decode_weight(qdata, bits, code, lut, state_bits)


@qtip_decode.register_fake
def _decode_fake(qdata, lut, bits, code, state_bits):
    return qdata.new_empty(qdata.shape[0] * 16, qdata.shape[1] * 16, dtype=torch.float32)


def _rotated_product(xr: Tensor, qdata: Tensor, lut: Tensor | None, bits: int, code: str,
                     state_bits: int) -> Tensor:
    """xr Ŵ̃ᵀ: xr [..., K] (rotated activations) -> [..., N]."""
    rows = xr.numel() // xr.shape[-1]
    if rows <= KERNEL_ROWS and trellis_cpu.supports(xr):
        return trellis_cpu.trellis_linear(xr, qdata, lut, bits, code, state_bits)
    return xr @ _decode(qdata, bits, code, lut, state_bits).to(xr.dtype).t()


@torch.library.custom_op("discq::qtip_linear", mutates_args=())
def qtip_linear(x: Tensor, qdata: Tensor, scale: Tensor, s_in: Tensor, s_out: Tensor,
                q_in: Tensor, q_out: Tensor, lut: Tensor | None, bias: Tensor | None,
                bits: int, code: str, state_bits: int) -> Tensor:
    """y = s_out ⊙ T_outᵀ(scale · Ŵ̃ · T_in(s_in ⊙ x)) + b. x: [..., K] -> [..., N]."""
    if trellis_cpu.supports(x):  # the whole linear in one C++ call
        return trellis_cpu.qtip_linear(x, qdata, scale, s_in, s_out, q_in, q_out, lut, bias,
                                       bits, code, state_bits)
    y = _rotated_product(rotate(x, s_in, q_in), qdata, lut, bits, code, state_bits)
    y = unrotate(y * scale.to(y.dtype), s_out, q_out)
    return y if bias is None else y + bias


@qtip_linear.register_fake
def _linear_fake(x, qdata, scale, s_in, s_out, q_in, q_out, lut, bias, bits, code, state_bits):
    return x.new_empty(*x.shape[:-1], qdata.shape[0] * 16)


def _setup_context(ctx, inputs, output) -> None:
    x, qdata, scale, s_in, s_out, q_in, q_out, lut, bias, bits, code, state_bits = inputs
    ctx.save_for_backward(x, qdata, scale, s_in, s_out, q_in, q_out, lut)
    ctx.bits, ctx.code, ctx.state_bits, ctx.has_bias = bits, code, state_bits, bias is not None


def _backward(ctx, grad_y: Tensor):
    """Gradients of the activations, the sign vectors, the bias and (HYB) the table; the codes,
    the scale and the orthogonal factors are constants."""
    x, qdata, scale, s_in, s_out, q_in, q_out, lut = ctx.saved_tensors
    need = ctx.needs_input_grad
    W = torch.ops.discq.qtip_decode(qdata, lut, ctx.bits, ctx.code, ctx.state_bits)  # [N, K]
    g_x, g_s_in, g_s_out = e8p_linear_backward(grad_y, x, W, scale, s_in, s_out, q_in, q_out,
                                               need_s_out=need[4])
    g_lut = None
    if lut is not None and need[7]:
        g_W = _weight_grad(grad_y, x, scale, s_in, s_out, q_in, q_out)
        g_lut = trellis.hyb_table_grad(qdata, ctx.bits, g_W, lut.shape[0], ctx.state_bits)
        g_lut = g_lut.to(lut.dtype)
    g_b = grad_y.sum(tuple(range(grad_y.dim() - 1))) if ctx.has_bias and need[8] else None
    return (g_x if need[0] else None, None, None,
            g_s_in.to(s_in.dtype) if need[3] else None,
            g_s_out.to(s_out.dtype) if need[4] else None, None, None, g_lut, g_b, None, None,
            None)


def _weight_grad(grad_y, x, scale, s_in, s_out, q_in, q_out) -> Tensor:
    """∂L/∂Ŵ̃ [N, K] = scale · g_zᵀ r, g_z = T_out(s_out ⊙ ∂y), r = T_in(s_in ⊙ x)."""
    g_z = rotate(grad_y, s_out, q_out).reshape(-1, grad_y.shape[-1])  # [M, N]
    r = rotate(x.to(grad_y.dtype), s_in, q_in).reshape(-1, x.shape[-1])  # [M, K]
    return (g_z.t() @ r).float() * scale.float()


qtip_linear.register_autograd(_backward, setup_context=_setup_context)


# ---- the format -----------------------------------------------------------------------------

@register_format("qtip")
class TrellisQuantizedTensor(QuantizedTensor):
    # SmolLM2's 2-bit token step: 16 min to compile with the C++ wrapper, 2 min without, at the
    # same speed (32.9 and 33.7 tokens/s: the step is ~30 ms of arithmetic)
    cpp_wrapper = False
    tensor_data_names = ["qdata", "scale", "s_in", "s_out", "q_in", "q_out"]
    optional_tensor_data_names = ["lut"]
    tensor_attribute_names = ["bits", "code", "state_bits", "shape", "dtype"]

    def __new__(cls, qdata, scale, s_in, s_out, q_in, q_out, bits, code, state_bits, shape,
                dtype, lut=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata: Tensor, scale: Tensor, s_in: Tensor, s_out: Tensor, q_in: Tensor,
                 q_out: Tensor, bits: int, code: str, state_bits: int, shape,
                 dtype: torch.dtype, lut: Tensor | None = None):
        self.qdata, self.scale = qdata, scale
        self.s_in, self.s_out, self.q_in, self.q_out = s_in, s_out, q_in, q_out
        self.bits, self.code, self.state_bits, self.lut = bits, code, state_bits, lut

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_states(cls, states: Tensor, scale: float | Tensor, s_in: Tensor, s_out: Tensor,
                    q_in: Tensor, q_out: Tensor, bits: int, code: str, dtype: torch.dtype,
                    state_bits: int = trellis.L) -> TrellisQuantizedTensor:
        """states: [N/16, K/16, T] tail-biting walks (`viterbi.quantize_tiles`); HYB reads
        the default table (fine-tuning gives a weight its own, `tunable_tables`)."""
        n, k, T = states.shape
        qdata = trellis.pack_states(states.reshape(n * k, T), bits, trellis.CODES[code])
        out = cls(qdata.reshape(n, k, -1), torch.as_tensor(scale, dtype=torch.float32),
                  s_in.half(), s_out.half(), q_in.float(), q_out.float(), bits, code,
                  state_bits, torch.Size([n * trellis.TILE, k * trellis.TILE]), dtype)
        out.validate()
        return out

    @classmethod
    def from_hp(cls, W: Tensor, bits: int = 2, code: str = "hyb", seed: int = 0,
                state_bits: int = trellis.L) -> TrellisQuantizedTensor:
        """Tail-biting Viterbi coding of W: [N, K] in a seeded rotated basis, no data (the
        baseline BlockLDLQ improves on)."""
        N, K = W.shape
        check_shape(N, K)
        trellis.check_code(code, bits, state_bits)
        s_in, s_out, q_in, q_out = layer_rotation(N, K, seed)
        Wt = rotate_weight(W.detach().float(), s_out, s_in, q_out, q_in)
        values = trellis.state_table(code, None, state_bits)  # HYB: the default table
        scale = target_scale(Wt, code, values)
        tiles = trellis.to_tiles(Wt / scale, trellis.CODES[code])  # [N/16, K/16, T, V]
        states = quantize_tiles(tiles.flatten(0, 1), values, bits * trellis.CODES[code])
        return cls.from_states(states.reshape(*tiles.shape[:3]), scale, s_in, s_out, q_in,
                               q_out, bits, code, W.dtype, state_bits)

    # ---- views ----------------------------------------------------------------------------
    def states(self) -> Tensor:
        """Each tile's walk: [N/16, K/16, T] int64."""
        return trellis.unpack_states(self.qdata, self.bits, trellis.CODES[self.code],
                                     self.state_bits)

    def rotated(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """scale·Ŵ̃: the weight in the rotated basis, [N, K]."""
        W = trellis.decode_weight(self.qdata, self.bits, self.code, self.lut, self.state_bits)
        return (W * self.scale.float()).to(dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return unrotate_weight(self.rotated(), self.s_out, self.s_in, self.q_out,
                               self.q_in).to(dtype or self.dtype)

    def validate(self) -> None:
        N, K = self.shape
        check_shape(N, K)
        trellis.check_code(self.code, self.bits, self.state_bits)
        want = (N // trellis.TILE, K // trellis.TILE, trellis.words(self.bits))
        if self.qdata.dtype != torch.int32 or tuple(self.qdata.shape) != want:
            raise ValueError(f"qdata is {tuple(self.qdata.shape)} {self.qdata.dtype}, expected "
                             f"{want} int32 for {self.bits}-bit {N}x{K}")
        if self.scale.dim() != 0 or not self.scale.is_floating_point():
            raise ValueError(f"scale must be a floating-point scalar, got "
                             f"{tuple(self.scale.shape)} {self.scale.dtype}")
        check_rotation(self.s_in, self.s_out, self.q_in, self.q_out, N, K)
        if self.code != "hyb" and self.lut is not None:
            raise ValueError(f"the {self.code} code has no table (lut)")
        if self.lut is not None:
            rows = self.lut.shape[0]
            if (self.lut.dim() != 2 or self.lut.shape[1] != 2 or rows & (rows - 1)
                    or rows > 1 << 15):
                raise ValueError(f"lut is {tuple(self.lut.shape)}, expected [2^Q, 2], Q <= 15")

    def tunable_tables(self) -> list[str]:
        """For fine-tuning: the stored tables it may change. A HYB weight gets its own copy of
        the default table here (stored from then on)."""
        if self.code != "hyb":
            return []
        if self.lut is None:
            self.lut = trellis.hyb_table().to(self.qdata.device)
        return ["lut"]

    def linear_call(self, x, bias, t):
        return torch.ops.discq.qtip_linear.default, (
            x, t["qdata"], t["scale"], t["s_in"], t["s_out"], t["q_in"], t["q_out"], t.get("lut"),
            bias, self.bits, self.code, self.state_bits)

    def inference_call(self, x, bias, t):
        """On CPU, the whole linear as one C++ op (`discq::qtip_linear_cpu`, any number of rows;
        HYB's default table passed as a constant)."""
        if self.qdata.device.type != "cpu" or not trellis_cpu.available():
            return self.linear_call(x, bias, t)
        lut = t["lut"] if "lut" in t else trellis.table_of(self.code, None)
        return torch.ops.discq.qtip_linear_cpu.default, (
            x, t["qdata"], t["scale"], t["s_in"], t["s_out"], t["q_in"], t["q_out"], lut, bias,
            self.bits, self.code, self.state_bits)

    def __repr__(self) -> str:
        return (f"TrellisQuantizedTensor(shape={tuple(self.shape)}, bits={self.bits}, "
                f"code={self.code}, state_bits={self.state_bits}, dtype={self.dtype}, "
                f"device={self.device})")


def target_scale(Wt: Tensor, code: str, values: Tensor, override: float = SCALE_OVERRIDE
                 ) -> Tensor:
    """scale such that Wt / scale has RMS `override` × the code's RMS."""
    rms = values.float().pow(2).mean().sqrt()
    return Wt.float().pow(2).mean().sqrt().clamp(min=1e-12) / (rms * override)
