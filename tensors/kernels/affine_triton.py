"""Triton kernels for the packed affine grid (2/3/4/8 bits, groups along input or output):
dequantize-and-multiply fused, so the weight crosses memory once, as `bits` bits a weight.

Code k of a row sits at bit bits·(k mod 8) of its run of 8 codes, the run stored as `bits`
little-endian bytes (packing.py); a 3-bit code can straddle two bytes, so every code is read
as the 16-bit pair (byte, next byte) shifted and masked — one formula for every width.

Two kernels, chosen by the batch: GEMV (M ≤ 4, decode) multiplies a [BN, BK] weight tile by
the activation rows with a reduction (no tensor cores needed at M = 1), GEMM (prefill) uses
`tl.dot` on [BM, BK] × [BK, BN] tiles. Exposed as the `discq::affine_linear_triton`
`triton_op`, so Inductor sees the kernels when `discq::affine_linear` is compiled on CUDA.
Tested on CPU in TRITON_INTERPRET=1 against kernels/affine_ref.py (tests/test_kernels.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton


@triton.jit
def _dequant_tile(q_ptr, s_ptr, z_ptr, n, k, N, K, Q_W, G, GS,
                  BITS: tl.constexpr, HAS_ZERO: tl.constexpr, ALONG_OUT: tl.constexpr):
    """W[n, k] for index tiles n: [BN, 1], k: [1, BK] (any broadcastable pair) -> fp32."""
    mask = (n < N) & (k < K)
    bit = BITS * (k % 8)
    byte = (k // 8) * BITS + bit // 8
    row = q_ptr + n * Q_W
    b0 = tl.load(row + byte, mask=mask, other=0).to(tl.int32)
    b1 = tl.load(row + byte + 1, mask=mask & (byte + 1 < Q_W), other=0).to(tl.int32)
    code = ((b0 | (b1 << 8)) >> (bit % 8)) & ((1 << BITS) - 1)
    if ALONG_OUT:  # scales per input channel k, groups over the outputs
        g_idx = k * G + n // GS
    else:
        g_idx = n * G + k // GS
    s = tl.load(s_ptr + g_idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_ptr + g_idx, mask=mask, other=0).to(tl.float32)
    else:
        z = 2.0 ** (BITS - 1)
    return (code.to(tl.float32) - z) * s


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, Q_W, G, GS,
                 BITS: tl.constexpr, HAS_ZERO: tl.constexpr, ALONG_OUT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        x = tl.load(x_ptr + m * K + k, mask=k < K, other=0.0).to(tl.float32)
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, n[:, None], k[None, :], N, K, Q_W, G, GS,
                          BITS, HAS_ZERO, ALONG_OUT)  # [BN, BK]
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + m * N + n, acc, mask=n < N)


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, Q_W, G, GS,
                 BITS: tl.constexpr, HAS_ZERO: tl.constexpr, ALONG_OUT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * K + k[None, :],
                    mask=(m[:, None] < M) & (k[None, :] < K), other=0.0).to(tl.float32)
        wt = _dequant_tile(q_ptr, s_ptr, z_ptr, n[None, :], k[:, None], N, K, Q_W, G, GS,
                           BITS, HAS_ZERO, ALONG_OUT)  # [BK, BN] = Wᵀ tile
        acc += tl.dot(x, wt, input_precision="ieee")
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc,
             mask=(m[:, None] < M) & (n[None, :] < N))


GEMV_MAX_M = 4


@triton_op("discq::affine_linear_triton", mutates_args=())
def affine_linear_triton(x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor | None,
                         bias: Tensor | None, bits: int, group_size: int, along_output: bool,
                         in_features: int) -> Tensor:
    """Same contract as `discq::affine_linear` (kernels/affine_ref.py). x: [..., K]."""
    K, N = in_features, qdata.shape[0]
    x2 = x.reshape(-1, K).contiguous()  # [M, K]
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    z = zero_point if zero_point is not None else scale  # a dummy pointer when absent
    args = (x2, qdata.contiguous(), scale.contiguous(), z.contiguous(), y, M, N, K,
            qdata.shape[1], scale.shape[1], group_size)
    meta = {"BITS": bits, "HAS_ZERO": zero_point is not None, "ALONG_OUT": along_output}
    if M <= GEMV_MAX_M:
        wrap_triton(_gemv_kernel)[(triton.cdiv(N, 32), M)](*args, **meta, BLOCK_N=32,
                                                          BLOCK_K=64)
    else:
        wrap_triton(_gemm_kernel)[(triton.cdiv(M, 32), triton.cdiv(N, 32))](
            *args, **meta, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
    y = y.to(x.dtype).reshape(*x.shape[:-1], N)
    return y if bias is None else y + bias
