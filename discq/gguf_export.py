"""`to_gguf`: a discq-rounded Llama-family model as a GGUF file that llama.cpp (and
transformers' GGUF loader) reads.

    model, tok = discq.models.load_model("smollm2-135m")          # from its .gguf file
    quantize_(model, gptq_config(gguf="Q4_K_M", calibration=batches),
              filter_fn=keep_head_filter(model))
    discq.export.to_gguf(model, "smollm2-Q4_K_M.gguf", source=discq.models.bundled_path("smollm2-135m"))

Quantized linears are written in their own GGML type, byte for byte (`discq.gguf_blocks`), so
llama.cpp runs exactly the values discq rounded. The other 2-D tensors (token embeddings, an
untied head, linears left out of quantize_) are rounded to nearest onto the type llama.cpp's
mixture gives them (`passes/gguf_mixture.py`; Q8_0 for SmolLM2's tied embeddings); norms stay
F32. The mixture is `type=` or, if not given, the one the model was quantized with
(`gguf=` of its configs; Q4_0/Q8_0 for symmetric 4-/8-bit groups of 32). The metadata and the
tokenizer come from `source`, the GGUF file the model was loaded from, or from the model's
config and `tokenizer` (`discq/gguf_metadata.py`).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from discq.gguf_blocks import block_type, to_blocks
from discq.gguf_metadata import copy_metadata, write_hf_metadata
from discq.passes.gguf_mixture import MIXTURES, check_mixture, model_shape, tensor_type
from discq.tensors.base import QuantizedTensor, unwrap_compiled
from discq.tensors.gguf import GGUFGrid


def to_gguf(model: nn.Module, path: str | os.PathLike, *, source: str | os.PathLike | None = None,
            tokenizer=None, type: str | None = None, pre: str = "default",
            overwrite: bool = False) -> Path:
    """Write `model` to the GGUF file `path` in llama.cpp's mixture `type` ("Q4_K_M", …;
    default: the mixture it was quantized with). Metadata and tokenizer: copied from `source`,
    the GGUF file the model was loaded from, or written from `model.config` and `tokenizer`
    (a transformers tokenizer or its directory; `pre` names llama.cpp's pre-tokenizer, e.g.
    "llama-bpe", "smollm"). Written to a temporary file, then renamed: a failure leaves `path`
    as it was; an existing `path` needs `overwrite=True`."""
    import gguf
    model = unwrap_compiled(model)
    config = _check(model, Path(path), source, tokenizer, overwrite)
    mixture = _mixture(model, type)
    tmp = Path(path).parent / f".{Path(path).name}.tmp-{uuid.uuid4().hex[:8]}"
    writer = gguf.GGUFWriter(str(tmp), arch="llama")
    try:
        kinds = _add_tensors(writer, model, config, mixture)
        file_type = mixture or _majority(kinds)
        if source is not None:
            copy_metadata(writer, gguf.GGUFReader(str(source)), file_type)
        else:
            write_hf_metadata(writer, model, tokenizer, file_type, pre)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return Path(path)


def _check(model: nn.Module, path: Path, source, tokenizer, overwrite: bool):
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"to_gguf writes Llama-family decoders (model_type 'llama', e.g. "
                         f"SmolLM2); got {getattr(config, 'model_type', type(model).__name__)!r}")
    if (source is None) == (tokenizer is None):
        raise ValueError("pass source= (the .gguf file the model was loaded from: its metadata "
                         "and tokenizer are copied) or tokenizer= (metadata written from the "
                         "model's config and this tokenizer), not both")
    if source is not None and (not Path(source).is_file() or Path(source).suffix != ".gguf"):
        raise ValueError(f"source must be the .gguf file the model was loaded from (its "
                         f"metadata and tokenizer are copied), got {str(source)!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True")
    return config


def _mixture(model: nn.Module, mixture: str | None) -> str | None:
    """`mixture` checked, or the one the quantized layers name; None if they name none."""
    if mixture is not None:
        check_mixture(mixture)
        return mixture
    named = {(getattr(m, "discq_config", None) or {}).get("gguf") or block_type(m.weight)
             for m in model.modules() if isinstance(getattr(m, "weight", None), QuantizedTensor)}
    named.discard(None)
    return named.pop() if len(named) == 1 and next(iter(named)) in MIXTURES else None


def _add_tensors(writer, model: nn.Module, config, mixture: str | None) -> list[str]:
    """Every tensor of the state dict under its GGUF name; returns the block types used."""
    import gguf
    n_layers, n_gqa, tied = model_shape(model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    kinds = []
    for name, t in model.state_dict(keep_vars=True).items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reads the head from token_embd when output.weight is absent
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{name}: no GGUF name for this tensor of a Llama model")
        want = None
        if mixture is not None and t.dim() == 2:
            fqn = name.removesuffix(".weight")
            want = tensor_type(mixture, fqn, t.shape[1], n_layers, n_gqa, tied)
        raw, kind = _tensor_bytes(name, t, want, _rope_rows(name, t.shape[0], config))
        if kind == "F32" or kind == "F16":
            writer.add_tensor(gguf_name, raw)
        else:
            writer.add_tensor(gguf_name, raw, raw_dtype=gguf.GGMLQuantizationType[kind])
        kinds.append(kind)
    return kinds


def _tensor_bytes(name: str, t, want: str | None, rows) -> tuple[np.ndarray, str]:
    """(what the writer gets, its GGML type): a quantized weight as it is (it must be the type
    the mixture gives it); a float matrix rounded to nearest onto `want`; the rest F32."""
    if isinstance(t, QuantizedTensor):
        kind = block_type(t)
        if kind is None:
            raise ValueError(f"{name}: {t!r} has no llama.cpp block type; quantize with "
                             f"gguf='Q4_K_M' (or another mixture or GGML type)")
        if want is not None and kind != want:
            raise ValueError(f"{name} is {kind}, but the mixture gives it {want}: quantize with "
                             f"gguf=<the mixture>, or pass the mixture it was quantized with")
        return to_blocks(t, rows), kind
    w = t.detach().float().cpu()
    w = w[rows] if rows is not None else w
    if want is None:
        return w.numpy(), "F32"  # exactly the model's values
    if want == "F16":
        return w.half().numpy(), "F16"
    return GGUFGrid(want).quantize(w).qdata.numpy(), want


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


def _majority(kinds: list[str]) -> str | None:
    quantized = [k for k in kinds if k not in ("F32", "F16")]
    return max(set(quantized), key=quantized.count) if quantized else None
