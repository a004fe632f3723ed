"""`to_compressed_tensors`: a transformers model whose quantized weights are affine 4- or 8-bit
grids grouped along the input dimension, as a `pack-quantized` compressed-tensors directory for
vLLM and transformers.

Names are the checkpoint's, as the model's family stores it on disk (the layout vLLM reads and
transformers converts on load): a mixture-of-experts layer's stacked experts are written as one
quantized linear per expert and projection (Mixtral's `block_sparse_moe.experts.3.w1`,
Qwen-MoE's `mlp.experts.3.gate_proj`), found by running transformers' own reverse conversion
on the stacks' row indices.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.base import QuantizedTensor, unwrap_compiled
from discq.tensors.experts import ExpertsQuantizedTensor
from discq.tensors.packing import pack_codes


def to_compressed_tensors(model: nn.Module, path: str | os.PathLike, *, tokenizer=None,
                          card: str | None = None, overwrite: bool = False) -> Path:
    """Write a transformers model whose quantized weights are affine 4- or 8-bit grids grouped
    along the input dimension as a `pack-quantized` compressed-tensors directory, which vLLM
    loads. transformers (with `compressed-tensors` installed) loads the symmetric ones; its
    loader expects an asymmetric checkpoint's zero points unpacked where the format, vLLM and
    llm-compressor pack them (llm-compressor issue #1618), so asymmetric directories follow the
    format. Written atomically, with `card` as its README.md if given."""
    from discq.io import write_atomically
    model = unwrap_compiled(model)
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a transformers model")
    tensors, schemes = _ct_tensors(model)
    if not schemes:
        raise ValueError("the model has no quantized weight to export; run discq.quantize_ first")
    config = model.config.to_dict()
    config["quantization_config"] = _ct_config(model, schemes, tensors)

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
    """The checkpoint's tensors in compressed-tensors' names, and {scheme: [module names]}."""
    state, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:  # tied: stored once, transformers ties it again on load
            seen.add(id(t))
            state[name] = t
    layout = checkpoint_layout(model, state)
    tensors, schemes = {}, {}
    for name, t in state.items():
        for key, expert, rows in layout[name]:
            w = t.expert(expert) if isinstance(t, ExpertsQuantizedTensor) else t
            if not isinstance(w, QuantizedTensor):
                plain = w.detach()[expert] if expert is not None else w.detach()
                tensors[key] = plain[rows].contiguous().cpu() if rows is not None \
                    else plain.contiguous().cpu()
                continue
            module = key.removesuffix(".weight")
            _check_ct(name, w)
            tensors.update(_packed(module, w, rows))
            schemes.setdefault((w.bits, w.group_size, w.zero_point is None), []).append(module)
    return tensors, schemes


def _packed(module: str, w: AffineQuantizedTensor, rows) -> dict:
    """One quantized linear's compressed-tensors parts (rows `rows` of `w`, or all). discq's
    packing is the same dense little-endian bit stream of the codes (stored unsigned, i.e.
    signed value + 2^(bits-1), as compressed-tensors offsets them)."""
    qdata, scale, zero = w.qdata, w.scale, w.zero_point
    if rows is not None:
        qdata, scale = qdata[rows], scale[rows]
        zero = zero[rows] if zero is not None else None
    N = qdata.shape[0]
    out = {f"{module}.weight_packed": qdata.contiguous().cpu().view(torch.int32),
           f"{module}.weight_scale": scale.contiguous().cpu(),
           f"{module}.weight_shape": torch.tensor([N, w.shape[1]])}
    if zero is not None:  # [N, G] codes packed along N, as the weight along K
        packed = pack_codes(zero.t().contiguous().cpu(), w.bits)  # [G, N·bits/8]
        out[f"{module}.weight_zero_point"] = packed.view(torch.int32).t().contiguous()
    return out


def checkpoint_layout(model: nn.Module, state: dict) -> dict[str, list[tuple]]:
    """For each state-dict key, where its rows go in the checkpoint's own layout: [(checkpoint
    key, expert index or None, row indices or None for all)]. transformers' reverse conversion
    (what `save_pretrained` applies) is run on tensors holding a unique index per row, so every
    renaming, split and per-expert unstacking of the family is followed, whatever the family."""
    from transformers.core_model_loading import revert_weight_conversion
    index, starts, start = {}, [], 0
    for name, t in state.items():
        if isinstance(t, ExpertsQuantizedTensor) and t.transposed:
            raise ValueError(f"{name}: this family's checkpoint keeps its experts stacked and "
                             f"transposed (gpt-oss); compressed-tensors stores one linear per "
                             f"expert, so vLLM could not read it: export it with to_gguf")
        lead = tuple(t.shape[:-1]) if t.dim() >= 2 else tuple(t.shape)
        n = int(torch.tensor(lead).prod()) if lead else 1
        ix = torch.arange(start, start + n, dtype=torch.float64).reshape(*lead or (1,))
        index[name] = ix.unsqueeze(-1) if t.dim() >= 2 else ix  # rows, exact in float64
        starts.append((start, name))
        start += n
    saved = model.__dict__.pop("_weight_conversions", None)  # the family's own, not discq's
    try:
        reverted = revert_weight_conversion(model, dict(index))
    finally:
        if saved is not None:
            model.__dict__["_weight_conversions"] = saved
    out: dict[str, list[tuple]] = {name: [] for name in state}
    for key, t in reverted.items():
        flat = t.reshape(-1).long()
        first, name = max((s, n) for s, n in starts if s <= int(flat[0]))
        local = flat - first
        out[name].append((key, *_rows(name, state[name], local)))
    return out


def _rows(name: str, t, local: torch.Tensor) -> tuple[int | None, torch.Tensor | None]:
    """(expert, rows) of a reverted part of `t` from its local row indices (None: all)."""
    if t.dim() < 2:
        return None, None
    expert, N = None, t.shape[-2]
    if t.dim() == 3:  # a stack [E, N, K]: one expert's rows
        if isinstance(t, ExpertsQuantizedTensor):
            N = t.expert(0).shape[0]
        expert = int(local[0]) // N
        local = local - expert * N
        if local.numel() > N or int(local.max()) >= N:
            raise ValueError(f"{name}: this family's checkpoint keeps its experts stacked in one "
                             f"tensor (gpt-oss); compressed-tensors stores one linear per "
                             f"expert, so vLLM could not read it: export it with to_gguf")
    whole = local.numel() == N and torch.equal(local, torch.arange(N))
    return expert, None if whole else local


def _check_ct(name: str, t) -> None:
    N, K = t.shape
    ok = (isinstance(t, AffineQuantizedTensor) and t.bits in (4, 8) and t.group_along == "input"
          and t.lowrank_u is None and K % t.group_size == 0 and K * t.bits % 32 == 0
          and (t.zero_point is None or N * t.bits % 32 == 0))
    if not ok:
        raise ValueError(f"{name}: the compressed-tensors export takes affine 4- or 8-bit "
                         f"weights grouped along the input dimension (a group size dividing "
                         f"{K}; rows and columns whole 32-bit words of codes); got "
                         f"{t.format_name} {t.attributes()}")


def _ct_config(model: nn.Module, schemes: dict, tensors: dict) -> dict:
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme)
    groups = {}
    for i, ((bits, g, symmetric), modules) in enumerate(sorted(schemes.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="group", group_size=g)
        groups[f"group_{i}"] = QuantizationScheme(
            targets=[f"re:^{re.escape(m)}$" for m in modules], weights=args)
    # the checkpoint's linears left in full precision (routers, an fp head), by their names
    ignore = {k.removesuffix(".weight") for k, v in tensors.items()
              if k.endswith(".weight") and v.dim() == 2 and not _is_embedding(model, k)}
    ignore |= {n for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and not isinstance(m.weight, QuantizedTensor)}  # a tied head, not stored
    ignore = sorted(ignore)
    config = QuantizationConfig(config_groups=groups, format="pack-quantized",
                                quantization_status="compressed", ignore=ignore)
    return {"quant_method": "compressed-tensors", **config.model_dump(mode="json")}


def _is_embedding(model: nn.Module, key: str) -> bool:
    names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return key in names
