"""The llama.cpp bytes of a discq weight: which GGML type it is stored in, and its blocks.

A `GGUFQuantizedTensor` holds llama.cpp blocks already. A symmetric affine weight with groups
of 32 along the input dimension and fp16 scales is one too, value for value: both decode
w = d·(q - 2^(bits-1)) (discq's symmetric grid follows llama.cpp's rule, the signed extreme on
the level -2^(bits-1)), so 4-bit is Q4_0 and 8-bit is Q8_0; its codes and scales are laid out
by `discq.tensors.gguf_layout`, like every other block type.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from discq.tensors import gguf_layout as layout
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.gguf import GGUFQuantizedTensor

BLOCK = 32
TYPES = {4: "Q4_0", 8: "Q8_0"}  # bits of a symmetric affine weight -> llama.cpp type


def block_type(w: Tensor) -> str | None:
    """The llama.cpp type `w` is stored in exactly, or None (then it has no block twin)."""
    if isinstance(w, GGUFQuantizedTensor):
        return w.ggml_type
    exact = (isinstance(w, AffineQuantizedTensor) and w.zero_point is None and w.bits in TYPES
             and w.group_size == BLOCK and w.group_along == "input"
             and w.scale.dtype == torch.float16 and w.shape[1] % BLOCK == 0
             and w.lowrank_u is None)
    return TYPES[w.bits] if exact else None


def to_blocks(w: Tensor, rows: Tensor | None = None) -> np.ndarray:
    """The llama.cpp bytes of `w`: uint8 [N, K / block · bytes per block], rows in the order
    `rows` (a permutation, e.g. llama.cpp's rotary layout of q/k) or as they are."""
    kind = block_type(w)
    if kind is None:
        raise ValueError(f"{w!r} has no llama.cpp block twin: quantize with gguf='Q4_K_M' (or "
                         f"another GGML type or mixture), or with group_size=32, "
                         f"symmetric=True and bits=4 (Q4_0) or 8 (Q8_0)")
    if isinstance(w, GGUFQuantizedTensor):
        raw = w.qdata.cpu()
    else:
        t = layout.TYPES[kind]
        q = w.codes().cpu().reshape(-1, BLOCK)  # [N·K/32, 32]
        d = w.scale.cpu().contiguous().view(torch.uint8).view(-1, 2)  # fp16 bytes per block
        raw = layout.join(d, q, t).view(w.shape[0], -1)
    raw = raw[rows] if rows is not None else raw
    return raw.contiguous().numpy()
