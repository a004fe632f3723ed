"""Files for the engines people deploy: `to_gguf`, a discq-rounded Llama-family model as a GGUF
file that llama.cpp (and transformers' GGUF loader) reads; `to_compressed_tensors`, a
`pack-quantized` directory for vLLM and transformers.

    model, tok = discq.models.load_model("smollm2-135m")          # from its .gguf file
    quantize_(model, gptq_config(bits=4, group_size=32, symmetric=True, calibration=batches),
              filter_fn=keep_head_filter(model))
    discq.export.to_gguf(model, "smollm2-q4_0.gguf", source=discq.models.bundled_path("smollm2-135m"))

Quantized linears are written in their llama.cpp block twin (`discq.gguf_blocks`: 4-bit ->
Q4_0, 8-bit -> Q8_0; symmetric, groups of 32, fp16 scales), so llama.cpp runs exactly the
values discq rounded; every other tensor (embeddings, a tied head, norms) goes as F32, exactly
the model's values (a smaller type for the embeddings, as llama.cpp's mixtures choose, is still
to come). The metadata and the tokenizer come from `source`, the GGUF file the model was loaded
from (this version does not write them from a transformers config).
"""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import torch
from torch import nn

from discq.gguf_blocks import block_type, to_blocks
from discq.tensors.base import QuantizedTensor, unwrap_compiled

FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q8_0": "MOSTLY_Q8_0"}


def to_gguf(model: nn.Module, path: str | os.PathLike, *, source: str | os.PathLike,
            overwrite: bool = False) -> Path:
    """Write `model` to the GGUF file `path` (written to a temporary file, then renamed: a
    failure leaves `path` as it was; an existing `path` needs `overwrite=True`)."""
    import gguf
    model = unwrap_compiled(model)
    config = _check(model, Path(path), Path(source), overwrite)
    reader = gguf.GGUFReader(str(source))
    tmp = Path(path).parent / f".{Path(path).name}.tmp-{uuid.uuid4().hex[:8]}"
    writer = gguf.GGUFWriter(str(tmp), arch="llama")
    try:
        kinds = _add_tensors(writer, model, config)
        _copy_metadata(writer, reader, kinds)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return Path(path)


def _check(model: nn.Module, path: Path, source: Path, overwrite: bool):
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"to_gguf writes Llama-family decoders (model_type 'llama', e.g. "
                         f"SmolLM2); got {getattr(config, 'model_type', type(model).__name__)!r}")
    if not source.is_file() or source.suffix != ".gguf":
        raise ValueError(f"source must be the .gguf file the model was loaded from (its "
                         f"metadata and tokenizer are copied), got {str(source)!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True")
    return config


def _add_tensors(writer, model: nn.Module, config) -> list[str]:
    """Every tensor of the state dict under its GGUF name; returns the block types used."""
    import gguf
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    kinds = []
    for name, t in model.state_dict(keep_vars=True).items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reads the head from token_embd when output.weight is absent
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{name}: no GGUF name for this tensor of a Llama model")
        rows = _rope_rows(name, t.shape[0], config)
        if isinstance(t, QuantizedTensor):
            kind = block_type(t)
            if kind is None:
                raise ValueError(f"{name}: {t.format_name} {t.attributes()} has no llama.cpp "
                                 f"block twin; quantize with symmetric=True, group_size=32 and "
                                 f"bits=4 (Q4_0) or 8 (Q8_0)")
            writer.add_tensor(gguf_name, to_blocks(t, rows),
                              raw_dtype=gguf.GGMLQuantizationType[kind])
            kinds.append(kind)
        else:
            w = t.detach().float().cpu()
            w = w[rows] if rows is not None else w
            writer.add_tensor(gguf_name, w.numpy())  # F32: exactly the model's values
    return kinds


def _rope_rows(name: str, n_rows: int, config) -> torch.Tensor | None:
    """llama.cpp's row order for q/k (rotary pairs interleaved within each head, where
    transformers keeps each head's two halves apart): the rows of `name` to take, or None."""
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    kind = next((k for k in heads if f".{k}." in name), None)
    if kind is None or not name.endswith("weight"):
        return None
    n_head = heads[kind]
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2) \
        .reshape(-1)


