"""The bitshift trellis of QTIP (Tseng et al., 2024): states, codes, and the packed bitstream.

A tile of 16×16 = 256 weights (row-major) is coded as T = 256/V steps of a walk over the
2^L states of a bitshift trellis (L = 16): each step shifts k·V new bits into the state,
    s_t = ((s_{t-1} << kV) & (2^L − 1)) | new_t,
and emits V weights, the code's value of s_t. Only the new bits are stored, T·kV = 256·k bits
a tile, exactly k bits a weight: the walk is *tail-biting*, its first state's top L − kV bits
are the last state's low L − kV bits, so every state is the L bits of the cyclic bitstream
ending at its step.

Codes (value of a state, no table of 2^L entries needed to decode):
  1MAD  (V = 1)  x = 34038481·s + 76625530 mod 2³², (sum of x's bytes − 510)/147.8
  3INST (V = 1)  x = 89226354·s + 64248484 mod 2³², (x & 0x8FFF8FFF) ^ 0x3B603B60, the two
                 16-bit halves read as fp16 and added
  HYB   (V = 2)  h = s·(s + 1), row (h >> (15 − Q)) & (2^Q − 1) of a 2^Q × 2 table (Q = 9),
                 the first coordinate negated when bit 15 of h is set; the table is a 2-D
                 k-means fit to Gaussian samples (`hyb_table`, a constant of the format
                 that weights do not store), or the weight's own after fine-tuning.

Layout: a matrix [N, K] is cut into 16×16 tiles, tile (i, j) holding rows 16i.., columns
16j..; its bitstream is 256·k bits in 8·k int32 words, most significant bit first, step t's
new bits at stream bits [t·kV, (t+1)·kV).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

L = 16  # state bits: QTIP's trellis; fewer (down to 8) quantize 2^(16-L) times faster, worse
L_RANGE = (8, 16)
TILE = 16  # a tile is TILE × TILE weights
TILE_SIZE = TILE * TILE
CODES = {"1mad": 1, "3inst": 1, "hyb": 2}  # code -> V, weights per step
BITS = (2, 3, 4)
HYB_Q = 9  # HYB table rows: 2^Q
_MASK32 = (1 << 32) - 1


def check_code(code: str, bits: int, state_bits: int = L) -> None:
    if code not in CODES:
        raise ValueError(f"code must be one of {sorted(CODES)}, got {code!r}")
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS} for trellis codes, got {bits!r}")
    lo, hi = L_RANGE
    if isinstance(state_bits, bool) or not isinstance(state_bits, int) \
            or not lo <= state_bits <= hi or state_bits <= bits * CODES[code]:
        raise ValueError(f"state_bits must be an integer in [{lo}, {hi}] above bits·V = "
                         f"{bits * CODES[code]}, got {state_bits!r}")


def steps(code: str) -> int:
    """T: trellis steps per tile."""
    return TILE_SIZE // CODES[code]


def words(bits: int) -> int:
    """int32 words per tile: 256·bits / 32."""
    return TILE_SIZE * bits // 32


# ---- codes ----------------------------------------------------------------------------------

def _fp16_of(h: Tensor) -> Tensor:
    """16-bit patterns (int64 in [0, 2^16)) read as fp16 -> fp32."""
    return (h - ((h >> 15) << 16)).to(torch.int16).view(torch.float16).float()


def decode_states(states: Tensor, code: str, lut: Tensor | None = None) -> Tensor:
    """The code's values of trellis states: states [...] (int, < 2^16) -> [..., V] fp32.
    HYB reads its table `lut` [2^Q, 2] (None: the default table, `hyb_table`)."""
    s = states.to(torch.int64) & 0xFFFF
    if code == "1mad":
        x = (34038481 * s + 76625530) & _MASK32
        total = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + (x >> 24)
        return ((total - 510).float() / 147.8)[..., None]
    if code == "3inst":
        x = ((89226354 * s + 64248484) & _MASK32 & 0x8FFF8FFF) ^ 0x3B603B60
        return (_fp16_of(x & 0xFFFF) + _fp16_of(x >> 16))[..., None]
    if code == "hyb":
        lut = (hyb_table() if lut is None else lut).to(s.device)
        idx, sign = _hyb_lookup(s, lut.shape[0])
        row = lut.float()[idx]  # [..., 2]
        return torch.stack([row[..., 0] * sign, row[..., 1]], -1)
    raise ValueError(f"code must be one of {sorted(CODES)}, got {code!r}")


def _hyb_lookup(s: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """HYB's table row and first-coordinate sign (±1.0) of states s (int64)."""
    h = s * (s + 1)
    Q = rows.bit_length() - 1
    return (h >> (15 - Q)) & (rows - 1), 1 - 2 * ((h >> 15) & 1).float()


@functools.cache
def _default_table() -> Tensor:
    from .hyb_default import HEX
    bits = [int(HEX[i:i + 4], 16) for i in range(0, len(HEX), 4)]
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.float16).view(-1, 2)


def hyb_table() -> Tensor:
    """HYB's default table [512, 2] fp16 (`hyb_default.py`, made by `fit_hyb_table`): a weight
    coded with it stores no table (lut None)."""
    return _default_table().clone()


