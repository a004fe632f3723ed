"""`quantize_(model, config, *, filter_fn=None)`: the one entry point."""
from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable

import torch
from discq.tensors.base import QuantizedTensor, unwrap_compiled
from torch import nn

from .config import QuantConfig
from .inspect import set_layer_config
from .matrices import Coverage, Matrix, coverage, router_matrices
from .matrices import candidates as candidates_of
from .prepare import Prepared
from .registry import method_of
from .validate import check_bool

log = logging.getLogger("discq")

FilterFn = Callable[[nn.Module, str], bool]


def is_linear(module: nn.Module, fqn: str = "") -> bool:
    """A filter selecting the `nn.Linear` layers whose weight is not quantized yet (and no
    Conv1D or experts)."""
    return isinstance(module, nn.Linear) and not isinstance(module.weight, QuantizedTensor)


def select_linears(model: nn.Module, filter_fn: FilterFn) -> list[tuple[str, nn.Linear]]:
    return [(fqn, m) for fqn, m in model.named_modules()
            if isinstance(m, nn.Linear) and filter_fn(m, fqn)]


def select_matrices(model: nn.Module, filter_fn: FilterFn | None) -> list[Matrix]:
    """The matrices `quantize_(model, config, filter_fn=filter_fn)` would quantize."""
    return _select(candidates_of(model), filter_fn)[0]


def planned_coverage(model: nn.Module, filter_fn: FilterFn | None = None
                     ) -> tuple[list[Matrix], Coverage]:
    """What `quantize_` with one config and `filter_fn` would quantize and leave, before any
    work (`discq plan`): the selected matrices and the coverage."""
    chosen, skipped = _select(candidates_of(model), filter_fn)
    return chosen, coverage(model, chosen, skipped)


DEFAULT_KEY = "_default"

# called with the model after every successful quantize_ (discq.hf registers the one that makes
# a transformers model save with save_pretrained); passes/ knows nothing of transformers
AFTER_QUANTIZE: list[Callable[[nn.Module], None]] = []


