"""QuIP# (Tseng et al., 2024): incoherence processing, BlockLDLQ on the E8P lattice codebook,
then (optionally) fine-tuning of what stays continuous. This file holds the config, the
per-layer rounding and the block-by-block driver; the fine-tuning runs with Lightning in
`discq.training` (which calls `quip_sharp_quantize` with a per-block hook). Blocks are walked by
the shared block driver (`capture.sequential_quantize`).

Per layer (W: [N, K], Hessian H of its inputs):
  H ← H / mean(diag H) + σ·I                       (σ = 0.01)
  W̃ = R_out W R_inᵀ, H̃ = R_in H R_inᵀ              (seeded randomized Hadamard rotations)
  scale = RMS(W̃) / ρ                               (ρ ≈ 1, per bits, lattice.WEIGHT_RMS)
  Ŵ̃ = BlockLDLQ(W̃/scale, H̃, E8P, g = 8) + `refine_passes` rounds of coordinate descent
Linears reading the same input (q/k/v, gate/up) share H̃ and are rounded together as one
stacked matrix (rows are independent in LDLQ), each with its own rotation and scale.

What QTIP (`qtip.py`) shares with it lives here too: `RotatedConfig` (seed, damping, the
fine-tuning options), `RotatedGroup` (rotations, damped rotated Hessian, scales),
`rotated_quantize`/`RotatedBlocks` (the block driver's hooks) and `run_rotated` (the handler,
with or without fine-tuning); a rotated-basis method supplies its per-group quantizer.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from discq.tensors import e8p_residual
from discq.tensors.hadamard import layer_seed, rotate_hessian, rotate_weight, rotation
from discq.tensors.lattice import WEIGHT_RMS, LatticeQuantizedTensor, check_shape
from torch import Tensor, nn

from .block_source import checkpointed
from .calibration import as_batches
from .capture import (
    BlockHooks,
    Inputs,
    hidden_state,
    input_hidden,
    sequential_quantize,
    set_hidden,
)
from .config import QuantConfig, check_hessian
from .kl_rounding import kl_factors
from .ldlq import ldlq
from .quantize import check_finite, install_weight
from .registry import constructs, handles, register_method
from .two_sided import round_two_sided
from .validate import check_bool, check_dir, check_int, check_number

BLOCK = 8  # columns per lattice code


@dataclass
class RotatedConfig(QuantConfig):
    """What the rotated-basis methods (QuIP#, QTIP) share: calibration, the rotations' seed,
    Hessian damping, and QuIP#'s fine-tuning (sign vectors and norms block by block, then end
    to end; `ft_*`). `calibration` and `trainer_kwargs` are run-time inputs and are not
    serialized."""

    calibration: Any = field(default=None, repr=False, compare=False)
    seed: int = 0
    sigma_reg: float = 0.01
    finetune: bool = True
    ft_block_epochs: int = 2
    ft_block_lr: float = 5e-4
    ft_steps: int = 100
    ft_lr: float = 1e-5
    ft_sign_lr: float = 1e-4
    ft_batch_size: int = 2
    ft_valid_fraction: float = 0.125
    ft_patience: int = 3
    ft_tune_head: bool = True
    checkpoint_dir: str | None = None
    trainer_kwargs: dict | None = field(default=None, repr=False, compare=False,
                                        metadata={"serialize": False})
    hessian: str = "inputs"
    kl_rows: int = 0

    def __post_init__(self):
        self.checkpoint_dir = check_dir("checkpoint_dir", self.checkpoint_dir)
        check_int(0, seed=self.seed, ft_block_epochs=self.ft_block_epochs,
                  ft_steps=self.ft_steps)
        check_int(1, ft_batch_size=self.ft_batch_size, ft_patience=self.ft_patience)
        check_number(positive=True, sigma_reg=self.sigma_reg, ft_block_lr=self.ft_block_lr,
                     ft_lr=self.ft_lr, ft_sign_lr=self.ft_sign_lr)
        if not 0 <= self.ft_valid_fraction < 1:
            raise ValueError(f"ft_valid_fraction must be in [0, 1), got {self.ft_valid_fraction!r}")
        check_bool(finetune=self.finetune, ft_tune_head=self.ft_tune_head)
        check_hessian(self)
        if self.trainer_kwargs is not None and not isinstance(self.trainer_kwargs, dict):
            raise TypeError(f"trainer_kwargs must be a dict of lightning.Trainer arguments, got "
                            f"{type(self.trainer_kwargs).__name__}")


@register_method("quip-sharp", summary="QuIP#: E8P lattice codes + incoherence + fine-tuning",
                 paper="Tseng et al., QuIP# (ICML 2024), arXiv:2402.04396", data_driven=True,
                 finetunes_itself=True, affine_grid=False, order=30, layer_cost=3.0)
@dataclass
class QuipSharpConfig(RotatedConfig):
    """QuIP#; see `quip_sharp_config` (the shared options: `RotatedConfig`)."""

    bits: int = 2
    refine_passes: int = 2
    weight_rms: float | None = None

    def __post_init__(self):
        super().__post_init__()
        e8p_residual.check_bits(self.bits)
        check_int(0, refine_passes=self.refine_passes)
        if self.weight_rms is not None:
            check_number(positive=True, weight_rms=self.weight_rms)

    @property
    def rms(self) -> float:
        return self.weight_rms or WEIGHT_RMS[self.bits]