def fit_hyb_table(Q: int = HYB_Q, seed: int = 0) -> Tensor:
    """How the default table was made, [2^Q, 2] fp32: Lloyd's k-means of 2^Q points on 2-D
    standard Gaussian samples, scaled to standard deviation 0.968 (≈ √(1 − D) for the
    distortion D ≈ 0.063 of 2 bits: the reproduction of a Gaussian source shrinks)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1 << 16, 2, generator=g)  # [n, 2]
    C = X[torch.randperm(X.shape[0], generator=g)[: 1 << Q]].clone()  # [2^Q, 2]
    for _ in range(25):
        nearest = torch.cdist(X, C).argmin(1)  # [n]
        sums = torch.zeros_like(C).index_add_(0, nearest, X)
        counts = torch.bincount(nearest, minlength=C.shape[0]).clamp(min=1)
        C = sums / counts[:, None].float()
    return (C / C.std(unbiased=False) * 0.9682458365518543).contiguous()


def table_of(code: str, lut: Tensor | None) -> Tensor | None:
    """The table a weight's values come from: its own, HYB's default, or none (computed
    codes)."""
    return (hyb_table() if lut is None else lut) if code == "hyb" else None


def state_table(code: str, lut: Tensor | None = None, state_bits: int = L) -> Tensor:
    """Every state's value: [2^L, V] fp32. For quantization only (Viterbi reads it 2^L times
    a step); decoding computes values from states."""
    return decode_states(torch.arange(1 << state_bits), code, lut)


# ---- the bitstream --------------------------------------------------------------------------

def pack_states(states: Tensor, bits: int, V: int) -> Tensor:
    """Tail-biting walks [B, T] -> bitstreams [B, 8·bits] int32 (each step's new kV bits,
    most significant first). The caller guarantees the walk is a tail-biting trellis path."""
    kV = bits * V
    new = states.to(torch.int64) & ((1 << kV) - 1)  # [B, T]
    shifts = torch.arange(kV - 1, -1, -1, device=states.device)
    stream = ((new[..., None] >> shifts) & 1).reshape(states.shape[0], -1, 32)  # [B, W, 32]
    word = (stream << torch.arange(31, -1, -1, device=states.device)).sum(-1)  # [B, W]
    return (word - ((word >> 31) << 32)).to(torch.int32)


@functools.cache
def _windows(bits: int, V: int, Ls: int, device: str) -> tuple[Tensor, Tensor, Tensor]:
    """For each step t: (word index, next word index, right shift) of the Ls-bit window that
    ends at the step's last bit, read from the 64 bits of two consecutive words."""
    kV, n_bits = bits * V, TILE_SIZE * bits
    start = (torch.arange(1, TILE_SIZE // V + 1) * kV - Ls) % n_bits  # [T], cyclic
    w = start // 32
    return w.to(device), ((w + 1) % (n_bits // 32)).to(device), (64 - Ls - start % 32).to(device)


def unpack_states(qdata: Tensor, bits: int, V: int, state_bits: int = L) -> Tensor:
    """Bitstreams [..., 8·bits] int32 -> the states of each step [..., T] int64."""
    w, w_next, shift = _windows(bits, V, state_bits, str(qdata.device))
    u = qdata.to(torch.int64) & _MASK32  # [..., W] as unsigned
    pair = (u[..., w] << 32) | u[..., w_next]  # [..., T] (wraps into the sign bit: masked off)
    return (pair >> shift) & ((1 << state_bits) - 1)


def tail_bites(states: Tensor, bits: int, V: int, state_bits: int = L) -> Tensor:
    """Per walk [B, T]: whether it is a tail-biting trellis path (every state's top L − kV
    bits are the previous state's low ones, the first state's those of the last)."""
    kV = bits * V
    low = states & ((1 << (state_bits - kV)) - 1)
    return ((states >> kV) == low.roll(1, -1)).all(-1)


# ---- tiles ----------------------------------------------------------------------------------

def to_tiles(W: Tensor, V: int) -> Tensor:
    """[N, K] -> [N/16, K/16, T, V]: each tile's 256 weights row-major, V per step."""
    N, K = W.shape
    t = W.reshape(N // TILE, TILE, K // TILE, TILE).transpose(1, 2)
    return t.reshape(N // TILE, K // TILE, TILE_SIZE // V, V)


def from_tiles(tiles: Tensor) -> Tensor:
    """Inverse of `to_tiles`: [N/16, K/16, T, V] -> [N, K]."""
    n, k = tiles.shape[:2]
    t = tiles.reshape(n, k, TILE, TILE).transpose(1, 2)
    return t.reshape(n * TILE, k * TILE)


def decode_weight(qdata: Tensor, bits: int, code: str, lut: Tensor | None = None,
                  state_bits: int = L) -> Tensor:
    """The unscaled coded matrix [N, K] fp32 of qdata [N/16, K/16, 8·bits]."""
    V = CODES[code]
    return from_tiles(decode_states(unpack_states(qdata, bits, V, state_bits), code, lut))


def hyb_table_grad(qdata: Tensor, bits: int, grad_W: Tensor, rows: int,
                   state_bits: int = L) -> Tensor:
    """∂L/∂lut [rows, 2] of a HYB-coded matrix from ∂L/∂Ŵ [N, K] (Ŵ unscaled): each weight's
    gradient flows to the table row its state reads, through the state's sign."""
    row, sign = _hyb_lookup(unpack_states(qdata, bits, 2, state_bits), rows)  # [N/16, K/16, T]
    row, sign = row.reshape(-1), sign.reshape(-1)
    g = to_tiles(grad_W.float(), 2).reshape(-1, 2)  # [N·K/2, 2], in the states' order
    out = torch.zeros(rows, 2, device=grad_W.device)
    out[:, 0].index_add_(0, row, g[:, 0] * sign)
    out[:, 1].index_add_(0, row, g[:, 1])
    return out
