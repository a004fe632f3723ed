"""Files for the engines people deploy: `to_gguf` (discq/gguf_export.py), a discq-rounded
Llama-family model as a GGUF file that llama.cpp reads, in llama.cpp's mixtures (Q4_K_M, …);
`to_compressed_tensors`, a `pack-quantized` directory for vLLM and transformers.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from discq.gguf_export import to_gguf
from discq.tensors.base import QuantizedTensor, unwrap_compiled
from discq.tensors.packing import pack_codes

__all__ = ["to_compressed_tensors", "to_gguf"]


# ---- compressed-tensors (vLLM, transformers) ------------------------------------------------

def to_compressed_tensors(model: nn.Module, path: str | os.PathLike, *, tokenizer=None,
                          card: str | None = None, overwrite: bool = False) -> Path:
    """Write a transformers model whose quantized linears are affine 4- or 8-bit weights grouped
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
        if t.zero_point is not None:  # [N, G] codes packed along N, as the weight along K
            zero = pack_codes(t.zero_point.t().contiguous().cpu(), t.bits)  # [G, N·bits/8]
            tensors[f"{module}.weight_zero_point"] = zero.view(torch.int32).t().contiguous()
        key = (t.bits, t.group_size, t.zero_point is None)
        schemes.setdefault(key, []).append(module)
    return tensors, schemes


def _check_ct(name: str, t) -> None:
    from discq.tensors.affine import AffineQuantizedTensor
    K = t.shape[1]
    N, K = t.shape
    ok = (isinstance(t, AffineQuantizedTensor) and t.bits in (4, 8) and t.group_along == "input"
          and t.lowrank_u is None and K % t.group_size == 0 and K * t.bits % 32 == 0
          and (t.zero_point is None or N * t.bits % 32 == 0))
    if not ok:
        raise ValueError(f"{name}: the compressed-tensors export takes affine 4- or 8-bit "
                         f"weights grouped along the input dimension (a group size dividing "
                         f"{K}; rows and columns whole 32-bit words of codes); got "
                         f"{t.format_name} {t.attributes()}")


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
