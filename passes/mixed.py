"""Mixed widths: `quantize_(model, budget=bits(2.5), candidates=[...])`.

Each weight matrix gets the candidate (a config: method, width, format) that minimizes the
predicted increase of the whole model's KL to the original within the size budget:
  1. the Kronecker input factor H_in of every matrix's KL Hessian (`kl_hessian`), one pass on
     the original model: with the output side taken as isotropic, the KL grows by
     ½ tr(ΔW H_in ΔWᵀ) for an error ΔW, summed over layers (YAQA's quadratic model);
  2. every candidate rounds every matrix it can (a candidate with `hessian="kl"` rounds with
     the factors of step 1, no pass of its own); each result's size (`storage_bits`) and
     predicted KL are measured, then the matrix is put back for the next candidate;
  3. `budget.allocate` picks one candidate per matrix (an expert stack as a whole: it keeps one
     format); the picked tensors are installed.
Each matrix's config is recorded as `quantize_` records it (the manifest), and the `Plan`
(what each matrix got, the bits, predicted KL against each uniform choice) is kept on the model:
`plan_of(model)`, printed by `discq quantize --target-bpw`, in the manifest and the model card.
Costs one KL pass plus every candidate's own run.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .budget import Bits, Options, allocate, total
from .calibration import as_batches
from .config import QuantConfig
from .gptq import proxy_loss
from .inspect import set_layer_config
from .kl_hessian import KLFactors
from .kl_rounding import check_whole_model, sharing

log = logging.getLogger("discq")

Unit = tuple[str, list[tuple[str, nn.Linear]]]  # (matrix name, its linears: experts are E)


@dataclass
class Plan:
    """What `quantize_(model, budget=..., candidates=...)` chose."""

    budget: float                            # bits per weight asked for
    bits_per_weight: float                   # bits per weight of the plan
    predicted_kl: float                      # ½ Σ tr(ΔW H_in ΔWᵀ) of the plan
    candidates: list[str]                    # labels, in the order given
    layers: dict[str, str]                   # matrix -> label of its candidate
    uniform: dict[str, tuple[float, float]]  # label -> (bits per weight, predicted KL)

    def to_dict(self) -> dict:
        return {"budget": self.budget, "bits_per_weight": round(self.bits_per_weight, 4),
                "predicted_kl": self.predicted_kl, "candidates": self.candidates,
                "layers": self.layers,
                "uniform": {k: {"bits_per_weight": round(b, 4), "predicted_kl": e}
                            for k, (b, e) in self.uniform.items()}}

    def describe(self, names: int = 0) -> str:
        """A few lines: the plan's bits and predicted KL beside each uniform candidate's, how
        many matrices got each candidate, and the first `names` matrices' choices."""
        counts = Counter(self.layers.values())
        lines = [f"mixed widths: {self.bits_per_weight:.3f} bits per weight (budget "
                 f"{self.budget}), predicted KL {self.predicted_kl:.4g}"]
        for lab in self.candidates:
            b, e = self.uniform.get(lab, (float("nan"), float("nan")))
            lines.append(f"  {lab}: {counts.get(lab, 0)} matrices; uniform {b:.3f} bits, "
                         f"predicted KL {e:.4g}")
        lines += [f"  {fqn}: {lab}" for fqn, lab in list(self.layers.items())[:names]]
        return "\n".join(lines)


def label(config: QuantConfig) -> str:
    """'gptq 3-bit g64', 'gptq Q4_K', 'qtip 2-bit' (+ ' kl' with KL Hessians)."""
    gguf = getattr(config, "gguf", None)
    group = getattr(config, "group_size", None)
    width = gguf or f"{config.bits}-bit" + (f" g{group}" if group else "")
    return f"{config.method} {width}" + (" kl" if getattr(config, "hessian", "") == "kl" else "")


