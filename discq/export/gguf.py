"""`to_gguf`: a discq-rounded model as a GGUF file that llama.cpp (and transformers' GGUF
loader) reads, for every family llama.cpp runs that discq knows (`gguf_archs.ARCHS`: Llama,
Mistral, Mixtral, Qwen2/3 and their MoE, Gemma 2/3, Phi-3, GPT-2, gpt-oss).

    model, tok = discq.models.load_model("smollm2-135m")          # from its .gguf file
    quantize_(model, gptq_config(gguf="Q4_K_M", calibration=batches),
              filter_fn=keep_head_filter(model))
    discq.export.to_gguf(model, "smollm2-Q4_K_M.gguf", source=discq.models.bundled_path("smollm2-135m"))

Quantized weights are written in their own GGML type, byte for byte, so llama.cpp runs
exactly the values discq rounded; stacked experts become llama.cpp's `ffn_*_exps` tensors
(`gguf_tensors.py`). The other 2-D tensors (token embeddings, an untied head, matrices left out
of quantize_) are rounded to nearest onto the type llama.cpp's mixture gives them
(`passes/gguf_mixture.py`); norms stay F32. The mixture is `type=` or, if not given, the one
the model was quantized with (`gguf=` of its configs; Q4_0/Q8_0 for symmetric 4-/8-bit groups
of 32). The metadata and the tokenizer come from `source`, the GGUF file the model was loaded
from, or from the model's config and `tokenizer` (`gguf_metadata.py`).
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from torch import nn

from discq.passes.gguf_mixture import MIXTURES, check_mixture
from discq.passes.inspect import layer_config
from discq.tensors.base import QuantizedTensor, unwrap_compiled
from discq.tensors.experts import ExpertsQuantizedTensor

from .gguf_archs import arch_name, arch_of
from .gguf_blocks import block_type
from .gguf_metadata import copy_metadata, source_arch, write_hf_metadata
from .gguf_tensors import gguf_tensors


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
    entry = _check(model, Path(path), source, tokenizer, overwrite)
    mixture = _mixture(model, type)
    with gguf_writer(Path(path), arch_name(entry)) as writer:
        kinds = []
        for name, raw, kind in gguf_tensors(model, entry, mixture):
            dtype = None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, raw, raw_dtype=dtype)
            kinds.append(kind)
        file_type = mixture or _majority(kinds)
        if source is not None:
            copy_metadata(writer, gguf.GGUFReader(str(source)), file_type)
        else:
            write_hf_metadata(writer, model, entry, tokenizer, file_type, pre)
    return Path(path)


@contextlib.contextmanager
def gguf_writer(path: Path, arch: str):
    """A `gguf.GGUFWriter` on a temporary file beside `path`: what the block adds is written
    and renamed into place when it ends without error; otherwise `path` is left as it was."""
    import gguf
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check(model: nn.Module, path: Path, source, tokenizer, overwrite: bool):
    entry = arch_of(model)
    if (source is None) == (tokenizer is None):
        raise ValueError("pass source= (the .gguf file the model was loaded from: its metadata "
                         "and tokenizer are copied) or tokenizer= (metadata written from the "
                         "model's config and this tokenizer), not both")
    if source is not None:
        if not Path(source).is_file() or Path(source).suffix != ".gguf":
            raise ValueError(f"source must be the .gguf file the model was loaded from (its "
                             f"metadata and tokenizer are copied), got {str(source)!r}")
        import gguf
        theirs = source_arch(gguf.GGUFReader(str(source)))
        if theirs != arch_name(entry):
            raise ValueError(f"source {str(source)!r} is a {theirs!r} model but this one is "
                             f"written as {arch_name(entry)!r}; pass the model's own GGUF or "
                             f"tokenizer=")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True")
    return entry


def _mixture(model: nn.Module, mixture: str | None) -> str | None:
    """`mixture` checked, or the one the quantized weights name; None if they name none."""
    if mixture is not None:
        check_mixture(mixture)
        return mixture
    configured, named = set(), set()
    for m in model.modules():
        for name, w in m._parameters.items():
            if isinstance(w, QuantizedTensor):
                inner = w.expert(0) if isinstance(w, ExpertsQuantizedTensor) else w
                gguf = (layer_config(m, name) or {}).get("gguf")
                configured.add(gguf)
                named.add(gguf or block_type(inner))
    configured.discard(None)  # a tied embedding holds its head's weight but no config
    named.discard(None)
    named = configured if len(configured) == 1 else named
    return named.pop() if len(named) == 1 and next(iter(named)) in MIXTURES else None


def _majority(kinds: list[str]) -> str | None:
    quantized = [k for k in kinds if k not in ("F32", "F16")]
    return max(set(quantized), key=quantized.count) if quantized else None
