"""Checking and filling a model from a saved directory (the reading half of `discq.io`).

Everything is read and checked first; the model is modified only once every tensor has been
validated, so a bad checkpoint never leaves a partly loaded model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from discq.tensors.base import FORMATS

SUPPORTED_FORMAT_VERSIONS = (1,)


class CheckpointError(ValueError):
    """A saved directory is missing, corrupted, or does not match the model."""


def read_manifest(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file} not found: is {file.parent} a directory written by "
                              f"discq.save_quantized?")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); the checkpoint is corrupted")
    if not isinstance(manifest, dict) or manifest.get("format") != "discq":
        raise CheckpointError(f"{file} is not a discq manifest")
    if manifest.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(f"{file}: format_version {manifest.get('format_version')!r} is "
                              f"not supported by this discq (supports {SUPPORTED_FORMAT_VERSIONS})")
    for field in ("tensors", "quantized", "aliases"):
        if not isinstance(manifest.get(field), dict):
            raise CheckpointError(f"{file}: field {field!r} is missing or malformed")
    return manifest


def read_tensors(file: Path, manifest: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor the manifest lists, checked against its recorded shape and dtype."""
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            expected = set(manifest["tensors"])
            if keys != expected:
                diff = sorted(keys ^ expected)[:5]
                raise CheckpointError(f"{file} and its manifest disagree on tensor names: {diff}")
            out = {k: f.get_tensor(k) for k in sorted(keys)}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types on truncated/corrupt files
        raise CheckpointError(f"{file} cannot be read ({type(e).__name__}: {e}); the file is "
                              f"truncated or corrupted") from None
    for k, t in out.items():
        spec = manifest["tensors"][k]
        if list(t.shape) != spec.get("shape") or str(t.dtype).removeprefix("torch.") != spec.get("dtype"):
            raise CheckpointError(f"{file}: tensor {k!r} is {list(t.shape)} {t.dtype} but the "
                                  f"manifest says {spec}")
    return out


def build_quantized(name: str, spec: dict, tensors: dict, file: Path) -> torch.Tensor:
    fmt = FORMATS.get(spec.get("format"))
    if fmt is None:
        raise CheckpointError(f"{file}: weight {name!r} has unknown format {spec.get('format')!r}")
    try:
        parts = {p: tensors.pop(f"{name}.{p}") for p in spec["tensors"]}
        return fmt.from_stored(parts, spec["attributes"])
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{file}: quantized weight {name!r} cannot be rebuilt "
                              f"({type(e).__name__}: {e})") from None


def _expected(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


def resolve(model: nn.Module, manifest: dict, tensors: dict, file: Path) -> dict:
    """key -> final tensor for every state-dict key of `model`, all checked."""
    values = {k: build_quantized(k, spec, tensors, file) for k, spec in manifest["quantized"].items()}
    values.update(tensors)
    for key, target in manifest["aliases"].items():
        if target not in values:
            raise CheckpointError(f"{file}: alias {key!r} points to missing tensor {target!r}")
        values[key] = values[target]
    expected = _expected(model)
    missing, extra = sorted(set(expected) - set(values)), sorted(set(values) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{file} does not match {type(model).__name__}: missing "
                              f"{missing[:5]}, unexpected {extra[:5]}")
    for key, v in values.items():
        if tuple(v.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(v.shape)} but the "
                                  f"model expects {tuple(expected[key].shape)}")
    return values


def assign(model: nn.Module, values: dict) -> None:
    """Set every tensor; tied keys receive the very same Parameter object."""
    made: dict[int, nn.Parameter] = {}
    for key, v in values.items():
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if attr in module._parameters:
            if id(v) not in made:
                trainable = v.is_floating_point() and not hasattr(v, "format_name")
                made[id(v)] = nn.Parameter(v, requires_grad=trainable and
                                           module._parameters[attr].requires_grad)
            module._parameters[attr] = made[id(v)]
        else:
            module._buffers[attr] = v


def record_configs(model: nn.Module, quantized: dict) -> None:
    """Each quantized parameter's config, from a manifest's `quantized` entries, back on its
    module (a later save writes it again)."""
    from discq.passes.inspect import set_layer_config
    for key, spec in quantized.items():
        module_name, _, attr = key.rpartition(".")
        if spec.get("config") is not None:
            module = model.get_submodule(module_name) if module_name else model
            set_layer_config(module, attr, spec["config"])


def check_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary tables, position ids) are not saved, so a skeleton must
    hold them for real: parameters may be on meta, these may not."""
    saved = set(model.state_dict(keep_vars=True))
    meta = [n for n, b in model.named_buffers() if b.is_meta and n not in saved]
    if meta:
        raise CheckpointError(
            f"the skeleton's non-saved buffers {meta[:3]} are on the meta device and cannot be "
            f"loaded; build the skeleton under `accelerate.init_empty_weights()` (parameters on "
            f"meta, buffers real) instead of `torch.device('meta')`")


def load_into(model: nn.Module, manifest_file: Path, weights_file: Path,
              device: torch.device) -> None:
    from discq.passes.prepare import prepare_skeleton
    check_buffers(model)
    manifest = read_manifest(manifest_file)
    prepare_skeleton(model, list(manifest["quantized"]))
    tensors = read_tensors(weights_file, manifest, device)
    values = resolve(model, manifest, tensors, weights_file)
    assign(model, values)
    record_configs(model, manifest["quantized"])
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise CheckpointError(f"{weights_file}: tensors still on the meta device: {left[:5]}")
