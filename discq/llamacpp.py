"""llama.cpp from Python (the optional `llama-cpp-python` package): run a GGUF file as a model
that discq's evaluation accepts, and llama.cpp's own quantizer, for side-by-side comparisons.

    with LlamaCppModel("smollm2-Q4_K_M.gguf") as m:
        discq.eval.compare(original, m, windows)     # perplexity, KL, top-1 of the file

llama.cpp computes in its own kernels (activations rounded to 8 bits inside the quantized
matmuls), so its numbers for the same weights differ slightly from discq's evaluation.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from discq.passes.gguf_mixture import check_mixture
from discq.quiet import quiet_loggers


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError("this needs llama.cpp's Python bindings: pip install "
                          "llama-cpp-python (it builds llama.cpp from source; `make test-all` "
                          "installs it)") from e
    return llama_cpp


class LlamaCppModel(nn.Module):
    """A GGUF file run by llama.cpp: forward(ids [B, S]) -> logits [B, S, V] fp32, every
    position (one llama.cpp context of `n_ctx` tokens, reset per sequence)."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, n_threads: int | None = None):
        super().__init__()
        self.n_ctx = n_ctx
        if not Path(path).is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        self.llm = _llama_cpp().Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                                      logits_all=True, verbose=False,
                                      n_threads=n_threads or torch.get_num_threads())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] > self.n_ctx:
            raise ValueError(f"sequences of {ids.shape[-1]} tokens exceed n_ctx={self.n_ctx}; "
                             f"pass a larger n_ctx")
        out = []
        for row in ids.tolist():  # row: S token ids
            self.llm.reset()
            self.llm.eval(row)
            out.append(torch.from_numpy(np.array(self.llm.scores[:len(row)], dtype=np.float32)))
        return torch.stack(out)  # [B, S, V]

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ggml_type(name: str, argument: str) -> int:
    from gguf import GGMLQuantizationType
    try:
        return GGMLQuantizationType[name.upper()].value
    except KeyError:
        raise ValueError(f"{argument}={name!r} is not a GGML type; use one of "
                         f"{[t.name for t in GGMLQuantizationType][:12]}, …") from None


def quantize(source: str | os.PathLike, path: str | os.PathLike, mixture: str, *,
             overwrite: bool = False, n_threads: int | None = None,
             token_embedding_type: str | None = None,
             output_tensor_type: str | None = None,
             imatrix: str | os.PathLike | None = None) -> Path:
    """llama.cpp's own quantization of the GGUF `source` into `mixture` ("Q4_K_M", …), as
    `llama-quantize --allow-requantize` writes it. Written to a temporary file, then renamed.
    `token_embedding_type`/`output_tensor_type`: a GGML type name ("F32", "Q8_0", …) for the
    embedding and head instead of the mixture's choice (llama-quantize's
    --token-embedding-type/--output-tensor-type). `imatrix`: an importance matrix file
    (`discq.export.to_imatrix`, or llama.cpp's llama-imatrix); llama.cpp's C API takes it only
    as an in-memory C++ map, so this runs the `llama-quantize` program (`llama_quantize_path`)."""
    check_mixture(mixture)
    kept = {field: _ggml_type(name, field) for field, name in
            (("token_embedding_type", token_embedding_type),
             ("output_tensor_type", output_tensor_type)) if name is not None}
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True")
    if imatrix is not None:
        return _quantize_program(source, path, mixture, kept, Path(imatrix), n_threads)
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mixture}")
    for field, value in kept.items():
        setattr(params, field, value)
    params.allow_requantize = True
    params.nthread = n_threads or torch.get_num_threads()
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:  # llama.cpp logs every tensor it writes (through this logger); errors still show
        with quiet_loggers(["llama-cpp-python"]):
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(),
                                                ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({source}, {mixture}) failed with {rc}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def llama_quantize_path() -> Path:
    """The `llama-quantize` program: $DISCQ_LLAMA_QUANTIZE, else on PATH (`make llama-tools`
    builds it from llama-cpp-python's llama.cpp into build/llama.cpp/bin)."""
    found = os.environ.get("DISCQ_LLAMA_QUANTIZE") or shutil.which("llama-quantize")
    if not found or not Path(found).is_file():
        raise FileNotFoundError("llama.cpp's llama-quantize program was not found: run `make "
                                "llama-tools` and set DISCQ_LLAMA_QUANTIZE to the "
                                "build/llama.cpp/bin/llama-quantize it builds (or put it on "
                                "PATH)")
    return Path(found)


def _quantize_program(source, path: Path, mixture: str, kept: dict[str, int], imatrix: Path,
                      n_threads: int | None) -> Path:
    """`llama-quantize --allow-requantize --imatrix F [types] source tmp MIXTURE threads`."""
    if not imatrix.is_file():
        raise FileNotFoundError(f"no importance matrix at {imatrix}")
    from gguf import GGMLQuantizationType
    flags = [a for field, v in kept.items()
             for a in (f"--{field.replace('_', '-')}", GGMLQuantizationType(v).name)]
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    cmd = [str(llama_quantize_path()), "--allow-requantize", "--imatrix", str(imatrix), *flags,
           str(source), str(tmp), mixture, str(n_threads or torch.get_num_threads())]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                               f"{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
