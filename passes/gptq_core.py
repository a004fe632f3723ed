"""GPTQ's rounding of one weight matrix given its Hessian (Frantar et al., 2022).

Columns are quantized one at a time; each one's rounding error, scaled by the upper Cholesky
factor U of H⁻¹, is fed into the columns not yet quantized. Lazy blocks of `block_size` columns
defer the update of the rest of the matrix to one matmul per block. Group scales are fitted from
the current, error-updated weights the first time a group is reached — also with act-order,
where groups stay contiguous in the original column order so storage is unchanged.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch
from discq.tensors.gguf import GGUFGrid
from discq.tensors.grid import (
    AffineGrid,
    expand_groups,
    fit_groups,
    fit_scale,
    resolved_group_size,
    zero_of,
)
from torch import Tensor


def inverse_cholesky_upper(H: Tensor, damp: float, name: str = "") -> Tensor:
    """U upper-triangular with UᵀU = (H + λI)⁻¹, λ = damp·mean(diag H). A failed Cholesky is
    retried with 10× more damping, with a warning."""
    mean_diag = H.diagonal().mean()
    for attempt in range(6):  # at most three K×K matrices besides H at a time: K = 14k is 2.3 GB
        lam = damp * 10**attempt * mean_diag
        Hd = H.clone()
        Hd.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0:
                if attempt:
                    warnings.warn(f"GPTQ {name}: Hessian not positive definite with damp={damp};"
                                  f" used damp={damp * 10**attempt}", stacklevel=3)
                return U
    raise ValueError(f"GPTQ {name}: the Hessian stays singular even with damp="
                     f"{damp * 10**5}; check the calibration data")


class _Groups:
    """Per-column scale/zero of the grid while GPTQ walks the columns of W: [N, K]. A GGML
    block grid is fitted a whole block at a time (a k-quant's super-block of 256: its
    sub-scales are quantized together) and keeps the block headers for packing."""

    def __init__(self, grid, N: int, K: int, dtype: torch.dtype, device):
        self.grid, self.N, self.K, self.dtype = grid, N, K, dtype
        R, C = (N, K) if grid.group_along == "input" else (K, N)
        self.g = resolved_group_size(grid, C)
        blocks = isinstance(grid, GGUFGrid)  # zero: -b/a fp32; headers kept for packing
        self.unit = grid.block if blocks else self.g  # columns fitted together
        G = math.ceil(C / self.g)
        self.scale = torch.zeros(R, G, dtype=dtype, device=device)
        self.zero = None if grid.symmetric else torch.zeros(
            R, G, dtype=torch.float32 if blocks else torch.uint8, device=device)
        self.headers = [None] * (C // self.unit) if blocks else None
        self.fitted = torch.zeros(G if grid.group_along == "input" else K, dtype=torch.bool)
        self.floats: dict[int, tuple[Tensor, Tensor | float]] = {}  # group -> fp32 scale, zero

    def for_column(self, c: int, current) -> tuple[Tensor, Tensor | float]:
        """scale [N] and zero point ([N], or a constant for a symmetric grid) of original
        column c, in fp32 (what encode and decode compute with). `current(cols)` gives the
        current values of original columns `cols` as [N, len(cols)]."""
        if self.grid.group_along == "input":
            gi = c // self.g
            if gi not in self.floats:  # fitted when first reached, then read per column
                if not self.fitted[gi]:
                    self._fit_unit(c // self.unit, current)
                z = None if self.zero is None else self.zero[:, gi]
                self.floats[gi] = self.scale[:, gi].float(), zero_of(z, self.grid)
            return self.floats[gi]
        if not self.fitted[c]:  # output grouping: this column's groups run along the rows
            s, z = fit_groups(current(torch.tensor([c])).t(), self.grid, self.dtype)  # [1, G]
            self._store(c, slice(None), s[0], None if z is None else z[0])
            self.fitted[c] = True
        z = None if self.zero is None else expand_groups(self.zero[c:c + 1], self.g, self.N)[0]
        return (expand_groups(self.scale[c:c + 1], self.g, self.N)[0].float(),
                zero_of(z, self.grid))

    def _fit_unit(self, u: int, current) -> None:
        cols = torch.arange(u * self.unit, min((u + 1) * self.unit, self.K))
        groups = slice(u * self.unit // self.g, (u * self.unit + len(cols) - 1) // self.g + 1)
        if self.headers is not None:
            s, z, self.headers[u] = self.grid.fit(current(cols))  # [N, unit / g], [N, 1, P]
        else:
            s, z = fit_scale(current(cols), self.grid, self.dtype)  # [N, 1]
        self._store(slice(None), groups, s, z)
        self.fitted[groups] = True

    def _store(self, r, c, s, z) -> None:
        self.scale[r, c] = s
        if z is not None:
            self.zero[r, c] = z


def _prepare(W: Tensor, H: Tensor, act_order: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Dead columns zeroed (H_ii = 0 → H_ii = 1, W[:, i] = 0), act-order permutation."""
    W, diag = W.float().clone(), H.diagonal().float()
    dead = diag == 0
    W[:, dead] = 0
    perm = (torch.argsort(diag.masked_fill(dead, 1), descending=True, stable=True) if act_order
            else torch.arange(W.shape[1], device=W.device))
    H = H.float()[perm[:, None], perm]  # one permuted copy, no intermediate of its size
    H.diagonal()[dead[perm]] = 1
    return W[:, perm], H, perm