def _copy_metadata(writer, reader, kinds: list[str]) -> None:
    """The source's key-values (architecture hyper-parameters, tokenizer, chat template), with
    general.file_type naming the block type most tensors use."""
    import gguf
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # written by the writer itself
        vtype = field.types[0]
        value = field.contents()
        if field.name == "general.file_type" and kinds:
            value = int(gguf.LlamaFileType[FILE_TYPES[max(set(kinds), key=kinds.count)]])
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)


# ---- compressed-tensors (vLLM, transformers) ------------------------------------------------

def to_compressed_tensors(model: nn.Module, path: str | os.PathLike, *, tokenizer=None,
                          card: str | None = None, overwrite: bool = False) -> Path:
    """Write a transformers model whose quantized linears are symmetric affine 4- or 8-bit
    weights grouped along the input dimension as a `pack-quantized` compressed-tensors
    directory, which vLLM and transformers (with `compressed-tensors` installed) load. Written
    atomically, with `card` as its README.md if given."""
    from discq.io import write_atomically
    model = unwrap_compiled(model)
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a transformers model")
    tensors, schemes = _ct_tensors(model)
    if not schemes:
        raise ValueError("the model has no quantized weight to export; run discq.quantize_ first")
    config = model.config.to_dict()
    config["quantization_config"] = _ct_config(model, schemes)

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
    return write_atomically(path, overwrite, write)


def _ct_tensors(model: nn.Module) -> tuple[dict, dict]:
    """The state dict in compressed-tensors' names, and {scheme: [module names]}."""
    tensors, schemes, seen = {}, {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue  # tied: stored once, transformers ties it again on load
        seen[id(t)] = name
        if not isinstance(t, QuantizedTensor):
            tensors[name] = t.detach().contiguous().cpu()
            continue
        module = name.removesuffix(".weight")
        _check_ct(name, t)
        # discq's packing is the same dense little-endian bit stream of the codes (stored
        # unsigned, i.e. signed value + 2^(bits-1), as compressed-tensors offsets them)
        tensors[f"{module}.weight_packed"] = t.qdata.contiguous().cpu().view(torch.int32)
        tensors[f"{module}.weight_scale"] = t.scale.contiguous().cpu()
        tensors[f"{module}.weight_shape"] = torch.tensor(list(t.shape))
        key = (t.bits, t.group_size, True)
        schemes.setdefault(key, []).append(module)
    return tensors, schemes


def _check_ct(name: str, t) -> None:
    from discq.tensors.affine import AffineQuantizedTensor
    K = t.shape[1]
    ok = (isinstance(t, AffineQuantizedTensor) and t.bits in (4, 8) and t.group_along == "input"
          and t.zero_point is None and t.lowrank_u is None and K % t.group_size == 0
          and K * t.bits % 32 == 0)
    if not ok:
        # asymmetric grids too, once their packed zero points load in transformers (5.24 with
        # compressed-tensors 0.20.1 expects the zero points of a packed checkpoint unpacked)
        raise ValueError(f"{name}: the compressed-tensors export takes symmetric affine 4- or "
                         f"8-bit weights grouped along the input dimension (symmetric=True, a "
                         f"group size dividing {K}); got {t.format_name} {t.attributes()}")


def _ct_config(model: nn.Module, schemes: dict) -> dict:
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme)
    groups = {}
    for i, ((bits, g, symmetric), modules) in enumerate(sorted(schemes.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="group", group_size=g)
        groups[f"group_{i}"] = QuantizationScheme(
            targets=[f"re:^{re.escape(m)}$" for m in modules], weights=args)
    quantized = {m for ms in schemes.values() for m in ms}
    ignore = sorted(n for n, m in model.named_modules()
                    if isinstance(m, nn.Linear) and n not in quantized)
    config = QuantizationConfig(config_groups=groups, format="pack-quantized",
                                quantization_status="compressed", ignore=ignore)
    return {"quant_method": "compressed-tensors", **config.model_dump(mode="json")}