def after_quantize(fn: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Decorator: run `fn(model)` after every successful `quantize_`."""
    AFTER_QUANTIZE.append(fn)
    return fn


def _check_args(model, config) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(config, dict):
        for key, value in config.items():
            if not isinstance(key, str):
                raise TypeError(f"config keys must be module names, 're:<regex>' or "
                                f"{DEFAULT_KEY!r}, got {key!r}")
            if value is not None and not isinstance(value, QuantConfig):
                raise TypeError(f"config[{key!r}] must be a discq config or None (leave the "
                                f"module in full precision), got {type(value).__name__}")
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a discq config such as rtn_config(bits=4), or a dict "
                        f"of module names/patterns to configs, got {type(config).__name__}")


def quantize_(model: nn.Module, config=None, *, filter_fn: FilterFn | None = None,
              calibrate_all_experts: bool = False, budget=None, candidates=None) -> nn.Module:
    """Quantize, in place, the weight matrices of `model` that `filter_fn(module, fqn)` selects
    (default: all but mixture-of-experts routers) with `config`. Returns `model`.

    Weight matrices are `nn.Linear` layers, transformers' `Conv1D` layers (GPT-2; each becomes
    the nn.Linear it is) and the stacked experts of mixture-of-experts layers, named by their
    parameter (`model.layers.0.mlp.experts.gate_up_proj`; `filter_fn` gets the experts module).
    `config` is one config, or a dict from names to configs: an exact name ("lm_head"), a
    regular expression matched against the whole name ("re:.*mlp.*", tried in the dict's
    order), and "_default" for every other selected matrix. An exact name wins over patterns;
    `None` leaves the matrix in full precision; a router is quantized only when named exactly.
    Each matrix's config is recorded and saved in the manifest. An output head tied to the
    token embedding stays tied (one quantized tensor). `calibrate_all_experts`: methods that
    measure layer inputs send every calibration token through every expert (the layer's output
    still follows the router). What is left in full precision, and why, is
    `coverage_of(model)` and logged; a matrix in the decoder blocks that no rule covers is
    warned about. If any method fails or is interrupted, every weight is put back.

    Mixed widths: instead of `config`, `budget=discq.bits(2.5)` and `candidates=[configs]`
    give each selected matrix the candidate that minimizes the predicted KL to the original
    under the budget (bits per quantized weight, scales counted): see `passes/mixed.py`;
    `plan_of(model)` says what each matrix got."""
    if budget is not None or candidates is not None:
        if config is not None:
            raise TypeError("quantize_ takes one config, or budget= with candidates=, not both")
        return _quantize_to_budget(model, budget, candidates, filter_fn, calibrate_all_experts)
    _check_args(model, config)
    check_bool(calibrate_all_experts=calibrate_all_experts)
    model = unwrap_compiled(model)  # names without `_orig_mod.`: same seeds, same manifest
    matrices = candidates_of(model)
    if isinstance(config, dict):  # routers join only when a config names them exactly
        matrices += [mx for mx in router_matrices(model) if mx.fqn in config]
    if not matrices and not any(isinstance(p, QuantizedTensor) for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no weight matrix discq quantizes "
                         f"(nn.Linear, transformers' Conv1D or stacked experts)")
    chosen, skipped = _select(matrices, filter_fn)
    plan = _plan(model, config, chosen, skipped) if isinstance(config, dict) \
        else [(config, chosen)]
    report = coverage(model, [mx for _, group in plan for mx in group], skipped)
    _report(model, report)
    if not any(group for _, group in plan):
        warnings.warn("quantize_: the filter selected no weight matrix; nothing was quantized",
                      stacklevel=2)
        return model
    prepared = Prepared(model, plan, calibrate_all_experts)
    with prepared as runs:
        for cfg, group in runs:
            cfg, group = cfg.bind(model, group) if group else (cfg, group)
            if group:
                _check_memory(model, cfg, group)
                _handler(cfg)(model, cfg, group)
                _record_config(group, cfg)
    _few_tokens(report, prepared.few_tokens)
    for fn in AFTER_QUANTIZE:
        fn(model)
    return model


def _quantize_to_budget(model: nn.Module, budget, candidates, filter_fn,
                        calibrate_all_experts: bool) -> nn.Module:
    from .budget import Bits
    from .mixed import check_candidates, quantize_mixed
    if not isinstance(budget, Bits):
        raise TypeError(f"budget must be discq.bits(<bits per weight>) with candidates=[...], "
                        f"got {type(budget).__name__}")
    candidates = check_candidates(candidates)
    _check_args(model, candidates[0])
    check_bool(calibrate_all_experts=calibrate_all_experts)
    model = unwrap_compiled(model)
    chosen, skipped = _select(candidates_of(model), filter_fn)
    if not chosen:
        raise ValueError("quantize_: the filter selected no weight matrix to give a width")
    report = coverage(model, chosen, skipped)
    _report(model, report)
    prepared = Prepared(model, [(None, chosen)], calibrate_all_experts)
    with prepared as runs:
        units, it = [], iter(runs[0][1])
        for mx in chosen:  # an expert stack's E linears are one unit: it keeps one format
            n = len(mx.module._modules[mx.param]) if mx.kind == "experts" else 1
            units.append((mx.fqn, [next(it) for _ in range(n)]))
        plan = quantize_mixed(model, budget, candidates, units,
                              lambda cfg, targets: _run_candidate(model, cfg, targets))
    model.__dict__["discq_bit_plan"] = plan
    _few_tokens(report, prepared.few_tokens)
    for fn in AFTER_QUANTIZE:
        fn(model)
    return model


def _run_candidate(model: nn.Module, config: QuantConfig, targets) -> set[str]:
    """Round, with `config`'s method, the targets its format can hold; their names."""
    fits = []
    for t in targets:
        try:
            fits += config.bind(model, [t])[1]
        except ValueError:  # e.g. rows that are not whole blocks of a GGUF type
            continue
    if not fits:
        return set()
    config, fits = config.bind(model, fits)
    _check_memory(model, config, fits)
    _handler(config)(model, config, fits)
    return {fqn for fqn, m in fits if isinstance(m.weight, QuantizedTensor)}


def plan_of(model: nn.Module):
    """The mixed-width `Plan` of the last `quantize_(model, budget=..., candidates=...)`."""
    return unwrap_compiled(model).__dict__.get("discq_bit_plan")


def _select(matrices: list[Matrix], filter_fn: FilterFn | None):
    """(selected matrices, {param name: why not} for those the filter left out)."""
    chosen, skipped = [], {}
    for mx in matrices:
        if filter_fn is None or filter_fn(mx.module, mx.fqn):
            chosen.append(mx)
        else:
            skipped[mx.param_name] = "left out by filter_fn"
    return chosen, skipped


def _report(model: nn.Module, report: Coverage) -> None:
    """Keep the coverage on the model (the CLI and the model card read it), log it, and warn
    about matrices inside the decoder blocks that no rule covers."""
    old = model.__dict__.get("discq_coverage")
    if old is not None:  # a second quantize_ (the head, say): the first one's experts notes stay
        report.few_tokens = {**old.few_tokens, **report.few_tokens}
    model.__dict__["discq_coverage"] = report
    log.info("quantize_: %s", report.describe())
    if report.uncovered:
        warnings.warn(f"quantize_: {len(report.uncovered)} weight matrices in the decoder "
                      f"blocks are of a kind discq does not quantize and stay in full "
                      f"precision: {report.uncovered[:5]}", stacklevel=3)


