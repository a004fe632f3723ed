"""`GGUFQuantizedTensor`: a weight stored as llama.cpp blocks, and `GGUFGrid`, the grid that
rounding methods (RTN, GPTQ, DiscQuant) target to produce one.

Fields:
  qdata   uint8 [N, K / block · bytes per block]: every row's blocks exactly as a GGUF file
          stores them (`gguf_layout`), so `discq.export.to_gguf` writes these bytes as they are
Attributes: ggml_type ("Q4_0", "Q4_K", …), shape, dtype.

`F.linear` with this tensor as weight is one `discq::gguf_linear` node: it decodes the blocks
(as llama.cpp does, bit for bit) and multiplies; on CPU for inference through
`discq::gguf_linear_cpu`, a fused C++ kernel that decodes each block once into a small buffer
and never writes the dense weight (the codebook i-quants, IQ2_XXS … IQ3_S, are decoded by
torch, then one matmul). Rows must be a whole number of blocks (32 weights for Q4_0…Q8_0 and
IQ4_NL, 256 for the k-quants and the other i-quants), as in llama.cpp.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gguf_codebook as books
from . import gguf_codebook_fit as book_fit
from . import gguf_layout as layout
from .base import QuantizedTensor, register_format
from .gguf_fit import fit_header, level_boundaries
from .kernels import gguf_cpu
from .ops import composite_op


@dataclass(frozen=True)
class GGUFGrid:
    """The grid of one GGML block type. Quacks like `AffineGrid` where rounding methods look
    (bits, qmax, group_size, group_along, symmetric), with a per-group real-valued zero
    (-b/a): `grid.encode/decode/neighbours` work unchanged; `fit` also returns the headers the
    final bytes need."""

    ggml_type: str
    group_along: str = "input"  # blocks run along rows, as llama.cpp stores them
    symmetric: bool = False     # the zero is per group, not the fixed 2^(bits-1)
    scale_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        layout.block_type(self.ggml_type)  # ValueError naming the known types

    @property
    def type(self) -> layout.BlockType:
        return layout.TYPES[self.ggml_type]

    @property
    def bits(self) -> int:
        return self.type.bits

    @property
    def qmax(self) -> int:
        return self.type.qmax

    @property
    def group_size(self) -> int:
        return self.type.group

    @property
    def block(self) -> int:
        return self.type.block

    @property
    def levels(self) -> Tensor | None:
        """A non-linear type's levels (code q stands for levels[q]), fp32; None when affine."""
        lv = self.type.levels
        return None if lv is None else torch.tensor(lv, dtype=torch.float32)

    def nearest(self, t: Tensor) -> Tensor:
        """t = w / a + zero in grid units -> the nearest code (uint8)."""
        if self.type.levels is None:
            return torch.round(t).clamp_(0, self.qmax).to(torch.uint8)
        mids = level_boundaries(self.type.levels, t.device)
        return torch.bucketize(t.float().contiguous(), mids).to(torch.uint8)

    def bracket(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """t: grid units [R, C] -> the codes of the grid points just below and just above
        (equal on a point or outside the range) and t's fraction y of the way between their
        values (DiscQuant's relaxation, for the non-linear levels as for the affine steps)."""
        t = t.float()
        if self.type.levels is None:
            down, up = torch.floor(t).clamp(0, self.qmax), torch.ceil(t).clamp(0, self.qmax)
            return down.to(torch.uint8), up.to(torch.uint8), torch.where(up > down, t - down, 0.)
        lv = self.levels.to(t.device)
        down = (torch.bucketize(t.contiguous(), lv, right=True) - 1).clamp(0, len(lv) - 1)
        up = torch.where(t > lv[down], down + 1, down).clamp(max=len(lv) - 1)
        lo, hi = lv[down], lv[up]
        y = torch.where(up > down, (t - lo) / (hi - lo).clamp(min=1e-30), 0.0)
        return down.to(torch.uint8), up.to(torch.uint8), y

    def check_row(self, K: int, name: str = "") -> None:
        if K % self.block:
            raise ValueError(
                f"{name or 'weight'}: rows of {K} weights are not a whole number of "
                f"{self.ggml_type} blocks ({self.block}); llama.cpp stores such a tensor in a "
                f"32-weight type (e.g. Q4_0/Q5_0/Q8_0) — the gguf mixtures choose it for you")

    def fit(self, Wr: Tensor, importance: Tensor | None = None
            ) -> tuple[Tensor, Tensor, Tensor]:
        """Wr: [R, C] (C a multiple of the block) -> scale a, zero -b/a [R, C / group] fp32,
        headers [R, C / block, header bytes] uint8. `importance` [R, C] weighs the codebook
        types' scale search (GPTQ passes the Hessian's diagonal)."""
        R, C = Wr.shape
        self.check_row(C)
        t = self.type
        if t.vector:  # a per scale group from d and the 4-bit ls; no zero
            imp = None if importance is None else importance.reshape(-1, t.block)
            f = book_fit.fit_header(Wr.reshape(-1, t.block), self.book, imp)  # d, ls bytes
            a = books.scales(f, self.book).view(R, -1)
            head = torch.cat([f.d, f.ls.to(torch.uint8)], dim=1)
            return a, torch.zeros_like(a), head.view(R, C // t.block, -1)
        head = fit_header(Wr.reshape(-1, t.block), t)  # [R·S, P]
        a, b = layout.affine(head, t)  # [R·S, block / group]
        return a.view(R, -1), (-b / a).view(R, -1), head.view(R, C // t.block, -1)

    def pack(self, codes: Tensor, headers: Tensor, dtype: torch.dtype) -> GGUFQuantizedTensor:
        """codes [N, K] uint8 (a codebook type: [N, K / 8] int64, each 8 weights' codeword
        indices and sign byte, as `round_vectors` gives them), headers [N, K / block, P] ->
        the stored tensor."""
        t = self.type
        N = codes.shape[0]
        K = codes.shape[1] * (8 if t.vector else 1)  # codebook codes: one per 8 weights
        if t.vector:  # codes: [N, K / 8] sign groups, each (indices …, sign byte) packed
            raw = self._join_codebook(headers, codes)
        else:
            raw = layout.join(headers.reshape(-1, t.header_bytes), codes.reshape(-1, t.block), t)
        return GGUFQuantizedTensor(raw.view(N, -1), self.ggml_type, torch.Size([N, K]), dtype)

    @property
    def book(self) -> books.Codebook:
        return books.TYPES[self.ggml_type]

    def round_vectors(self, x: Tensor, runner_up: bool = False,
                      importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A codebook type's rounding of sign groups: x [m, 8] in units of the scale ->
        (codes [m] int64: the codeword indices and the sign byte packed, values [m, 8]); the
        nearest codes (in the distance weighted by `importance` [m, 8], if given), or with
        `runner_up` the second nearest (`gguf_codebook_fit`)."""
        if runner_up:
            idx, sign, values = book_fit.runner_up(x.float(), self.book)
        else:
            idx, sign, values = book_fit.nearest(x.float(), self.book, importance)
        return books.pack_codes(idx, sign), values

    def _join_codebook(self, headers: Tensor, codes: Tensor) -> Tensor:
        """headers [N, K / 256, 2 + groups] (d bytes, ls), codes [N, K / 8] -> block bytes."""
        n = codes.numel() // (books.BLOCK // 8)
        idx, sign = books.unpack_codes(codes.reshape(n, -1), self.book)
        head = headers.reshape(n, -1)
        return books.join(books.Fields(head[:, :2], head[:, 2:].to(torch.int32), idx, sign),
                          self.book)

    def quantize(self, W: Tensor) -> GGUFQuantizedTensor:
        """Round to nearest: W [N, K] -> the stored tensor."""
        if self.type.vector:
            self.check_row(W.shape[1])
            raw = book_fit.quantize(W.detach().float().reshape(-1, self.block), self.book)
            return GGUFQuantizedTensor(raw.view(W.shape[0], -1), self.ggml_type, W.shape,
                                       W.dtype)
        scale, zero, headers = self.fit(W.detach().float())
        g = self.group_size
        q = self.nearest(W.float() / scale.repeat_interleave(g, 1) + zero.repeat_interleave(g, 1))
        return self.pack(q, headers, W.dtype)


def dequantize_blocks(qdata: Tensor, ggml_type: str, in_features: int) -> Tensor:
    """qdata [N, bytes] -> W [N, K] fp32."""
    t = layout.TYPES[ggml_type]
    N = qdata.shape[0]
    return layout.dequantize(qdata.reshape(-1, t.nbytes), t).view(N, in_features)


@composite_op("gguf_linear(Tensor x, Tensor qdata, Tensor? bias, str ggml_type, "
              "int in_features) -> Tensor")
def _gguf_linear(x, qdata, bias, ggml_type, in_features):
    """y = x Ŵᵀ + b, Ŵ decoded from the blocks: on CPU by the fused C++ kernel, which never
    writes Ŵ (up to 64 activation rows); else, and for gradients, decoded here then F.linear."""
    if gguf_cpu.supports(x) and ggml_type not in layout.VECTOR_TYPES:
        return gguf_cpu.gguf_linear(x, qdata, bias, ggml_type, in_features)
    W = dequantize_blocks(qdata, ggml_type, in_features).to(x.dtype)
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))


@register_format("gguf")
class GGUFQuantizedTensor(QuantizedTensor):
    tensor_data_names = ["qdata"]
    tensor_attribute_names = ["ggml_type", "shape", "dtype"]

    def __new__(cls, qdata, ggml_type, shape, dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata: Tensor, ggml_type: str, shape, dtype: torch.dtype):
        self.qdata = qdata
        self.ggml_type = ggml_type

    @property
    def block_type(self) -> layout.BlockType:
        return layout.TYPES[self.ggml_type]

    def codes(self) -> Tensor:
        """Unsigned codes [N, K] uint8 (w = a·q + b per group; a·levels[q] for IQ4_NL/IQ4_XS);
    a codebook type (IQ2_XXS … IQ3_S) has none: ValueError."""
        t = self.block_type
        return layout.codes(self.qdata.reshape(-1, t.nbytes), t).view(self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_blocks(self.qdata, self.ggml_type, self.shape[1]).to(dtype or self.dtype)

    def rows(self, idx: Tensor) -> Tensor:
        """Rows idx [n] -> [n, K]: blocks never cross rows."""
        return dequantize_blocks(self.qdata[idx], self.ggml_type, self.shape[1]).to(self.dtype)

    def validate(self) -> None:
        if self.ggml_type not in layout.TYPES:
            raise ValueError(f"unknown ggml_type {self.ggml_type!r}; known: {sorted(layout.TYPES)}")
        N, K = self.shape
        t = self.block_type
        if K % t.block:
            raise ValueError(f"{self.ggml_type} rows hold whole blocks of {t.block}, got K={K}")
        want = (N, K // t.block * t.nbytes)
        if self.qdata.dtype != torch.uint8 or tuple(self.qdata.shape) != want:
            raise ValueError(f"qdata is {tuple(self.qdata.shape)} {self.qdata.dtype}, expected "
                             f"{want} uint8 for {self.ggml_type} {N}x{K}")

    def linear_call(self, x, bias, t):
        return torch.ops.discq.gguf_linear.default, (
            x, t["qdata"], bias, self.ggml_type, self.shape[1])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, ggml_type={self.ggml_type!r}"
                f", dtype={self.dtype}, device={self.device})")
