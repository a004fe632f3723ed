"""Save and load quantized models: safetensors + a JSON manifest, never pickle.

A saved directory holds
  model.safetensors  every tensor: plain parameters/buffers under their state-dict names, each
                     quantized weight as its stored parts (`<name>.qdata`, `<name>.scale`, ...)
  discq.json         the manifest: format version, per quantized weight its format, attributes
                     (bits, group size, shape, dtype, ...) and config, tied-weight aliases, and
                     the name/shape/dtype of every tensor in the safetensors file
  config.json        (transformers models) the model config, so `load_quantized(path)` can
                     rebuild the model without a skeleton; tokenizer files when one is given.
Writes go to a temporary sibling directory that is renamed into place, so a failed save never
leaves a half-written directory and never destroys what the target already held.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from discq.tensors.base import QuantizedTensor, unwrap_compiled

from ._load import CheckpointError, load_into

FORMAT_VERSION = 1
MANIFEST = "discq.json"
WEIGHTS = "model.safetensors"


def _collect(model: nn.Module, with_tensors: bool = True, skip=None
             ) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten the state dict: plain tensors as they are, quantized ones into their parts.
    `with_tensors=False`: only the description (nothing copied), e.g. for a config.
    `skip(key)`: keys left out (a streaming run's blocks, written already)."""
    tensors: dict[str, torch.Tensor] = {}
    quantized, aliases, first_key = {}, {}, {}
    storages: set[int] = set()  # data pointers already written
    for key, t in model.state_dict(keep_vars=True).items():
        if skip is not None and skip(key):
            continue
        if id(t) in first_key:  # tied weights are stored once
            aliases[key] = first_key[id(t)]
            continue
        first_key[id(t)] = key
        if isinstance(t, QuantizedTensor):
            parts = t.stored_tensors()
            for part, v in parts.items() if with_tensors else ():
                v = v.detach().contiguous().cpu()
                # layers rounded together share small parts (QuIP#'s input rotation of q/k/v);
                # safetensors refuses shared storage, so each gets its own copy on disk
                ptr = v.untyped_storage().data_ptr()
                if v.numel() and ptr in storages:
                    v = v.clone()
                storages.add(v.untyped_storage().data_ptr())
                tensors[f"{key}.{part}"] = v
            quantized[key] = {"format": t.format_name, "attributes": t.attributes(),
                              "tensors": sorted(parts), "config": _layer_config(model, key)}
        elif with_tensors:
            tensors[key] = t.detach().contiguous().cpu()
            storages.add(tensors[key].untyped_storage().data_ptr())
    plan = model.__dict__.get("discq_bit_plan")  # mixed widths: what each matrix got
    return tensors, {"quantized": quantized, "aliases": aliases,
                     **({"bit_plan": plan.to_dict()} if plan is not None else {})}


def _layer_config(model: nn.Module, key: str) -> dict | None:
    from discq.passes.inspect import layer_config
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return layer_config(module, attr)


def _manifest(tensors: dict[str, torch.Tensor], meta: dict, model: nn.Module,
              metadata: dict | None) -> dict:
    from discq import __version__
    return {
        "format": "discq", "format_version": FORMAT_VERSION, "discq_version": __version__,
        "model_class": type(model).__name__, "metadata": metadata or {},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                    for k, v in tensors.items()},
        **meta,
    }


def save_quantized(model: nn.Module, path: str | os.PathLike, *, tokenizer=None,
                   overwrite: bool = False, metadata: dict | None = None) -> Path:
    """Write `model` (quantized or not) to directory `path`. An existing non-empty directory is
    an error unless `overwrite=True`; then the files discq writes are replaced and any other file
    the directory held is kept. `metadata` (JSON-able) is stored in the manifest, e.g. the
    source model's name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_compiled(model)  # torch.compile(model) saves under the model's own names
    return write_atomically(path, overwrite,
                            lambda tmp: _write(tmp, model, *_collect(model), tokenizer, metadata))


def write_atomically(path: str | os.PathLike, overwrite: bool, write) -> Path:
    """`write(tmp)` fills a temporary sibling directory, which then replaces `path` (an existing
    non-empty `path` only with `overwrite`, keeping the files of it that `write` did not make).
    A failure or an interrupt leaves `path` as it was."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; choose another path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty; choose a new directory or pass "
                              f"overwrite=True to replace the discq files in it")
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        _swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write(tmp: Path, model: nn.Module, tensors, meta, tokenizer, metadata) -> None:
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        if not getattr(config, "architectures", None):  # a model built from a config
            config.architectures = [type(model).__name__]  # load_quantized rebuilds it by name
        config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / MANIFEST).write_text(json.dumps(_manifest(tensors, meta, model, metadata), indent=1))


