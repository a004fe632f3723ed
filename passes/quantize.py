"""`quantize_(model, config, *, filter_fn=None)`: the one entry point."""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch
from discq.tensors.base import QuantizedTensor, unwrap_compiled
from torch import nn

from .config import QuantConfig
from .registry import method_of

FilterFn = Callable[[nn.Module, str], bool]


def is_linear(module: nn.Module, fqn: str = "") -> bool:
    """Default filter: every `nn.Linear` whose weight is not quantized yet."""
    return isinstance(module, nn.Linear) and not isinstance(module.weight, QuantizedTensor)


def select_linears(model: nn.Module, filter_fn: FilterFn) -> list[tuple[str, nn.Linear]]:
    return [(fqn, m) for fqn, m in model.named_modules()
            if isinstance(m, nn.Linear) and filter_fn(m, fqn)]


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
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer: discq quantizes the "
                         f"weights of nn.Linear modules")


def quantize_(model: nn.Module, config, *, filter_fn: FilterFn | None = None) -> nn.Module:
    """Quantize, in place, the `nn.Linear` layers of `model` that `filter_fn(module, fqn)`
    selects (default: all) with `config`. Returns `model`.

    `config` is one config, or a dict from module names to configs: an exact name
    ("lm_head"), a regular expression matched against the whole name ("re:.*mlp.*", tried in
    the dict's order), and "_default" for every other selected layer. An exact name wins over
    patterns; `None` leaves the module in full precision. Each layer's config is recorded and
    saved in the manifest. If any method fails or is interrupted, every weight is put back."""
    _check_args(model, config)
    model = unwrap_compiled(model)  # names without `_orig_mod.`: same seeds, same manifest
    targets = select_linears(model, filter_fn or is_linear)
    plan = _plan(model, config, targets) if isinstance(config, dict) else [(config, targets)]
    if not any(t for _, t in plan):
        warnings.warn("quantize_: the filter selected no nn.Linear layer; nothing was quantized",
                      stacklevel=2)
        return model
    originals = [(m, m.weight) for _, group in plan for _, m in group]
    try:  # data-driven methods install weights as they go: on failure, put every one back
        for cfg, group in plan:
            cfg, group = cfg.bind(model, group) if group else (cfg, group)
            if group:
                _check_memory(model, cfg, group)
                _handler(cfg)(model, cfg, group)
                _record_config(group, cfg)
    except BaseException:
        for m, w in originals:
            m.weight = w
        raise
    for fn in AFTER_QUANTIZE:
        fn(model)
    return model


def _check_memory(model: nn.Module, config: QuantConfig, targets) -> None:
    """Refuse at once, with the estimate, a run this machine cannot hold (a streaming run has
    checked its own plan, one block at a time)."""
    from .block_source import current_source
    from .memory_plan import calibration_tokens, check_fits, plan_run
    if current_source() is None:
        tokens = calibration_tokens(getattr(config, "calibration", None))
        check_fits(plan_run(model, config, targets, tokens=tokens),
                   f"quantize_ with {config.method}")


def _plan(model: nn.Module, spec: dict, targets) -> list[tuple[QuantConfig, list]]:
    """[(config, its targets)] in the order of first appearance; None drops a layer."""
    exact = {k: v for k, v in spec.items() if not k.startswith("re:") and k != DEFAULT_KEY}
    patterns = []
    for k, v in spec.items():
        if k.startswith("re:"):
            try:
                patterns.append((re.compile(k[3:]), v))
            except re.error as e:
                raise ValueError(f"config key {k!r} is not a valid regular expression: {e}")
    linears = {fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(exact) - linears)
    if unknown:  # a typo would otherwise quantize a layer the user meant to skip
        raise ValueError(f"config names {unknown[:5]} are not nn.Linear modules of "
                         f"{type(model).__name__}; use names from model.named_modules() "
                         f"(e.g. 'lm_head') or 're:<regex>' patterns")
    groups: dict[int, tuple[QuantConfig, list]] = {}
    for fqn, m in targets:
        cfg = exact[fqn] if fqn in exact else next(
            (v for rx, v in patterns if rx.fullmatch(fqn)), spec.get(DEFAULT_KEY))
        if cfg is not None:
            groups.setdefault(id(cfg), (cfg, []))[1].append((fqn, m))
    return list(groups.values())


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
            module.discq_config = config.to_dict()


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