@constructs(QuipSharpConfig)
def quip_sharp_config(bits: int = 2, calibration=None, finetune: bool = True,
                      refine_passes: int = 2, seed: int = 0, weight_rms: float | None = None,
                      group_size: int | None = None, symmetric: bool = False,
                      steps: int | None = None, checkpoint_dir: str | None = None,
                      trainer_kwargs: dict | None = None, hessian: str = "inputs",
                      kl_rows: int = 0, **finetune_options) -> QuipSharpConfig:
    """QuIP# at `bits` = 2 (E8P), 3 or 4 (E8P + a residual code) bits per weight, with
    `calibration` = token batches (`discq.data.calibration_batches`). `refine_passes`: rounds
    of block coordinate descent after BlockLDLQ (QuIP# uses 10; each costs about one LDLQ).
    `finetune=True` then tunes sign vectors and norms block by block, and sign vectors, norms
    and head end to end (`steps` optimizer steps, early-stopped on held-out calibration);
    `ft_*` keywords set its options (see `QuipSharpConfig`); `checkpoint_dir` makes the run
    resumable: finished blocks are saved there, and the same call started again continues
    after the last one (and from the end-to-end stage's last checkpoint).
    `hessian="kl"`: each layer rounded for the whole model's output (YAQA's Kronecker factors
    of the KL Hessian, rows fed back `kl_rows` at a time; see `gptq_config`).
    `group_size`/`symmetric` exist for the command line's sake: lattice codes have no groups
    and no zero point, so they are ignored (with a warning if set)."""
    ignore_grid_options("quip-sharp", "lattice codes", group_size, symmetric, finetune_options,
                        steps)
    return QuipSharpConfig(bits=bits, calibration=calibration, finetune=finetune,
                           refine_passes=refine_passes, seed=seed, weight_rms=weight_rms,
                           checkpoint_dir=checkpoint_dir, trainer_kwargs=trainer_kwargs,
                           hessian=hessian, kl_rows=kl_rows, **finetune_options)


def ignore_grid_options(method: str, codes: str, group_size: int | None, symmetric: bool,
                        finetune_options: dict, steps: int | None) -> None:
    """What the rotated-basis constructors do with the command line's generic options: warn
    that `group_size`/`symmetric` mean nothing to their codes, and take `steps` as `ft_steps`
    (into `finetune_options`)."""
    if group_size is not None or symmetric:
        warnings.warn(f"{method}: {codes} have no scale groups or zero points; "
                      f"group_size={group_size!r}/symmetric={symmetric!r} are ignored",
                      stacklevel=3)
    if steps is not None:
        finetune_options["ft_steps"] = steps


