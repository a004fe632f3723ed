"""transformers integration: `model.save_pretrained(dir)` and
`AutoModelForCausalLM.from_pretrained(dir)` for discq-quantized models, every registered format.

Registered on `import discq` through transformers' public functions (`register_quantization_config`,
`register_quantizer`) under `quant_method: "discq"`. A saved directory is a normal transformers
model directory: `config.json` carries `quantization_config` (discq version, format version, per
quantized weight its format, attributes and config, tied aliases), the safetensors files hold
plain tensors under their names and each quantized weight as its parts (`<name>.qdata`,
`<name>.scale`, ...). Loading builds every quantized weight from its parts as the checkpoint is
read (a transformers load operation), so no full-precision copy of a quantized layer is ever
allocated, and nothing is unpickled.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from discq._load import record_configs
from discq.passes.prepare import prepare_skeleton
from discq.passes.quantize import after_quantize
from discq.quiet import quiet_dependencies
from discq.tensors.base import FORMATS, QuantizedTensor, unwrap_compiled

with quiet_dependencies():  # transformers.quantizers imports torchao's prototypes
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import (HfQuantizer, register_quantization_config,
                                         register_quantizer)
    from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "discq"
# stored under each quantized weight's own name: transformers without discq (which skips an
# unknown quant_method with a warning) then fails on a size mismatch instead of silently
# building a model with random weights in those layers
PLACEHOLDER = torch.zeros(1, dtype=torch.uint8)


def _version() -> str:
    from discq import __version__
    return __version__


@register_quantization_config(QUANT_METHOD)
class DiscqHfConfig(QuantizationConfigMixin):
    """`quantization_config` of a discq model in `config.json`. `layers`: per quantized weight
    (state-dict name) {"format", "attributes", "tensors", "config"}; `aliases`: tied names."""

    def __init__(self, layers: dict | None = None, aliases: dict | None = None,
                 format_version: int | None = None, discq_version: str | None = None,
                 **kwargs):
        from discq.io import FORMAT_VERSION
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION if format_version is None else format_version
        self.discq_version = discq_version or _version()
        self.layers = dict(layers or {})
        self.aliases = dict(aliases or {})
        self.modules_not_converted = kwargs.pop("modules_not_converted", [])
        self.metadata = kwargs.pop("metadata", {})
        kwargs.pop("quant_method", None)
        if self.format_version > FORMAT_VERSION or kwargs:
            raise ValueError(f"this checkpoint was written by discq {self.discq_version} (format "
                             f"version {self.format_version}"
                             + (f", fields {sorted(kwargs)}" if kwargs else "") +
                             f"); this discq {_version()} reads format version {FORMAT_VERSION}: "
                             f"pip install -U discq")

    @classmethod
    def of_model(cls, model: nn.Module, metadata: dict | None = None,
                 meta: dict | None = None) -> DiscqHfConfig:
        """The config describing `model`'s quantized weights as they are now (`meta`: what
        `discq.io._collect(model)` returned, if the caller has it)."""
        from discq.io import _collect
        meta = meta if meta is not None else _collect(model, with_tensors=False)[1]
        plain = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear)
                       and not isinstance(m.weight, QuantizedTensor))
        return cls(layers=meta["quantized"], aliases=meta["aliases"],
                   modules_not_converted=plain, metadata=metadata or {})


def part_names() -> list[str]:
    """Every stored tensor name of every registered format (`qdata`, `scale`, ...)."""
    names = {n for fmt in FORMATS.values() for n in
             [*fmt.tensor_data_names, *getattr(fmt, "optional_tensor_data_names", [])]}
    return sorted(names)


class BuildQuantized(ConversionOps):
    """Load operation: the parts of one quantized weight, as read from the checkpoint, become
    the `QuantizedTensor` of its format (`from_stored`)."""

    def __init__(self, hf_quantizer: DiscqHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, source_patterns=None, target_patterns=None, *,
                full_layer_name: str, **kwargs) -> dict:
        from discq._load import build_quantized
        # keys: the source patterns that matched ("weight", "weight.qdata"); values: lists
        tensors = {k: v[0] if isinstance(v, list) else v for k, v in input_dict.items()}
        spec = self.hf_quantizer.quantization_config.layers.get(full_layer_name)
        parts_of = set(part_names())  # every format's, registered now
        plain = [k for k in tensors if k.rpartition(".")[2] not in parts_of]  # the param itself
        if spec is None:  # a full-precision weight: as it is
            if len(plain) != len(tensors):
                raise ValueError(f"{full_layer_name}: quantized parts {sorted(tensors)} in the "
                                 f"checkpoint but no entry in quantization_config.layers")
            return {full_layer_name: tensors[plain[0]]}
        parts = {f"{full_layer_name}.{k.rpartition('.')[2]}": v for k, v in tensors.items()
                 if k not in plain}  # the plain name holds the placeholder (PLACEHOLDER)
        return {full_layer_name: build_quantized(full_layer_name, spec, parts, "checkpoint")}


@register_quantizer(QUANT_METHOD)
class DiscqHfQuantizer(HfQuantizer):
    """Loads and saves discq checkpoints; quantizing happens in `discq.quantize_`, so a
    full-precision checkpoint with a discq config is refused (`requires_calibration`)."""

    requires_calibration = True
    quantization_config: DiscqHfConfig

    @property
    def serialized_names(self) -> dict[str, list[str]]:
        # per parameter name ("weight"; an expert stack with its module's name, as
        # "experts.down_proj": a bare "down_proj" would also match "shared_expert.down_proj.
        # weight.qdata"), its parts first: a regex alternation tries its branches in order, and
        # "weight" alone would also match the start of "weight.qdata"
        params = {"weight"} | {".".join(k.split(".")[-2:]) for k in
                               self.quantization_config.layers if not k.endswith(".weight")}
        return {p: [*(f"{p}.{n}" for n in part_names()), p] for p in sorted(params)}

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        prepare_skeleton(model, list(self.quantization_config.layers))
        return model

    def get_load_operations(self) -> dict:
        return {"deserialize": BuildQuantized}

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # checkpoints arrive quantized

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        keep_layout(model, self.quantization_config.layers)
        for p in model.parameters():
            if isinstance(p, QuantizedTensor):
                p.requires_grad_(False)  # codes are not trained
        record_configs(model, self.quantization_config.layers)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module):
        from discq.io import _collect
        tensors, meta = _collect(model)
        model.config.quantization_config = DiscqHfConfig.of_model(
            model, self.quantization_config.metadata, meta)  # written next, by save_pretrained
        self.quantization_config = model.config.quantization_config
        for name in meta["quantized"]:
            tensors[name] = PLACEHOLDER.clone()
        return tensors, {}

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def keep_layout(model: nn.Module, quantized) -> None:
    """transformers reverses, on save, the conversions a load applies (a stacked expert tensor
    is written back as one tensor per expert); neither our load operation nor the merge of a
    quantized stack has a reverse, and our saved state dict is already in the layout we load,
    so those conversions are not kept for reversal (renamings are)."""
    import re

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter
    used = getattr(model, "_weight_conversions", None)
    if used is None:  # built, not loaded: the mapping transformers would reverse on save
        used = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                if not isinstance(c, PrefixChange)]

    def reversible(c) -> bool:
        if any(isinstance(op, BuildQuantized) for op in getattr(c, "operations", ())):
            return False
        return not isinstance(c, WeightConverter) or not any(
            re.search(t, name) for t in c.target_patterns for name in quantized)
    model._weight_conversions = [c for c in used if reversible(c)]


@after_quantize
def attach(model: nn.Module, metadata: dict | None = None) -> None:
    """Make a transformers model quantized by `discq.quantize_` save with `save_pretrained`:
    its config gets discq's `quantization_config` (replacing e.g. the GGUF one of a model
    transformers loaded from a .gguf file) and the model our quantizer."""
    model = unwrap_compiled(model)
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        return
    old = getattr(model.config, "quantization_config", None)
    if metadata is None and isinstance(old, DiscqHfConfig):
        metadata = old.metadata  # a second quantize_ keeps what a first save recorded
    config = DiscqHfConfig.of_model(model, metadata)
    keep_layout(model, config.layers)
    model.config.quantization_config = config
    model.hf_quantizer = DiscqHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def save_pretrained(model: nn.Module, path, *, tokenizer=None, overwrite: bool = False,
                    metadata: dict | None = None, card: str | None = None,
                    max_shard_size: str | int | None = None):
    """`model.save_pretrained` into `path` with what a model directory carries (tokenizer,
    `README.md` model card), atomically like `discq.save_quantized`: an interrupted or failed
    save leaves `path` as it was, and a non-empty `path` needs `overwrite=True`."""
    from discq.io import write_atomically
    model = unwrap_compiled(model)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a transformers model; use "
                        f"discq.save_quantized(model, path)")
    attach(model, metadata)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}

    def write(tmp):
        with quiet_dependencies():  # no "Writing model shards" bar for a few seconds of work
            model.save_pretrained(tmp, **kw)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
    return write_atomically(path, overwrite, write)


def from_pretrained(path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a directory written by `save_pretrained` on a discq model, through the
    transformers class its config.json names (any architecture transformers has)."""
    from discq.io import model_class
    cls, _ = model_class(Path(path))
    with quiet_dependencies():
        model = cls.from_pretrained(path, local_files_only=True)
    return model.to(device).eval()
