"""`LatticeQuantizedTensor`: a weight coded with the E8P lattice codebook (QuIP#) in a randomly
rotated basis.

The weight W: [N, K] is stored as W̃ = R_out W R_inᵀ ≈ scale · Ŵ̃, Ŵ̃ a matrix of lattice points,
8 consecutive weights of a row per code (see `e8p.py`, `e8p_residual.py`). Fields:
  qdata   uint8 [N, K·bits/8]  the codes, exactly `bits` bits per weight (layout in
                               kernels/e8p_ref.py)
  scale   fp32 []              one global scale
  s_in    fp16 [K], s_out fp16 [N]   the rotations' sign vectors (±1 after quantization,
                                     real-valued after fine-tuning, hence fp16 not bits)
  q_in, q_out  fp32 [m, m]     the rotations' small orthogonal factors (hadamard.py)
Attributes: bits (2, 3 or 4), shape, dtype.

`F.linear` never forms W: it calls `discq::e8p_linear`, which rotates the activations,
multiplies by the decoded codes and rotates back: y = s_out ⊙ T_outᵀ(scale·Ŵ̃ T_in(s_in ⊙ x)).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import e8p_residual, lattice_ops  # noqa: F401  (lattice_ops registers discq::e8p_linear)
from .base import QuantizedTensor, register_format
from .hadamard import check_rotation, layer_rotation, rotate_weight, unrotate_weight
from .e8p import abs_patterns
from .kernels import lattice_cpu
from .kernels.e8p_ref import decode_weight, pack_lattice_codes, unpack_lattice_codes

# RMS the rotated weight is scaled to before coding: the minimum of the error on Gaussian
# blocks for 3 and 4 bits (measured, tests/test_e8p.py); 0.9 at 2 bits as in QuIP#, a little
# below the Gaussian optimum 1.03 because BlockLDLQ's feedback widens the inputs.
WEIGHT_RMS = {2: 0.9, 3: 1.0, 4: 0.9}


def check_shape(N: int, K: int) -> None:
    if K % 8:
        raise ValueError(f"lattice codes take 8 input columns at a time: in_features={K} is not "
                         f"a multiple of 8; leave this layer out with filter_fn")


@register_format("e8p")
class LatticeQuantizedTensor(QuantizedTensor):
    # as QTIP's (qtip.py): the C++ wrapper took ~10 min to compile SmolLM2's 2-bit step
    cpp_wrapper = False
    tensor_data_names = ["qdata", "scale", "s_in", "s_out", "q_in", "q_out"]
    tensor_attribute_names = ["bits", "shape", "dtype"]

    def __new__(cls, qdata, scale, s_in, s_out, q_in, q_out, bits, shape, dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata: Tensor, scale: Tensor, s_in: Tensor, s_out: Tensor, q_in: Tensor,
                 q_out: Tensor, bits: int, shape, dtype: torch.dtype):
        self.qdata, self.scale = qdata, scale
        self.s_in, self.s_out, self.q_in, self.q_out = s_in, s_out, q_in, q_out
        self.bits = bits

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: Tensor, scale: float | Tensor, s_in: Tensor, s_out: Tensor,
                   q_in: Tensor, q_out: Tensor, bits: int, dtype: torch.dtype
                   ) -> LatticeQuantizedTensor:
        """codes: [N, K/8, stages] (from `e8p_residual.quantize`), the rotation that made W̃;
        the signs are stored in fp16, the factors in fp32."""
        N, B, _ = codes.shape
        out = cls(pack_lattice_codes(codes, bits), torch.as_tensor(scale, dtype=torch.float32),
                  s_in.half(), s_out.half(), q_in.float(), q_out.float(), bits,
                  torch.Size([N, 8 * B]), dtype)
        out.validate()
        return out

    @classmethod
    def from_hp(cls, W: Tensor, bits: int = 2, seed: int = 0,
                weight_rms: float | None = None) -> LatticeQuantizedTensor:
        """Nearest-point coding of W: [N, K] in a seeded rotated basis, no data (the baseline
        BlockLDLQ improves on)."""
        N, K = W.shape
        check_shape(N, K)
        e8p_residual.check_bits(bits)
        s_in, s_out, q_in, q_out = layer_rotation(N, K, seed)
        Wt = rotate_weight(W.detach().float(), s_out, s_in, q_out, q_in)
        scale = Wt.pow(2).mean().sqrt().clamp(min=1e-12) / (weight_rms or WEIGHT_RMS[bits])
        _, codes = e8p_residual.quantize((Wt / scale).reshape(N, K // 8, 8), bits)
        return cls.from_codes(codes, scale, s_in, s_out, q_in, q_out, bits, W.dtype)

    # ---- views ----------------------------------------------------------------------------
    def codes(self) -> Tensor:
        """[N, K/8, stages] int64."""
        return unpack_lattice_codes(self.qdata, self.bits)

    def rotated(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """scale·Ŵ̃: the weight in the rotated basis, [N, K]."""
        return (decode_weight(self.qdata, self.bits) * self.scale.float()).to(dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """W = diag(s_out) T_outᵀ (scale·Ŵ̃) T_in diag(s_in): [N, K]."""
        return unrotate_weight(self.rotated(), self.s_out, self.s_in, self.q_out,
                               self.q_in).to(dtype or self.dtype)

    def validate(self) -> None:
        N, K = self.shape
        e8p_residual.check_bits(self.bits)
        check_shape(N, K)
        want = (N, K // 8 * self.bits)
        if self.qdata.dtype != torch.uint8 or tuple(self.qdata.shape) != want:
            raise ValueError(f"qdata is {tuple(self.qdata.shape)} {self.qdata.dtype}, expected "
                             f"{want} uint8 for {self.bits}-bit {N}x{K}")
        if self.scale.dim() != 0 or not self.scale.is_floating_point():
            raise ValueError(f"scale must be a floating-point scalar, got "
                             f"{tuple(self.scale.shape)} {self.scale.dtype}")
        check_rotation(self.s_in, self.s_out, self.q_in, self.q_out, N, K)

    def linear_call(self, x, bias, t):
        return torch.ops.discq.e8p_linear.default, (
            x, t["qdata"], t["scale"], t["s_in"], t["s_out"], t["q_in"], t["q_out"], bias,
            self.bits)

    def inference_call(self, x, bias, t):
        """On CPU at 2 bits, the whole linear as one C++ op (`discq::e8p_linear_cpu`, any
        number of rows; E8P's pattern table passed as a constant)."""
        if self.bits != 2 or self.qdata.device.type != "cpu" or not lattice_cpu.available():
            return self.linear_call(x, bias, t)
        return torch.ops.discq.e8p_linear_cpu.default, (
            x, t["qdata"], t["scale"], t["s_in"], t["s_out"], t["q_in"], t["q_out"], bias,
            abs_patterns())

    def __repr__(self) -> str:
        return (f"LatticeQuantizedTensor(shape={tuple(self.shape)}, bits={self.bits}, "
                f"codebook={'E8P' if self.bits == 2 else f'E8P+residual ({self.bits}-bit)'}, "
                f"dtype={self.dtype}, device={self.device})")