@handles(QuipSharpConfig)
def _quip_sharp_model(model: nn.Module, config: QuipSharpConfig, targets) -> None:
    run_rotated(model, config, targets, quip_sharp_quantize)


def run_rotated(model: nn.Module, config: RotatedConfig, targets,
                quantize: Callable[..., None]) -> None:
    """A rotated-basis method's handler: `quantize(model, config, targets, after_block=...)`
    (its block driver) alone, or with fine-tuning when `config.finetune`."""
    if not config.finetune:
        quantize(model, config, targets)
        return
    # block-wise fine-tuning after each block, then end to end: Lightning, loaded on first use
    from discq.training.quip_handler import rotated_finetuned
    rotated_finetuned(model, config, targets, quantize)


# ---- one group of linears ------------------------------------------------------------------

def regularize(H: Tensor, sigma: float) -> Tensor:
    """H / mean(diag H) + σ·I (QuIP#); dead inputs (zero diagonal) get σ."""
    H = H.float()
    mean = H.diagonal().mean().clamp(min=1e-12)
    return H / mean + sigma * torch.eye(H.shape[0], device=H.device)


class CodeRecorder:
    """The vector quantizer handed to `ldlq`: rounds blocks to the lattice codebook and keeps
    every (values, codes) it returned, so the codes of the final Ŵ can be read back (refine
    keeps either the old or the new block of each row)."""

    def __init__(self, bits: int):
        self.bits = bits
        self.calls: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def __call__(self, W_B: Tensor, b: int) -> Tensor:
        values, codes = e8p_residual.quantize(W_B, self.bits)  # [N, 8], [N, stages]
        self.calls.setdefault(b, []).append((values, codes))
        return values

    def codes(self, What: Tensor) -> Tensor:
        """Codes of Ŵ: [N, K] -> [N, K/8, stages] int64."""
        out = []
        for b in range(0, What.shape[1], BLOCK):
            final = What[:, b:b + BLOCK]
            cands = self.calls[b]
            codes = cands[-1][1].clone()
            found = (cands[-1][0] == final).all(-1)
            for values, c in reversed(cands[:-1]):
                take = ~found & (values == final).all(-1)
                codes[take], found = c[take], found | take
            if not found.all():
                raise RuntimeError("internal error: a block of Ŵ matches no recorded code")
            out.append(codes)
        return torch.stack(out, 1)