def gptq_quantize(W: Tensor, H: Tensor, grid: AffineGrid, *, damp: float = 0.01,
                  act_order: bool = True, block_size: int = 128, scale_dtype=torch.float16,
                  name: str = "", seen: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """W: [N, K], H: [K, K] -> codes [N, K] uint8 (original column order), scale/zero in row
    form, and for a GGML block grid its block headers [N, K / block, P] (else None). `seen`,
    an [N, K] fp32 tensor, receives each weight's error-updated value at the moment it was
    rounded (the codes are its nearest grid points): DiscQuant relaxes around it."""
    if getattr(getattr(grid, "type", None), "vector", 0):
        return _codebook_quantize(W, H, grid, damp, name)
    N, K = W.shape
    with _few_threads(W.device.type == "cpu" and N * block_size <= SMALL_UPDATE):
        W, H, perm = _prepare(W, H, act_order)
        U = inverse_cholesky_upper(H, damp, name)
        del H  # the permuted copy: U is all the column loop needs
        pos = torch.empty_like(perm)
        pos[perm] = torch.arange(K, device=perm.device)  # original column -> permuted position
        groups = _Groups(grid, N, K, scale_dtype, W.device)
        codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
        seen_p = None if seen is None else torch.empty_like(W)  # [N, K] permuted order
        for i1 in range(0, K, block_size):
            i2 = min(i1 + block_size, K)
            _quantize_block(W, U, i1, i2, perm, pos, groups, codes, seen_p)
    if seen is not None:  # permuted order -> original
        seen.copy_(seen_p[:, pos])
    headers = None if groups.headers is None else torch.cat(groups.headers, dim=1)
    return codes[:, pos], groups.scale, groups.zero, headers


def _codebook_quantize(W: Tensor, H: Tensor, grid, damp: float, name: str
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A codebook GGML type (IQ2_XXS … IQ3_S): BlockLDLQ (`ldlq.py`), GPTQ's feedback over
    blocks of 8 columns (a sign byte's weights) in their order, as QuIP# rounds onto E8P.
    Each super-block's scales are fitted when it is first reached, to its columns as the
    feedback so far has moved them (as `_Groups` does for the scalar grids: scales fitted to
    the original W clip the moved weights at 2 bits); scale search and codeword search are
    weighted by the Hessian's diagonal (the block's own error is e·H_BB·eᵀ; its diagonal is
    what llama.cpp's importance matrix keeps). -> (codes [N, K / 8]: each 8 weights'
    codeword indices and sign byte, scale [N, K / group], zero 0, headers)."""
    from .ldlq import block_ldl
    W, H, _ = _prepare(W, H, act_order=False)
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        UI = block_ldl(H, 8)  # blocks of 8 columns: a sign byte's weights (parity)
    except ValueError as e:  # not positive definite even damped
        raise ValueError(f"GPTQ {name}: {e}") from None
    importance = H.diagonal() / H.diagonal().mean()  # [K]
    (N, K), S, g = W.shape, grid.block, grid.group_size
    What = torch.zeros_like(W)
    codes = torch.zeros(N, K // 8, dtype=torch.int64, device=W.device)
    scale = torch.zeros(N, K // g, device=W.device)
    headers = []
    for b in range(0, K, 8):
        if b % S == 0:  # a new super-block: its scales from its current (moved) columns
            cur = W[:, b:b + S] + (W[:, :b] - What[:, :b]) @ UI[:b, b:b + S]
            a, _, head = grid.fit(cur, importance[b:b + S].expand_as(cur))
            scale[:, b // g:(b + S) // g] = a
            headers.append(head)
        target = W[:, b:b + 8] + (W[:, :b] - What[:, :b]) @ UI[:b, b:b + 8]  # [N, 8]
        a = scale[:, b // g, None]  # [N, 1]
        codes[:, b // 8], values = grid.round_vectors(
            target / a, importance=importance[b:b + 8].expand_as(target))
        What[:, b:b + 8] = values * a
    return codes, scale, torch.zeros_like(scale), torch.cat(headers, dim=1)


# Below this many elements per column update, one CPU thread is faster: the per-column ops are
# tiny, and waking a second thread costs more than it saves (measured 4x slower with 2 threads
# on 2 busy cores for SmolLM2's 576-row layers; the Cholesky inverse of 1536x1536 likewise).
SMALL_UPDATE = 2**18


@contextmanager
def _few_threads(active: bool):
    """Run the column loop on one intra-op thread (restored afterwards) when `active`."""
    n = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if active:
            torch.set_num_threads(n)


def _quantize_block(W, U, i1, i2, perm, pos, groups, codes, seen=None) -> None:
    """Columns i1..i2 (permuted order) with intra-block error feedback, then the lazy update."""
    W1 = W[:, i1:i2].clone()
    E = torch.zeros_like(W1)

    def current(cols: Tensor) -> Tensor:  # [N, len(cols)], exact even past the block
        p = pos[cols]
        out = W[:, p].clone()
        inside = p < i2
        out[:, inside] = W1[:, p[inside] - i1]
        if (~inside).any() and j > 0:
            out[:, ~inside] -= E[:, :j] @ U[i1:i1 + j][:, p[~inside]]
        return out

    grid, original = groups.grid, perm[i1:i2].tolist()
    levels = getattr(grid, "levels", None)  # a non-linear grid (IQ4_NL/IQ4_XS): [L] fp32
    mids = None if levels is None else (levels[1:] + levels[:-1]).to(W.device) / 2
    for j in range(i2 - i1):
        col = i1 + j
        s, z = groups.for_column(original[j], current)  # [N] fp32 each (z: or a constant)
        w = W1[:, j]
        # encode's and decode's arithmetic, with the codes kept in fp32 until stored (a third
        # fewer ops per column than calling them: this loop's time is per-op overhead)
        if mids is None:
            q = v = torch.round(w / s + z).clamp_(0, grid.qmax)
        else:  # the nearest level (mids: midpoints between levels)
            q = torch.bucketize(w / s + z, mids)
            v = levels[q]
        codes[:, col] = q
        if seen is not None:
            seen[:, col] = w
        e = (w - (v - z) * s) / U[col, col]
        W1[:, j:] -= e[:, None] * U[col, col:i2][None, :]
        E[:, j] = e
    W[:, i2:] -= E @ U[i1:i2, i2:]
    W[:, i1:i2] = W1