def _swap_into_place(tmp: Path, path: Path, carry=None) -> None:
    """Carry over the files of an existing `path` that discq did not write (and `carry(name)`
    allows), then rename."""
    if not path.exists():
        os.replace(tmp, path)
        return
    for old in path.iterdir():
        if not (tmp / old.name).exists() and (carry is None or carry(old.name)):
            os.replace(old, tmp / old.name)
    backup = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, backup)  # two renames: at every instant one complete copy exists
    os.replace(tmp, path)
    shutil.rmtree(backup, ignore_errors=True)


def read_metadata(path: str | os.PathLike) -> dict:
    """The `metadata` a directory was saved with (e.g. {"source": "smollm2-135m"})."""
    from ._load import read_manifest
    hf = hf_quantization_config(path)
    if hf is not None:
        return hf.get("metadata", {})
    return read_manifest(Path(path) / MANIFEST).get("metadata", {})


def hf_quantization_config(path: str | os.PathLike) -> dict | None:
    """The discq `quantization_config` of a `save_pretrained` directory, else None."""
    cfg = Path(path) / "config.json"
    if (Path(path) / MANIFEST).is_file() or not cfg.is_file():
        return None
    try:
        q = json.loads(cfg.read_text()).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return q if isinstance(q, dict) and q.get("quant_method") == "discq" else None


def is_quantized_dir(path: str | os.PathLike) -> bool:
    """A directory of `save_quantized` or of `save_pretrained` on a discq model."""
    return (Path(path) / MANIFEST).is_file() or hf_quantization_config(path) is not None


def load_quantized(path: str | os.PathLike, model: nn.Module | None = None, *,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Load a directory written by `save_quantized`. With `model` (a skeleton of the same
    architecture, possibly on the meta device) its tensors are replaced; without it, a
    transformers model is rebuilt from the saved config.json. Reads only safetensors and JSON;
    any mismatch raises `CheckpointError` before the model is touched. A directory written by
    `save_pretrained` (transformers layout) loads through transformers' `from_pretrained`."""
    path = Path(path)
    if hf_quantization_config(path) is not None:
        if model is not None:
            raise ValueError(f"{path} was written by save_pretrained: transformers rebuilds the "
                             f"model from its config.json; call load_quantized(path) without "
                             f"model=")
        from discq.hf import from_pretrained
        return from_pretrained(path, device=device)
    if model is None:
        model = _skeleton_from_config(path)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module skeleton or None, got "
                        f"{type(model).__name__}")
    load_into(unwrap_compiled(model), path / MANIFEST, path / WEIGHTS,
              device=torch.device(device))
    return model.eval()


def _skeleton_from_config(path: Path) -> nn.Module:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} has no config.json, so the model cannot be rebuilt; pass "
                              f"a skeleton: load_quantized(path, model=MyModel(...))")
    from accelerate import init_empty_weights
    cls, config = model_class(path)
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        return cls(config)


def model_class(path: Path):
    """(transformers class, config) named by the config.json in `path`."""
    import transformers
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise CheckpointError(f"{path / 'config.json'}: architecture {arch!r} is not one this "
                              f"transformers has; pass a skeleton model")
    return cls, config


def _save_module(module: nn.Module, path: Path) -> None:
    save_quantized(module, path, overwrite=True)


def _load_module(path: Path, module: nn.Module) -> None:
    load_quantized(path, model=module)


# a resumable run's finished blocks are saved and restored like any quantized model
from discq.passes.block_source import register_module_store  # noqa: E402

register_module_store(_save_module, _load_module)
