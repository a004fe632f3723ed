"""The uniform affine grid: which values a weight may take.

A weight matrix W: [N, K] (out_features, in_features) is cut into groups of `group_size`
consecutive weights, either along the input dimension (each row split into groups, the usual
choice) or along the output dimension (each column split into groups: per-input-channel
grouping, which gives an activation-outlier input channel scales of its own). Every group has
its own grid {(q - zero) * scale : q = 0 .. 2^bits - 1}.

All math here works in *row form*: `to_rows(W, grid)` is W for input grouping and Wᵀ for output
grouping, so groups always run along the last dimension. Scales and zero points are stored in
row form, `[R, G]` with R rows and G = ceil(C / group_size) groups per row; a group size that
does not divide C leaves the last group shorter.

Asymmetric grids store an integer zero point as uint8 (the grid spans [min(min, 0),
max(max, 0)] of the group, shifted by under half a step so that 0 is a grid point); symmetric
grids store none: the zero is fixed at 2^(bits-1), and, as in llama.cpp's Q4_0/Q8_0, the scale
puts the group's signed extreme w* exactly on the level -2^(bits-1): scale = w* / -2^(bits-1),
negative when w* is positive (a scale's sign is free: every decode is (q - zero)·scale).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)
GROUP_ALONG = ("input", "output")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class AffineGrid:
    """Uniform affine grid. `group_size=None` means one group per row (per output channel for
    input grouping, per input channel for output grouping). `scale_dtype=None` stores scales in
    the weight's dtype."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    group_along: str = "input"
    scale_dtype: torch.dtype | None = torch.float16

    def __post_init__(self):
        check_bits(self.bits)
        check_group_size(self.group_size)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be True or False, got {self.symmetric!r}")
        if self.group_along not in GROUP_ALONG:
            raise ValueError(
                f"group_along must be 'input' or 'output', got {self.group_along!r}")
        if self.scale_dtype not in (None, *SCALE_DTYPES.values()):
            raise ValueError(f"scale_dtype must be None, float16, bfloat16 or float32, "
                             f"got {self.scale_dtype!r}")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def zero_sym(self) -> int:
        """The fixed zero of the symmetric grid."""
        return 2 ** (self.bits - 1)


def check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an integer in {SUPPORTED_BITS}, got {bits!r} "
                        f"({type(bits).__name__}); e.g. bits=3")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")


def check_group_size(group_size) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be a positive integer or None (one group per row), "
                        f"got {group_size!r}")
    if group_size <= 0:
        raise ValueError(f"group_size must be a positive integer (e.g. 64 or 128) or None for "
                         f"one group per row, got {group_size}")
    if group_size > 2**20:
        raise ValueError(f"group_size={group_size} is larger than any layer dimension allowed "
                         f"(2^20); use group_size=None for one group per row")


def to_rows(W: Tensor, grid: AffineGrid) -> Tensor:
    """W: [N, K] -> row form [R, C]: groups run along the last dimension."""
    return W if grid.group_along == "input" else W.t()


def from_rows(Wr: Tensor, grid: AffineGrid) -> Tensor:
    return Wr if grid.group_along == "input" else Wr.t()


def resolved_group_size(grid: AffineGrid, C: int) -> int:
    """The group length used on rows of length C (None or larger than C: the whole row)."""
    return C if grid.group_size is None else min(grid.group_size, C)


def storage_dtype(grid: AffineGrid, weight_dtype: torch.dtype) -> torch.dtype:
    return weight_dtype if grid.scale_dtype is None else grid.scale_dtype


def min_scale(dtype: torch.dtype) -> float:
    """Smallest scale we store: a normal number of the storage dtype (fp16 subnormals would lose
    precision and 0 would divide by zero)."""
    return max(torch.finfo(dtype).tiny, 1e-12)


