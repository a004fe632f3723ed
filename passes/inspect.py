"""Reading a quantized model: which weights are quantized and what they cost."""
from __future__ import annotations

from collections.abc import Iterator

from discq.tensors.base import QuantizedTensor
from torch import nn


def quantized_weights(model: nn.Module) -> Iterator[tuple[str, QuantizedTensor]]:
    """(fqn of the parameter, quantized tensor) for every quantized parameter, shared ones once."""
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if isinstance(p, QuantizedTensor) and id(p) not in seen:
            seen.add(id(p))
            yield name, p


def bits_per_weight(model: nn.Module) -> float:
    """Effective bits per quantized weight: codes, scales, zero points and any side tensors
    (sign vectors, low-rank factors) divided by the number of quantized weights."""
    bits = numel = 0
    for _, w in quantized_weights(model):
        bits += w.storage_bits()
        numel += w.numel()
    if numel == 0:
        raise ValueError("bits_per_weight: the model has no quantized weight; run quantize_ first")
    return bits / numel


def layer_config(module: nn.Module, param: str = "weight") -> dict | None:
    """The config (as a dict) a quantized parameter of `module` was made with, if recorded: a
    linear keeps it as `discq_config`, an experts module one per stack in `discq_configs`."""
    per_param = getattr(module, "discq_configs", None) or {}
    if param in per_param:
        return per_param[param]
    return getattr(module, "discq_config", None) if param == "weight" else None


def set_layer_config(module: nn.Module, param: str, config: dict | None) -> None:
    if config is None:
        return
    if param == "weight":
        module.discq_config = config
    else:
        module.__dict__.setdefault("discq_configs", {})[param] = config
