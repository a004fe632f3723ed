"""Which function applies which config.

Data-free configs (RTN) transform one module at a time and are registered with torchao's
`register_quantize_module_handler`, so `torchao.quantization.quantize_` accepts them as well.
Data-driven configs (GPTQ, DiscQuant, QuIP#) need the whole model: they register a *model*
handler here, `handler(model, config, targets)` with targets = [(fqn, nn.Linear)]. The Lightning
based handlers register themselves from `discq.training`, so `passes/` never imports `training/`.
"""
from __future__ import annotations

from collections.abc import Callable

from torchao.quantization.transform_module import (
    _QUANTIZE_CONFIG_HANDLER,
    register_quantize_module_handler,
)

MODEL_HANDLERS: dict[type, Callable] = {}


def register_model_handler(config_type: type):
    def deco(fn):
        MODEL_HANDLERS[config_type] = fn
        return fn
    return deco


def register_module_handler(config_type: type):
    """Register a per-module transform `fn(module, config, fqn="")` with torchao's registry."""
    return register_quantize_module_handler(config_type)


def module_handler(config_type: type) -> Callable | None:
    return _QUANTIZE_CONFIG_HANDLER.get(config_type)