def round_up_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x (fp32) stored in `dtype`, rounded up, never down: a scale rounded down would shrink the
    grid's range and push the extreme weights of a group more than half a step away."""
    y = x.to(dtype)
    below = y.float() < x
    return torch.where(below, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def fit_scale(w: Tensor, grid: AffineGrid, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Scale and zero point of one group per row. w: [R, c] -> scale: [R, 1] in `dtype`,
    zero: [R, 1] uint8 (None for a symmetric grid)."""
    w = w.float()
    if grid.symmetric:
        return _symmetric_scale(w, grid, dtype), None
    # the range always holds 0 (as in GPTQ): the zero point then stays in [0, qmax], which an
    # fp16 zero point represents well, and a constant group cannot push it out of range
    lo = w.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = round_up_to(((hi - lo) / grid.qmax).clamp(min=min_scale(dtype)), dtype)
    # an integer zero point puts 0 exactly on the grid (GPTQ's convention): on SmolLM2 at 3 bits
    # this halves RTN's perplexity against a real-valued zero, and it costs 8 bits, not 16
    zero = (-lo / scale.float()).round().clamp(0, grid.qmax).to(torch.uint8)
    return scale, zero


def _symmetric_scale(w: Tensor, grid: AffineGrid, dtype: torch.dtype) -> Tensor:
    """llama.cpp's rule (Q4_0, Q8_0), see `signed_extreme_scale`. 2·absmax / (2^bits - 1) left
    the far negative level beyond every weight and clipped the positive extreme (SmolLM2, 4-bit
    blocks of 32, RTN: 100.5 -> 85.4 perplexity). w: [R, c] fp32 -> scale [R, 1] in `dtype`."""
    return signed_extreme_scale(w, grid.zero_sym, dtype)


def signed_extreme_scale(w: Tensor, zero: int, dtype: torch.dtype) -> Tensor:
    """The group's signed extreme w* lands on the level -zero, the one that reaches furthest:
    scale = w* / -zero (negative when w* > 0), so all levels lie within the weights' range.
    Also GGUF's Q4_0/Q5_0/Q8_0 fit (`gguf_fit`). w: [R, c] fp32 -> scale [R, 1] in `dtype`."""
    extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True))  # [R, 1], signed
    scale = extreme / -zero
    # the magnitude rounded up to `dtype`: w* then still rounds to the extreme code
    magnitude = round_up_to(scale.abs().clamp(min=min_scale(dtype)), dtype)
    return torch.where(scale < 0, -magnitude, magnitude)


def fit_groups(Wr: Tensor, grid: AffineGrid, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Scales and zero points of every group. Wr: [R, C] -> scale, zero: [R, G]."""
    R, C = Wr.shape
    g = resolved_group_size(grid, C)
    G = math.ceil(C / g)
    pad = G * g - C
    if pad:  # repeat the last column: it belongs to the last group, so min/max are unchanged
        Wr = torch.cat([Wr, Wr[:, -1:].expand(R, pad)], dim=1)
    scale, zero = fit_scale(Wr.reshape(R * G, g), grid, dtype)
    return scale.reshape(R, G), None if zero is None else zero.reshape(R, G)


def expand_groups(t: Tensor, g: int, C: int) -> Tensor:
    """t: [R, G] per-group values -> [R, C] per-weight values. A gather, not
    `repeat_interleave(g)[:, :C]`: torch.compile (Inductor, CPU, torch 2.13) computes that
    slice of a repeat wrongly when g does not divide C (garbage in DiscQuant's compiled step)."""
    return t.index_select(1, torch.arange(C, device=t.device) // g)


def zero_of(zero: Tensor | None, grid: AffineGrid) -> Tensor | float:
    return float(grid.zero_sym) if zero is None else zero.float()


def encode(w: Tensor, scale: Tensor, zero: Tensor | None, grid: AffineGrid) -> Tensor:
    """Nearest grid codes (round to nearest). w: [R, c]; scale/zero broadcast to w. -> uint8."""
    q = torch.round(w.float() / scale.float() + zero_of(zero, grid))
    return q.clamp_(0, grid.qmax).to(torch.uint8)


def decode(q: Tensor, scale: Tensor, zero: Tensor | None, grid: AffineGrid,
           dtype: torch.dtype = torch.float32) -> Tensor:
    """Grid values of codes q (broadcasting scale/zero). Computed in fp32, returned in dtype."""
    return ((q.float() - zero_of(zero, grid)) * scale.float()).to(dtype)


def neighbours(w: Tensor, scale: Tensor, zero: Tensor | None,
               grid: AffineGrid) -> tuple[Tensor, Tensor]:
    """Codes of the grid points just below and just above each weight (equal where w sits on a
    grid point or outside the grid's range). Used by DiscQuant's relaxation."""
    t = w.float() / scale.float() + zero_of(zero, grid)
    down = torch.floor(t).clamp_(0, grid.qmax)
    up = torch.ceil(t).clamp_(0, grid.qmax)
    return down.to(torch.uint8), up.to(torch.uint8)


def quantize_rows(Wr: Tensor, grid: AffineGrid, dtype: torch.dtype
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest of a row-form matrix. Wr: [R, C] -> codes [R, C] uint8, scale/zero [R, G]."""
    C = Wr.shape[1]
    g = resolved_group_size(grid, C)
    scale, zero = fit_groups(Wr, grid, dtype)
    s = expand_groups(scale, g, C)
    z = None if zero is None else expand_groups(zero, g, C)
    return encode(Wr, s, z, grid), scale, zero


def dequantize_rows(codes: Tensor, scale: Tensor, zero: Tensor | None, grid: AffineGrid,
                    dtype: torch.dtype) -> Tensor:
    """codes: [R, C], scale/zero: [R, G] -> values [R, C]."""
    C = codes.shape[1]
    g = resolved_group_size(grid, C)
    z = None if zero is None else expand_groups(zero, g, C)
    return decode(codes, expand_groups(scale, g, C), z, grid, dtype)


def step_size(scale: Tensor, grid: AffineGrid, C: int) -> Tensor:
    """Per-weight grid step in row form [R, C] (the scale, expanded)."""
    return expand_groups(scale.float(), resolved_group_size(grid, C), C)
