"""llama.cpp's block layouts for discq's symmetric affine weights.

A symmetric affine weight with groups of 32 along the input dimension and an fp16 scale is a
llama.cpp block format value for value: both decode w = d·(q - 2^(bits-1)), and discq's
symmetric grid follows llama.cpp's rule (the signed extreme on the level -2^(bits-1)).

  Q4_0  per block of 32: d fp16, then 16 bytes; byte j holds q[j] (low nibble) and q[j+16]
        (high nibble); w = d·(q - 8)                                        (4.5 bits/weight)
  Q8_0  per block of 32: d fp16, then 32 int8 values; w = d·q; discq's code c is q = c - 128
                                                                             (8.5 bits/weight)

The packing is written here and checked against the `gguf` package's reference dequantizers in
the tests, not taken from it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from discq.tensors.affine import AffineQuantizedTensor

BLOCK = 32
TYPES = {4: "Q4_0", 8: "Q8_0"}  # bits -> llama.cpp type


def block_type(w: Tensor) -> str | None:
    """The llama.cpp type `w` is stored in exactly, or None (then it has no block twin)."""
    exact = (isinstance(w, AffineQuantizedTensor) and w.zero_point is None and w.bits in TYPES
             and w.group_size == BLOCK and w.group_along == "input"
             and w.scale.dtype == torch.float16 and w.shape[1] % BLOCK == 0
             and w.lowrank_u is None)
    return TYPES[w.bits] if exact else None


def to_blocks(w: AffineQuantizedTensor, rows: Tensor | None = None) -> np.ndarray:
    """The llama.cpp bytes of `w`: uint8 [N, K/32 · bytes per block], rows in the order
    `rows` (a permutation, e.g. llama.cpp's rotary layout of q/k) or as they are."""
    kind = block_type(w)
    if kind is None:
        raise ValueError("only symmetric 4- or 8-bit weights with fp16 scales in groups of 32 "
                         "along the input dimension have a llama.cpp block twin (Q4_0, Q8_0); "
                         "quantize with group_size=32, symmetric=True, bits=4 or 8")
    q, d = w.codes().cpu(), w.scale.cpu()  # q: [N, K] uint8, d: [N, K/32] fp16
    if rows is not None:
        q, d = q[rows], d[rows]
    N, K = q.shape
    q = q.reshape(N, K // BLOCK, BLOCK).numpy()
    d_bytes = d.contiguous().numpy().view(np.uint8).reshape(N, K // BLOCK, 2)
    if kind == "Q4_0":
        payload = q[..., :16] | (q[..., 16:] << 4)  # [N, G, 16]
    else:
        payload = (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)  # [N, G, 32]
    return np.concatenate([d_bytes, payload], axis=-1).reshape(N, -1)
