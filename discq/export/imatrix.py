"""llama.cpp's importance matrix from calibration tokens: `discq.export.to_imatrix(model, batches,
path)` and `discq imatrix`.

llama.cpp's quantizer weighs each weight's rounding error by the mean square of its input
column (and refuses the 2-bit i-quants without that). `llama-imatrix` gathers it by running the
model; this writes the same file from a forward pass of discq's own calibration tokens, so
that llama.cpp's quantizer and discq's methods can be given the same data. The format is
llama.cpp's GGUF imatrix (`general.type = "imatrix"`): per weight, under llama.cpp's tensor
name, `<name>.in_sum2` (Σ x² over the tokens, one row per matrix) and `<name>.counts` (the
tokens), with `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size`.
Every nn.Linear and Conv1D (GPT-2) of the decoder, and an untied head, is written; expert
stacks are refused by name (their per-expert rows are not written yet).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from discq.passes.calibration import as_batches
from discq.passes.experts import is_experts
from discq.passes.matrices import is_conv1d

from .gguf import gguf_writer
from .gguf_archs import arch_name, arch_of


def input_sums(model: nn.Module, batches) -> dict[str, tuple[torch.Tensor, int]]:
    """{name of a linear or Conv1D: (Σ x² per input column [K] in float64, tokens)} over
    `batches`."""
    sums: dict[str, list] = {}

    def hook(fqn):
        def seen(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [T, K]
            acc = sums.setdefault(fqn, [torch.zeros(x.shape[1], dtype=torch.float64), 0])
            acc[0] += (x * x).sum(0)
            acc[1] += x.shape[0]
        return seen
    handles = [m.register_forward_pre_hook(hook(fqn)) for fqn, m in model.named_modules()
               if isinstance(m, nn.Linear) or is_conv1d(m)]  # GPT-2's Conv1D: x [.., K] too
    try:
        with torch.no_grad():
            for ids in tqdm(batches, desc="imatrix", unit="batch", leave=False):
                model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: (v[0], v[1]) for k, v in sums.items()}


def to_imatrix(model: nn.Module, calibration, path: str | os.PathLike, *,
               dataset: str = "discq calibration", overwrite: bool = False) -> Path:
    """Write llama.cpp's imatrix of `model` on the token batches `calibration` to `path`
    (a .gguf file; written to a temporary file, then renamed)."""
    import gguf
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True")
    stacks = [fqn for fqn, m in model.named_modules() if is_experts(m)]
    if stacks:
        raise ValueError(f"to_imatrix writes dense linears only; {type(model).__name__} has "
                         f"expert stacks ({stacks[:3]}), whose per-expert rows it does not "
                         f"write yet")
    entry = arch_of(model)
    batches = as_batches(calibration, model)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, entry.arch),
                                     model.config.num_hidden_layers)
    rows = _rows(model, input_sums(model, batches), names)
    tokens = max(n for _, _, n in rows)
    chunk = int(batches[0].shape[1])
    with gguf_writer(path, arch_name(entry)) as writer:
        writer.add_string("general.type", "imatrix")
        writer.add_array("imatrix.datasets", [dataset])
        writer.add_uint32("imatrix.chunk_count", tokens // chunk)
        writer.add_uint32("imatrix.chunk_size", chunk)
        for name, s, n in rows:
            writer.add_tensor(f"{name}.in_sum2", s.float().numpy()[None])  # [1, K]: ne [K, 1]
            writer.add_tensor(f"{name}.counts", np.full((1, 1), n, np.float32))
    return path


def _rows(model: nn.Module, sums: dict, names) -> list[tuple[str, torch.Tensor, int]]:
    """(llama.cpp's tensor name, Σ x², tokens) for each linear llama.cpp has a tensor for;
    a tied head is not one (llama.cpp reads token_embd for it)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    out = []
    for fqn, (s, n) in sorted(sums.items()):
        if tied and model.get_submodule(fqn) is head:
            continue
        name = names.get_name(f"{fqn}.weight", try_suffixes=(".weight",))
        if name is None:
            raise ValueError(f"{fqn}: llama.cpp's {arch_name(arch_of(model))} architecture has "
                             f"no tensor for it")
        out.append((name, s, n))
    return out