def _few_tokens(report: Coverage, few: dict[str, int]) -> None:
    """Experts calibrated on fewer tokens than their input width: in the report, and said."""
    if few:
        report.few_tokens.update(few)
        warnings.warn(f"quantize_: {len(few)} experts saw fewer calibration tokens than their "
                      f"input width; their Hessians were pulled toward their layer's pooled one "
                      f"(more calibration data, or calibrate_all_experts=True, avoids it): "
                      f"{dict(list(few.items())[:5])}", stacklevel=3)


def coverage_of(model: nn.Module) -> Coverage | None:
    """What the last `quantize_` on `model` quantized and left in full precision."""
    return unwrap_compiled(model).__dict__.get("discq_coverage")


def _check_memory(model: nn.Module, config: QuantConfig, targets) -> None:
    """Refuse at once, with the estimate, a run this machine cannot hold (a streaming run has
    checked its own plan, one block at a time)."""
    from .block_source import current_source
    from .memory_plan import calibration_tokens, check_fits, plan_run
    if current_source() is None:
        tokens = calibration_tokens(getattr(config, "calibration", None))
        check_fits(plan_run(model, config, targets, tokens=tokens),
                   f"quantize_ with {config.method}")


def _plan(model: nn.Module, spec: dict, matrices: list[Matrix], skipped: dict
          ) -> list[tuple[QuantConfig, list[Matrix]]]:
    """[(config, its matrices)] in the order of first appearance; None drops a matrix (noted
    in `skipped`)."""
    exact = {k: v for k, v in spec.items() if not k.startswith("re:") and k != DEFAULT_KEY}
    patterns = []
    for k, v in spec.items():
        if k.startswith("re:"):
            try:
                patterns.append((re.compile(k[3:]), v))
            except re.error as e:
                raise ValueError(f"config key {k!r} is not a valid regular expression: {e}")
    _check_names(model, exact)
    groups: dict[int, tuple[QuantConfig, list]] = {}
    for mx in matrices:
        cfg = exact[mx.fqn] if mx.fqn in exact else next(
            (v for rx, v in patterns if rx.fullmatch(mx.fqn)), spec.get(DEFAULT_KEY))
        if cfg is None:
            skipped[mx.param_name] = "set to None in the config"
        else:
            groups.setdefault(id(cfg), (cfg, []))[1].append(mx)
    return list(groups.values())


def _check_names(model: nn.Module, exact: dict) -> None:
    """A typo would otherwise quantize a matrix the user meant to skip."""
    names = {mx.fqn for mx in candidates_of(model) + router_matrices(model)}
    names |= {fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(exact) - names)
    if not unknown:
        return
    experts = sorted(n for n in names if any(u.startswith(n + ".") for u in unknown))
    hint = (f"; the experts of a stack share one config: name the stack {experts[0]!r}"
            if experts else "")
    raise ValueError(f"config names {unknown[:5]} are not weight matrices of "
                     f"{type(model).__name__}; use names from model.named_modules() (e.g. "
                     f"'lm_head'), expert stacks by their parameter name, or 're:<regex>' "
                     f"patterns{hint}")


def _handler(config: QuantConfig):
    """The registered handler; with `finetune=True`, followed by end-to-end fine-tuning unless
    the method fine-tunes as part of its own run (QuIP#)."""
    method = method_of(config)
    if method.handler is None:
        raise TypeError(f"no handler is registered for {type(config).__name__}")
    if getattr(config, "finetune", False) and not method.finetunes_itself:
        from discq.training.finetune_after import then_finetune  # Lightning: on first use
        return then_finetune(method.handler)
    return method.handler


def _record_config(targets, config: QuantConfig) -> None:
    """Remember each layer's config: save_quantized writes it into the manifest."""
    for _, module in targets:
        if isinstance(module.weight, QuantizedTensor):
            set_layer_config(module, "weight", config.to_dict())


def check_finite(W: torch.Tensor, fqn: str) -> None:
    """NaN/Inf in a weight makes every rounding method produce garbage: refuse, naming the layer."""
    if W.is_meta:  # a streaming run's weight, not read yet: checked when its block is loaded
        return
    if not torch.isfinite(W).all():
        n = int((~torch.isfinite(W)).sum())
        raise ValueError(f"layer {fqn or '<unnamed>'!r} has {n} NaN/Inf weight(s); fix or "
                         f"exclude this layer with filter_fn before quantizing")


def install_weight(module: nn.Linear, qweight: QuantizedTensor) -> None:
    """Replace the module's weight by the quantized tensor (frozen: codes are not trained)."""
    module.weight = nn.Parameter(qweight, requires_grad=False)
