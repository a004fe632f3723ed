"""QTIP (Tseng et al., 2024): QuIP#'s pipeline with the bitshift trellis in place of the E8P
lattice. Incoherence processing, BlockLDLQ in blocks of 16 columns whose 16×16 tiles are coded
by tail-biting Viterbi (`tensors/viterbi.py`), then (optionally) QuIP#'s fine-tuning of what
stays continuous — sign vectors, norms and, for the HYB code, its table.

Per group of linears sharing an input Hessian H (as in QuIP#):
  H ← H / mean(diag H) + σ·I,  W̃ = R_out W R_inᵀ,  H̃ = R_in H R_inᵀ
  scale = RMS(W̃) / (0.9 · RMS of the code)          (QTIP's scale override)
  Ŵ̃ = BlockLDLQ(W̃/scale, H̃, g = 16): each block of 16 columns, cut into 16×16 tiles, is
       coded tile by tile, 256 weights in exactly 256·k bits.
The block driver, damping and fine-tuning are QuIP#'s (`quip_sharp.py`, `training/`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from discq.tensors import trellis
from discq.tensors.qtip import SCALE_OVERRIDE, TrellisQuantizedTensor, check_shape, target_scale
from discq.tensors.viterbi import quantize_tiles
from torch import Tensor, nn

from .ldlq import ldlq
from .quip_sharp import (BlockHook, RotatedConfig, RotatedGroup, ignore_grid_options,
                         rotated_quantize, run_rotated)
from .registry import constructs, handles, register_method
from .validate import check_number


@register_method("qtip", summary="QTIP: bitshift-trellis codes (Viterbi) + incoherence + "
                 "fine-tuning", paper="Tseng et al., QTIP (NeurIPS 2024), arXiv:2406.11235",
                 data_driven=True, finetunes_itself=True, affine_grid=False, order=35,
                 layer_cost=4.0)
@dataclass
class QtipConfig(RotatedConfig):
    """QTIP; see `qtip_config` (the shared options: `RotatedConfig`)."""

    bits: int = 2
    code: str = "hyb"
    state_bits: int = trellis.L
    scale_override: float = SCALE_OVERRIDE

    def __post_init__(self):
        super().__post_init__()
        trellis.check_code(self.code, self.bits, self.state_bits)
        check_number(positive=True, scale_override=self.scale_override)


@constructs(QtipConfig)
def qtip_config(bits: int = 2, calibration=None, code: str = "hyb", finetune: bool = True,
                seed: int = 0, state_bits: int = trellis.L,
                scale_override: float = SCALE_OVERRIDE,
                group_size: int | None = None, symmetric: bool = False,
                steps: int | None = None, checkpoint_dir: str | None = None,
                trainer_kwargs: dict | None = None, hessian: str = "inputs",
                kl_rows: int = 0, **finetune_options) -> QtipConfig:
    """QTIP at `bits` = 2, 3 or 4 bits per weight (exactly, plus one scale, the sign vectors
    and for HYB a 512×2 table per layer), with `calibration` = token batches
    (`discq.data.calibration_batches`). `code`: "hyb" (two weights a step from a tuned
    table; QTIP's recipe), "1mad" or "3inst" (one weight a step, computed from the state).
    `state_bits`: the trellis' state size L; QTIP's 16 is the best code, each bit less halves
    the quantization time (Viterbi visits 2^L states a step) at some cost in error.
    `finetune=True` then tunes sign vectors, norms and the HYB table block by block, and end
    to end (`steps` optimizer steps; `ft_*` keywords and `checkpoint_dir`, which makes the
    run resumable, as for `quip_sharp_config`). `hessian="kl"`, `kl_rows`: as for
    `gptq_config` (rows fed back whole 16-row tiles at a time).
    `group_size`/`symmetric` exist for the command line's sake: trellis codes have neither,
    so they are ignored (with a warning if set)."""
    ignore_grid_options("qtip", "trellis codes", group_size, symmetric, finetune_options, steps)
    return QtipConfig(bits=bits, calibration=calibration, code=code, finetune=finetune,
                      seed=seed, state_bits=state_bits, scale_override=scale_override,
                      checkpoint_dir=checkpoint_dir, trainer_kwargs=trainer_kwargs,
                      hessian=hessian, kl_rows=kl_rows, **finetune_options)


@handles(QtipConfig)
def _qtip_model(model: nn.Module, config: QtipConfig, targets) -> None:
    run_rotated(model, config, targets, qtip_quantize)


class TileCoder:
    """The block quantizer handed to `ldlq`: codes a block of 16 columns [N, 16] as N/16 tiles
    and keeps each block's walks for packing (no refinement passes revisit a block)."""

    def __init__(self, config: QtipConfig, values: Tensor):
        self.V = trellis.CODES[config.code]
        self.kV, self.values = config.bits * self.V, values
        self.walks: dict[int, Tensor] = {}

    def __call__(self, W_B: Tensor, b: int) -> Tensor:
        N = W_B.shape[0]
        tiles = W_B.reshape(N // trellis.TILE, trellis.TILE_SIZE // self.V, self.V)
        states = quantize_tiles(tiles, self.values, self.kV)  # [N/16, T]
        self.walks[b] = states
        return self.values[states].reshape(N, trellis.TILE)

    def states(self) -> Tensor:
        """[N/16, K/16, T]: every tile's walk."""
        return torch.stack([self.walks[b] for b in sorted(self.walks)], 1)


def quantize_group(weights: list[tuple[str, Tensor]], H: Tensor, config: QtipConfig,
                   H_out: Tensor | None = None) -> list[TrellisQuantizedTensor]:
    """QTIP of linears sharing the input Hessian H: [K, K]; weights = [(fqn, W [N_i, K])].
    With `H_out` (one weight; KL Hessians H_out ⊗ H) rows are fed back along the output side,
    whole tiles at a time."""
    values = trellis.state_table(config.code, None, config.state_bits)  # [2^L, V]; HYB's default
    g = RotatedGroup(weights, H, config, check_shape,
                     lambda Wt: target_scale(Wt, config.code, values, config.scale_override))

    def round_rows(target: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        coder = TileCoder(config, values)
        What = ldlq(target, g.Ht, coder, g=trellis.TILE)
        return coder.states(), What  # [n/16, K/16, T]

    if H_out is None:
        states = round_rows(torch.cat(g.parts), slice(None))[0].split(
            [p.shape[0] // trellis.TILE for p in g.parts])
    else:
        states = [torch.cat(g.two_sided(H_out, round_rows, config, unit=trellis.TILE))]
    return [TrellisQuantizedTensor.from_states(st, scale, g.s_in, s_out, g.q_in, q_out,
                                               config.bits, config.code, W.dtype,
                                               config.state_bits)
            for st, scale, (s_out, q_out), (_, W) in zip(states, g.scales, g.outs, weights)]


def qtip_quantize(model: nn.Module, config: QtipConfig, targets, *,
                  after_block: BlockHook | None = None) -> None:
    """QTIP on `targets`, block by block (the driver QuIP# uses, `rotated_quantize`)."""
    rotated_quantize(model, config, targets, quantize_group=quantize_group,
                     check_shape=check_shape, desc=f"QTIP {config.bits}-bit {config.code}",
                     after_block=after_block)
