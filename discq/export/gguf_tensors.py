"""The tensors of a GGUF file: each of the model's tensors under llama.cpp's name for its
architecture, in the GGML type it is stored in or the mixture gives it.

Quantized weights are written as they are (`gguf_blocks`): llama.cpp runs exactly the values
discq rounded. Stacked experts become llama.cpp's 3-D `blk.N.ffn_{gate,up,down}_exps` tensors
(one row of blocks per expert row, expert after expert; a gate/up stack is split in its gate and
up rows, concatenated or, in gpt-oss, interleaved), their biases `ffn_*_exps.bias`. Float
matrices the method did not round are rounded to nearest onto the type the mixture gives them
(F32 without a mixture); vectors stay F32 (Gemma's norms with the 1 it adds).
"""
from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from discq.passes.experts import is_experts
from discq.passes.gguf_mixture import experts_per_layer, model_shape, tensor_type
from discq.passes.matrices import is_conv1d
from discq.tensors.base import QuantizedTensor
from discq.tensors.experts import ExpertsQuantizedTensor
from discq.tensors.gguf import GGUFGrid

from .gguf_archs import GGUFArch
from .gguf_blocks import block_type, to_blocks

Entry = tuple[str, np.ndarray, str]  # (GGUF name, what the writer gets, GGML type)
# matrices llama.cpp's quantizer leaves in float: routers, learned positions, token types
KEPT_FLOAT = ("ffn_gate_inp.weight", "position_embd.weight", "token_types.weight")


def gguf_tensors(model: nn.Module, entry: GGUFArch, mixture: str | None) -> Iterator[Entry]:
    """Every tensor of `model` as llama.cpp's architecture `entry` names it."""
    import gguf
    n_layers, n_gqa, tied = model_shape(model)
    shape = (n_layers, n_gqa, tied, experts_per_layer(model))  # what the mixture's rules read
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, entry.arch), n_layers)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owners = {f"{fqn}.{p}" if fqn else p: (m, p) for fqn, m in model.named_modules()
              for p in m._parameters}
    for name, t in model.state_dict(keep_vars=True).items():
        module, attr = owners.get(name, (None, name))
        if tied and head is not None and module is head:
            continue  # llama.cpp reads the head from token_embd when output.weight is absent
        if module is not None and is_experts(module):
            yield from _experts(name, t, module, attr, mixture, shape)
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{name}: llama.cpp's {entry.arch.lower()} architecture has no "
                             f"tensor for it")
        if not gguf_name.endswith((".weight", ".bias")):  # gpt-oss's attention sinks
            gguf_name += ".weight"
        if entry.norm_shift and name.endswith("norm.weight"):
            t = t.detach().float() + entry.norm_shift
        if module is not None and is_conv1d(module) and attr == "weight":
            t = t.detach().t()  # a Conv1D left in full precision stores [in, out]
        want = None
        if mixture is not None and t.dim() == 2 and not gguf_name.endswith(".bias") \
                and not any(k in gguf_name for k in KEPT_FLOAT):
            want = _wants(mixture, name.removesuffix(".weight"), t.shape[1], shape)
        rows = rope_rows(name, t.shape[0], model.config) if entry.rope_rows else None
        yield (gguf_name, *tensor_bytes(name, t, want, rows))


def _wants(mixture: str, fqn: str, K: int, shape: tuple) -> tuple[str, ...]:
    """The types the mixture gives `fqn`: without an importance matrix (what a float matrix is
    rounded to here), then with one (what discq's data-driven methods chose)."""
    return tuple(dict.fromkeys(tensor_type(mixture, fqn, K, *shape, imatrix=imatrix)
                               for imatrix in (False, True)))


def tensor_bytes(name: str, t, want: str | tuple[str, ...] | None, rows=None
                 ) -> tuple[np.ndarray, str]:
    """(what the writer gets, its GGML type): a quantized weight as it is (it must be a type
    the mixture gives it, `want`); a float matrix rounded to nearest onto `want` (the first of
    them); the rest F32."""
    wants = (want,) if isinstance(want, str) else want
    if isinstance(t, QuantizedTensor):
        kind = block_type(t)
        if kind is None:
            raise ValueError(f"{name}: {t!r} has no llama.cpp block type; quantize with "
                             f"gguf='Q4_K_M' (or another mixture or GGML type)")
        if wants is not None and kind not in wants:
            raise ValueError(f"{name} is {kind}, but the mixture gives it {' or '.join(wants)}: "
                             f"quantize with gguf=<the mixture>, or pass the mixture it was "
                             f"quantized with")
        return to_blocks(t, rows), kind
    want = None if wants is None else wants[0]
    w = t.detach().float().cpu()
    w = w[rows] if rows is not None else w
    if want is None:
        return w.numpy(), "F32"  # exactly the model's values
    if want == "F16":
        return w.half().numpy(), "F16"
    return GGUFGrid(want).quantize(w).qdata.numpy(), want