def quantize_group(weights: list[tuple[str, Tensor]], H: Tensor, config: QuipSharpConfig,
                   H_out: Tensor | None = None) -> list[LatticeQuantizedTensor]:
    """QuIP# of linears sharing the input Hessian H: [K, K]; weights = [(fqn, W [N_i, K])].
    With `H_out` (one weight; KL Hessians H_out ⊗ H) rows are fed back along the output side."""
    g = RotatedGroup(weights, H, config, check_shape,
                     lambda Wt: Wt.pow(2).mean().sqrt().clamp(min=1e-12) / config.rms)

    def round_rows(target: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        recorder = CodeRecorder(config.bits)
        What = ldlq(target, g.Ht, recorder, g=BLOCK, passes=config.refine_passes)
        return recorder.codes(What), What

    if H_out is None:
        codes = round_rows(torch.cat(g.parts), slice(None))[0].split(
            [p.shape[0] for p in g.parts])
    else:
        codes = [torch.cat(g.two_sided(H_out, round_rows, config))]
    return [LatticeQuantizedTensor.from_codes(c, scale, g.s_in, s_out, g.q_in, q_out,
                                              config.bits, W.dtype)
            for c, scale, (s_out, q_out), (_, W) in zip(codes, g.scales, g.outs, weights)]


class RotatedGroup:
    """Linears sharing the input Hessian H [K, K], in their seeded rotated bases (QuIP#, QTIP):
    the input rotation (s_in, q_in), the damped rotated Hessian Ht, and per weight W̃/scale
    (`parts`), `scales` (from `scale_of(W̃)`) and its output rotation (`outs`). Stacked, the
    parts are one matrix for BlockLDLQ (rows are independent in it)."""

    def __init__(self, weights: list[tuple[str, Tensor]], H: Tensor, config: RotatedConfig,
                 check_shape: Callable[[int, int], None], scale_of: Callable[[Tensor], Tensor]):
        self.s_in, self.q_in = rotation(H.shape[0], layer_seed(weights[0][0], config.seed))
        self.Ht = rotate_hessian(regularize(H, config.sigma_reg), self.s_in, self.q_in)
        self.parts, self.scales, self.outs = [], [], []
        for fqn, W in weights:
            check_finite(W, fqn)
            check_shape(*W.shape)
            s_out, q_out = rotation(W.shape[0], layer_seed(fqn, config.seed) + 7919)
            Wt = rotate_weight(W.detach().float(), s_out, self.s_in, q_out, self.q_in)
            self.scales.append(scale_of(Wt))
            self.parts.append(Wt / self.scales[-1])
            self.outs.append((s_out, q_out))

    def two_sided(self, H_out: Tensor, round_rows, config: RotatedConfig, unit: int = 1
                  ) -> list:
        """The one weight of this group rounded with KL Hessians H_out ⊗ H (H_out: [N, N] of
        the weight as stored; rotated here like the weight): its pieces, row block by row block
        (`two_sided.round_two_sided`)."""
        if len(self.parts) != 1:
            raise ValueError("two-sided rounding takes one weight: KL Hessians differ per layer")
        s_out, q_out = self.outs[0]
        Ht_out = rotate_hessian(H_out.float(), s_out, q_out)
        return round_two_sided(self.parts[0], self.Ht, Ht_out, round_rows,
                               rows=config.kl_rows, unit=unit)


# ---- the model, block by block (through the shared block driver) ---------------------------

BlockHook = Callable[[nn.Module, Inputs, list[Tensor]], None]


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: Inputs) -> list[Tensor]:
    """The block's hidden-state output per batch."""
    return [hidden_state(block(*args, **kwargs)) for args, kwargs in inputs]


def _with_hidden(inputs: Inputs, hidden: list[Tensor]) -> Inputs:
    """Copies of the (args, kwargs) with the hidden state replaced (other entries shared)."""
    out = []
    for (args, kwargs), h in zip(inputs, hidden):
        args, kwargs = list(args), dict(kwargs)
        set_hidden(args, kwargs, h)
        out.append((args, kwargs))
    return out


GroupQuantizer = Callable[[list[tuple[str, Tensor]], Tensor, Any], list]