def check_candidates(candidates) -> list[QuantConfig]:
    """`candidates`: a non-empty list of distinct discq configs that round weights only."""
    if not isinstance(candidates, (list, tuple)) or not candidates:
        raise TypeError("candidates must be a non-empty list of discq configs, e.g. "
                        "[gptq_config(bits=2, ...), gptq_config(bits=3, ...)]")
    for i, c in enumerate(candidates):
        if not isinstance(c, QuantConfig):
            raise TypeError(f"candidates[{i}] must be a discq config, got {type(c).__name__}")
        if getattr(c, "finetune", False):
            raise ValueError(f"candidates[{i}] fine-tunes (finetune=True), which changes "
                             f"weights beyond its matrices; mix without it and fine-tune after")
    labels = [label(c) for c in candidates]
    if len(set(labels)) < len(labels):
        twice = Counter(labels).most_common(1)[0][0]
        raise ValueError(f"candidates must differ: two are {twice!r}")
    return list(candidates)


def _batches(model: nn.Module, budget: Bits, candidates) -> list[Tensor]:
    data = budget.calibration
    if data is None:
        data = next((c.calibration for c in candidates
                     if getattr(c, "calibration", None) is not None), None)
    if data is None:
        raise ValueError("a budget needs calibration data for each layer's sensitivity: pass "
                         "bits(..., calibration=batches) or a candidate with calibration=")
    return as_batches(data, model)


def quantize_mixed(model: nn.Module, budget: Bits, candidates: list[QuantConfig],
                   units: list[Unit], run) -> Plan:
    """Round every unit with every candidate (`run(config, targets)` runs one config's method
    on targets), keep the allocation's choice in place; what was chosen."""
    targets = [t for _, group in units for t in group]
    check_whole_model(targets)
    batches = _batches(model, budget, candidates)
    factors = KLFactors(model, batches, targets, seed=budget.seed,
                        output_side=any(getattr(c, "kl_rows", 0) for c in candidates)).compute()
    originals = {fqn: m.weight for fqn, m in targets}
    options: list[Options] = [{} for _ in units]
    rounded: dict[tuple[int, str], nn.Parameter] = {}
    for ci, cfg in enumerate(tqdm(candidates, desc="mixed widths: candidates", leave=False)):
        with sharing(factors):
            done = run(cfg, targets)  # the fqns this candidate could round
        for fqn, m in targets:
            if fqn in done:
                rounded[ci, fqn] = m.weight
            m.weight = originals[fqn]
        for u, (_, group) in enumerate(units):
            if all(fqn in done for fqn, _ in group):
                options[u][ci] = _measure(group, ci, rounded, originals, factors)
    _check_options(units, options, candidates)
    return _install(model, budget, candidates, units, options, rounded)


def _measure(group, ci: int, rounded, originals, factors: KLFactors) -> tuple[float, float]:
    """(size in bits, predicted KL) of candidate `ci` on one unit's linears."""
    size = err = 0.0
    for fqn, _ in group:
        q = rounded[ci, fqn]
        size += q.storage_bits()
        err += 0.5 * proxy_loss(originals[fqn].detach(), q.dequantize(torch.float32),
                                factors.get(fqn)[0])
    return size, err


def _check_options(units: list[Unit], options: list[Options], candidates) -> None:
    missing = [name for (name, _), opts in zip(units, options) if not opts]
    if missing:
        raise ValueError(f"no candidate can quantize {missing[:5]} (their rows do not fit the "
                         f"candidates' formats); add a candidate that can, or leave them out "
                         f"with filter_fn")


def _install(model, budget: Bits, candidates, units, options, rounded):
    numel = sum(m.weight.numel() for _, group in units for _, m in group)
    smallest = sum(min(s for s, _ in opts.values()) for opts in options) / numel
    if smallest > budget.per_weight + 1e-9:
        raise ValueError(f"budget {budget.per_weight} bits per weight is below the smallest "
                         f"candidates' {smallest:.3f}: raise it or add a smaller candidate")
    choice = allocate(options, budget.per_weight * numel)
    labels = [label(c) for c in candidates]
    for (name, group), ci in zip(units, choice):
        for fqn, m in group:
            m.weight = rounded[ci, fqn]
            set_layer_config(m, "weight", candidates[ci].to_dict())
    size, err = total(options, choice)
    uniform = {}
    for c in range(len(candidates)):
        if all(c in o for o in options):
            s, e = total(options, [c] * len(units))
            uniform[labels[c]] = (s / numel, e)
    plan = Plan(budget.per_weight, size / numel, err, labels,
                {name: labels[ci] for (name, _), ci in zip(units, choice)}, uniform)
    log.info("quantize_: %s", plan.describe())
    return plan
