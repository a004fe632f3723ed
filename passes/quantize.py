"""`quantize_(model, config, *, filter_fn=None)`: the one entry point."""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

import torch
from discq.tensors.base import QuantizedTensor
from torch import nn

from .config import QuantConfig
from .registry import MODEL_HANDLERS, module_handler

FilterFn = Callable[[nn.Module, str], bool]


def is_linear(module: nn.Module, fqn: str = "") -> bool:
    """Default filter: every `nn.Linear` whose weight is not quantized yet."""
    return isinstance(module, nn.Linear) and not isinstance(module.weight, QuantizedTensor)


def select_linears(model: nn.Module, filter_fn: FilterFn) -> list[tuple[str, nn.Linear]]:
    return [(fqn, m) for fqn, m in model.named_modules()
            if isinstance(m, nn.Linear) and filter_fn(m, fqn)]


def _check_args(model, config) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a discq config such as rtn_config(bits=4), got "
                        f"{type(config).__name__}")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer: discq quantizes the "
                         f"weights of nn.Linear modules")


def quantize_(model: nn.Module, config: QuantConfig, *,
              filter_fn: FilterFn | None = None) -> nn.Module:
    """Quantize, in place, the `nn.Linear` layers of `model` that `filter_fn(module, fqn)`
    selects (default: all) with `config`. Returns `model`."""
    _check_args(model, config)
    targets = select_linears(model, filter_fn or is_linear)
    if not targets:
        warnings.warn("quantize_: the filter selected no nn.Linear layer; nothing was quantized",
                      stacklevel=2)
        return model
    handler = _model_handler(config)
    if handler is not None:
        _run_restoring_on_failure(handler, model, config, targets)
    else:
        transform = module_handler(type(config))
        if transform is None:
            raise TypeError(f"no handler is registered for {type(config).__name__}")
        for fqn, module in targets:
            transform(module, config, fqn=fqn)
    _record_config(targets, config)
    return model


def _model_handler(config: QuantConfig):
    """The registered model handler; configs whose handler lives in a heavier package
    (Lightning, in discq.training) name its module in `handler_module`, imported on first use
    so `import discq` stays fast and passes/ has no static dependency on training/."""
    if type(config) not in MODEL_HANDLERS and getattr(config, "handler_module", None):
        importlib.import_module(config.handler_module)
    handler = MODEL_HANDLERS.get(type(config))
    if handler is not None and getattr(config, "finetune", False) \
            and not getattr(config, "FINETUNES_ITSELF", False):
        # generic end-to-end fine-tuning after any rounding method (codes fixed)
        handler = importlib.import_module("discq.training.finetune_after").then_finetune(handler)
    return handler


def _run_restoring_on_failure(handler, model, config, targets) -> None:
    """Data-driven methods install weights as they go (later layers must see quantized earlier
    ones); if the run fails or is interrupted, every original weight is put back, so the input
    model is untouched. Holding the original Parameters costs no copy."""
    originals = [(m, m.weight) for _, m in targets]
    try:
        handler(model, config, targets)
    except BaseException:
        for m, w in originals:
            m.weight = w
        raise


def _record_config(targets, config: QuantConfig) -> None:
    """Remember each layer's config: save_quantized writes it into the manifest."""
    for _, module in targets:
        if isinstance(module.weight, QuantizedTensor):
            module.discq_config = config.to_dict()


def check_finite(W: torch.Tensor, fqn: str) -> None:
    """NaN/Inf in a weight makes every rounding method produce garbage: refuse, naming the layer."""
    if not torch.isfinite(W).all():
        n = int((~torch.isfinite(W)).sum())
        raise ValueError(f"layer {fqn or '<unnamed>'!r} has {n} NaN/Inf weight(s); fix or "
                         f"exclude this layer with filter_fn before quantizing")


def install_weight(module: nn.Linear, qweight: QuantizedTensor) -> None:
    """Replace the module's weight by the quantized tensor (frozen: codes are not trained)."""
    module.weight = nn.Parameter(qweight, requires_grad=False)