def rope_rows(name: str, n_rows: int, config) -> Tensor | None:
    """llama.cpp's row order for q/k in its `llama` architecture (rotary pairs interleaved
    within each head, where transformers keeps each head's two halves apart): the rows of
    `name` to take, or None."""
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    kind = next((k for k in heads if f".{k}." in name), None)
    if kind is None or not name.endswith("weight"):
        return None
    n_head = heads[kind]
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2) \
        .reshape(-1)


# ---- experts ---------------------------------------------------------------------------------

def _experts(name: str, t, module: nn.Module, attr: str, mixture, shape: tuple
              ) -> Iterator[Entry]:
    """A stack (or its bias) as llama.cpp's expert tensors, gate and up apart."""
    import gguf
    layer = int(re.search(r"\.(\d+)\.", name).group(1))
    stack = attr.removesuffix("_bias")
    parts = _parts(module, stack)
    for kind, rows in parts:
        gname = gguf.TENSOR_NAMES[kind].format(bid=layer)
        if attr.endswith("_bias"):  # [E, N]: llama.cpp's {N, E}
            yield f"{gname}.bias", t.detach().float()[:, rows].contiguous().numpy(), "F32"
            continue
        want = None
        if mixture is not None:
            fqn = f"{name}.0"  # what the mixture decided for the stack's experts
            K = (t.expert(0).shape[1] if isinstance(t, ExpertsQuantizedTensor)
                 else t.shape[1] if module.is_transposed else t.shape[2])
            want = _wants(mixture, fqn, K, shape)
        raw, kind_out = _stack_bytes(name, t, module, rows, want)
        yield f"{gname}.weight", raw, kind_out


def _parts(module: nn.Module, stack: str) -> list[tuple[object, slice]]:
    """(GGUF tensor kind, the stack's rows that go there) for one stack."""
    import gguf
    T = gguf.MODEL_TENSOR
    if stack == "down_proj":
        return [(T.FFN_DOWN_EXP, slice(None))]
    if stack == "up_proj":
        return [(T.FFN_UP_EXP, slice(None))]
    if getattr(module, "is_concatenated", True):  # gate rows, then up rows
        n = _rows(module, stack) // 2
        return [(T.FFN_GATE_EXP, slice(0, n)), (T.FFN_UP_EXP, slice(n, 2 * n))]
    return [(T.FFN_GATE_EXP, slice(0, None, 2)), (T.FFN_UP_EXP, slice(1, None, 2))]


def _rows(module: nn.Module, stack: str) -> int:
    W = module._parameters[stack]
    if isinstance(W, ExpertsQuantizedTensor):
        return W.expert(0).shape[0]
    return W.shape[2] if module.is_transposed else W.shape[1]


def _stack_bytes(name: str, t, module: nn.Module, rows: slice, want
                 ) -> tuple[np.ndarray, str]:
    """[E, rows, ...] of the experts' weights ([N, K] each) in one GGML type."""
    per_expert, kinds = [], set()
    for e in range(t.shape[0]):
        if isinstance(t, ExpertsQuantizedTensor):
            w = t.expert(e)
        else:
            w = t.detach()[e]
            w = w.t() if module.is_transposed else w
        raw, kind = tensor_bytes(f"{name}[{e}]", w, want)
        idx = torch.arange(raw.shape[0])[rows].numpy()
        per_expert.append(raw[idx])
        kinds.add(kind)
    return np.ascontiguousarray(np.stack(per_expert)), kinds.pop()


def gguf_names(model: nn.Module) -> dict[str, tuple[str, bool]]:
    """{transformers weight name: (its GGUF name, q/k rows in llama.cpp's rotary order)} for
    the model's linear weights outside expert stacks: what reads a llama.cpp file back into
    the model (the quality benchmark's llama.cpp rows)."""
    import gguf

    from .gguf_archs import arch_of
    entry = arch_of(model)
    n_layers = model_shape(model)[0]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, entry.arch), n_layers)
    out = {}
    for fqn, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = f"{fqn}.weight"
            g = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if g is not None:
                rope = entry.rope_rows and rope_rows(name, m.out_features, model.config) is not None
                out[name] = (g, rope)
    return out
