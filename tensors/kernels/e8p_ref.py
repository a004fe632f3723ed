"""Reference (plain torch) byte layout, decode and matmul of lattice-coded weights.

Layout of `qdata`: uint8 [N, (K/8)·bits]. Each run of 8 weights along a row owns `bits` bytes:
its stage codes, little-endian, stage after stage: 2-bit = one 16-bit E8P code (2 bytes);
3-bit = E8P code + one byte of the 1-bit E8 codebook; 4-bit = two 16-bit E8P codes. So a weight
costs exactly `bits` bits.

This is the CPU path of `discq::e8p_linear` and the ground truth for any faster kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import e8p_residual
from ..hadamard import rotate, transform, transform_t, unrotate

STAGE_BYTES = {2: (2,), 3: (2, 1), 4: (2, 2)}


def pack_lattice_codes(codes: Tensor, bits: int) -> Tensor:
    """codes: [N, B, stages] integers (B = K/8 runs) -> qdata: [N, B·bits] uint8."""
    e8p_residual.check_bits(bits)
    N, B, _ = codes.shape
    parts = []
    for s, nbytes in enumerate(STAGE_BYTES[bits]):
        c = codes[..., s].long()
        parts += [((c >> (8 * k)) & 0xFF) for k in range(nbytes)]
    return torch.stack(parts, -1).to(torch.uint8).reshape(N, B * bits)


def unpack_lattice_codes(qdata: Tensor, bits: int) -> Tensor:
    """qdata: [N, B·bits] uint8 -> codes: [N, B, stages] int64 (inverse of the packing)."""
    e8p_residual.check_bits(bits)
    N = qdata.shape[0]
    b = qdata.reshape(N, -1, bits).long()  # [N, B, bits]
    out, at = [], 0
    for nbytes in STAGE_BYTES[bits]:
        out.append(sum(b[..., at + k] << (8 * k) for k in range(nbytes)))
        at += nbytes
    return torch.stack(out, -1)


def decode_weight(qdata: Tensor, bits: int) -> Tensor:
    """The unscaled weight in the rotated basis: [N, K] fp32, K = 8·B."""
    codes = unpack_lattice_codes(qdata, bits)  # [N, B, stages]
    return e8p_residual.decode(codes, bits).reshape(qdata.shape[0], -1)


def e8p_linear_ref(x: Tensor, qdata: Tensor, scale: Tensor, s_in: Tensor, s_out: Tensor,
                   q_in: Tensor, q_out: Tensor, bias: Tensor | None, bits: int,
                   decode=None) -> Tensor:
    """y = s_out ⊙ T_outᵀ(scale·Ŵ̃ · T_in(s_in ⊙ x)) + b. x: [..., K] -> y: [..., N].
    `decode`: the codes -> weight function (default `decode_weight`; Triton's on CUDA)."""
    W = (decode or decode_weight)(qdata, bits).to(x.dtype) * scale.to(x.dtype)  # [N, K]
    y = unrotate(rotate(x, s_in, q_in) @ W.t(), s_out, q_out)
    return y if bias is None else y + bias


def e8p_linear_backward(grad_y: Tensor, x: Tensor, W: Tensor, scale: Tensor, s_in: Tensor,
                        s_out: Tensor, q_in: Tensor, q_out: Tensor,
                        need_s_out: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(∂x, ∂s_in, ∂s_out) of `e8p_linear_ref`, W the decoded (unscaled) codes [N, K]; ∂s_out
    only when asked (it costs one more matmul). The rotations T are orthogonal, so their
    adjoints are their transposes."""
    W = W.to(grad_y.dtype) * scale.to(grad_y.dtype)  # [N, K]
    batch = tuple(range(grad_y.dim() - 1))
    g_s_out = None
    if need_s_out:  # y = s_out ⊙ w with w = T_outᵀ(T_in(s_in ⊙ x) Ŵ̃ᵀ)
        w = transform_t(rotate(x, s_in, q_in) @ W.t(), q_out)
        g_s_out = (grad_y * w).sum(batch)
    g_z = transform(grad_y * s_out.to(grad_y.dtype), q_out)  # [..., N]
    g_u = transform_t(g_z @ W, q_in)  # [..., K], the gradient of s_in ⊙ x
    return g_u * s_in.to(g_u.dtype), (g_u * x).sum(batch), g_s_out