class RotatedBlocks(BlockHooks):
    """The rotated-basis methods' part of the block driver (QuIP#, QTIP: `quantize_group`
    rounds the linears sharing one input Hessian to their format). A rounded layer holds its dequantized weight as a dense
    fp tensor while the block's remaining calibration passes run (they only need the layer's
    function, and a dense matmul computes it without decoding codes and rotating activations
    on every batch: 3-4x faster on CPU); `finish` installs the lattice weights. With
    `after_block`, the original model's output of each block is tracked (from the original
    model's inputs) and `after_block(block, inputs, fp_outputs)` fine-tunes the rounded block
    against it."""

    def __init__(self, config: RotatedConfig, quantize_group: GroupQuantizer,
                 after_block: BlockHook | None):
        self.config, self.after_block, self.quantize = config, after_block, quantize_group
        self.changes_block = after_block is not None
        self.done: list[tuple[nn.Linear, Tensor]] = []
        self.fp_inputs: Inputs | None = None  # the original model's inputs of the next block
        self.fp_out: list[Tensor] | None = None  # and its outputs of the current one

    def quantize_group(self, group: list[tuple[str, nn.Linear]], H: Tensor) -> None:
        qs = self.quantize([(fqn, m.weight.detach()) for fqn, m in group], H, self.config)
        for (_, m), q in zip(group, qs):
            m.weight = nn.Parameter(q.dequantize(), requires_grad=False)
            self.done.append((m, q))

    def before(self, block: nn.Module, inputs: Inputs) -> None:
        if self.after_block:
            if self.fp_inputs is None:
                self.fp_inputs = _with_hidden(inputs, [input_hidden(a, k) for a, k in inputs])
            self.fp_out = block_outputs(block, self.fp_inputs)

    def carried(self) -> list[Tensor] | None:
        # the original model's inputs of the next block: a resumed run needs them back
        if self.fp_inputs is None:
            return None
        return [input_hidden(a, k) for a, k in self.fp_inputs]

    def carry(self, inputs: Inputs, tensors: list[Tensor]) -> None:
        self.fp_inputs = _with_hidden(inputs, tensors)

    def after(self, block: nn.Module, inputs: Inputs) -> None:
        if not self.after_block:
            return
        if self.done:
            self.finish(block)  # fine-tuning trains the quantized weights' sign vectors
            with torch.enable_grad():
                self.after_block(block, inputs, self.fp_out)
        self.fp_inputs = _with_hidden(self.fp_inputs, self.fp_out)

    def finish(self, block: nn.Module | None) -> None:
        for m, q in self.done:
            install_weight(m, q)
        self.done = []


@torch.no_grad()
def rotated_quantize(model: nn.Module, config: RotatedConfig, targets, *,
                     quantize_group: GroupQuantizer, check_shape: Callable[[int, int], None],
                     desc: str, after_block: BlockHook | None = None) -> None:
    """Quantize `targets` block by block (the shared driver, `capture.sequential_quantize`):
    each block's Hessians come from the outputs of the already-quantized blocks before it.
    With `after_block`, it is called after each block is quantized as
    after_block(block, inputs, fp_outputs): its inputs (from the quantized model) and the
    original model's outputs of that block, the fine-tuning target."""
    batches = as_batches(config.calibration, model)
    for fqn, m in targets:  # refuse bad layers before any work, naming them
        check_finite(m.weight, fqn)
        check_shape(*m.weight.shape)
    if config.hessian == "kl":  # every layer's factors, from the original model, first
        quantize_group = per_layer_kl(quantize_group, kl_factors(model, batches, targets, config))
    hooks = RotatedBlocks(config, quantize_group, after_block)
    blocks_dir = None if config.checkpoint_dir is None else Path(config.checkpoint_dir) / "blocks"
    with checkpointed(blocks_dir, config.to_json()):
        sequential_quantize(model, batches, targets, quantize_group=hooks.quantize_group,
                            desc=desc, hooks=hooks)


def per_layer_kl(quantize_group: GroupQuantizer, factors) -> GroupQuantizer:
    """The group quantizer with KL Hessians: each linear with its own factors (the driver's
    shared input Hessian is not used)."""
    def quantize(weights, H, config):
        out = []
        for fqn, W in weights:
            H_in, H_out = factors.pop(fqn)
            out += quantize_group([(fqn, W)], H_in, config, H_out)
        return out
    return quantize


def quip_sharp_quantize(model: nn.Module, config: QuipSharpConfig, targets, *,
                        after_block: BlockHook | None = None) -> None:
    """QuIP# on `targets` (see `rotated_quantize`)."""
    rotated_quantize(model, config, targets, quantize_group=quantize_group,
                     check_shape=check_shape, desc=f"QuIP# {config.bits}-bit",
                     after_block=after_block)
