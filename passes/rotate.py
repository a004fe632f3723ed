"""Rotations folded into the weights (QuaRot, Ashkboos et al. 2024; SpinQuant's R1 and R2, Liu
et al. 2024): incoherence that needs no runtime support.

`rotate_(model)` changes the weights of a transformers decoder so that it computes the same
function in a rotated basis, and stays an ordinary model of its architecture (every method
quantizes it, GGUF and compressed-tensors export it, engines run it unchanged):
  - the residual stream x becomes x·M (M a seeded randomized Hadamard transform, orthogonal):
    the token embedding E ← E·M; each RMSNorm's scale γ is folded into the linears that read
    it (W ← W·diag(γ)·M, γ ← 1: an RMS norm without scale commutes with M, ‖x·M‖ = ‖x‖); the
    linears that write into the stream, attention's output and the MLP's down projection,
    W ← Mᵀ·W (and their bias b ← b·M); the head reads the final norm like any reader. A head
    tied to the embedding is untied (it holds E·diag(γ)·M, the embedding E·M);
  - each attention head's values become v·H (H: a randomized Hadamard of the head size):
    v_proj's rows of that head ← Hᵀ·W, o_proj's columns of that head ← W·H.
Which modules read and write the stream is one entry per family in FAMILIES. Gemma 2 and 3 put
a scaled norm after attention and after the MLP, before the residual add: nothing after it can
absorb its scale, so their residual stream is not rotated (heads only). Mixture-of-experts
families (routers read the stream too), GPT-2's LayerNorm (mean subtraction) and models already
quantized are refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from discq.tensors.base import QuantizedTensor
from discq.tensors.hadamard import rotate as hadamard_rotate
from discq.tensors.hadamard import rotation
from torch import Tensor, nn


@dataclass(frozen=True)
class Family:
    """Names inside one decoder layer: each norm and the linears that read its output; the
    linears that write into the residual stream; where the values and their output are."""

    readers: dict[str, tuple[str, ...]]   # norm -> reading linears
    writers: tuple[str, ...]
    values: str                            # linear whose rows hold the values (v_proj, qkv)
    out: str                               # attention's output linear
    residual: bool = True                  # False: heads only (see the module docstring)


LLAMA = Family({"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")},
               ("self_attn.o_proj", "mlp.down_proj"), "self_attn.v_proj", "self_attn.o_proj")
FAMILIES: dict[str, Family] = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA,
    "phi3": Family({"input_layernorm": ("self_attn.qkv_proj",),
                    "post_attention_layernorm": ("mlp.gate_up_proj",)},
                   ("self_attn.o_proj", "mlp.down_proj"), "self_attn.qkv_proj",
                   "self_attn.o_proj"),
    "gemma2": Family({}, (), "self_attn.v_proj", "self_attn.o_proj", residual=False),
    "gemma3_text": Family({}, (), "self_attn.v_proj", "self_attn.o_proj", residual=False),
}


def rotation_matrix(n: int, seed: int) -> Tensor:
    """The dense n×n orthogonal M of a seeded randomized Hadamard transform (x ↦ x·M), float64."""
    s, Q = rotation(n, seed)
    return hadamard_rotate(torch.eye(n, dtype=torch.float64), s.double(), Q.double())


def family_of(model: nn.Module) -> Family:
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        raise ValueError(f"rotate_ folds rotations into {sorted(FAMILIES)} decoders; "
                         f"{type(model).__name__} (model_type {kind!r}) is not one of them")
    if any(isinstance(p, QuantizedTensor) for p in model.parameters()):
        raise ValueError("rotate_ works on the full-precision model: rotate first, then "
                         "quantize_")
    return FAMILIES[kind]


@torch.no_grad()
def rotate_(model: nn.Module, *, seed: int = 0, heads: bool = True) -> nn.Module:
    """Rotate `model` in place (see the module docstring); returns it. `seed` picks the
    rotations; `heads=False` leaves the attention heads' values alone."""
    family = family_of(model)
    layers = model.model.layers
    if family.residual:
        M = rotation_matrix(model.config.hidden_size, seed)
        _rotate_stream(model, layers, family, M)
    if heads:
        head_dim = getattr(model.config, "head_dim", None) or \
            model.config.hidden_size // model.config.num_attention_heads
        H = rotation_matrix(head_dim, seed + 1)
        for layer in layers:
            _rotate_heads(layer, family, H, model.config)
    return model


def _rotate_stream(model: nn.Module, layers, family: Family, M: Tensor) -> None:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:  # the head will differ from E·M
        head.weight = nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    _set(emb.weight, emb.weight.double() @ M)
    for layer in layers:
        for norm, readers in family.readers.items():
            gamma = _take_scale(layer.get_submodule(norm))
            for name in readers:
                _read(layer.get_submodule(name), gamma, M)
        for name in family.writers:
            _write(layer.get_submodule(name), M)
    gamma = _take_scale(model.model.norm)
    if head is not None:
        _read(head, gamma, M)


def _take_scale(norm: nn.Module) -> Tensor:
    """The norm's scale γ (float64), and the norm left without one (γ ← 1)."""
    gamma = norm.weight.detach().double().clone()
    norm.weight.fill_(1.0)
    return gamma


def _read(linear: nn.Linear, gamma: Tensor, M: Tensor) -> None:
    """A linear reading the normed stream: W ← W·diag(γ)·M ([N, D])."""
    _set(linear.weight, (linear.weight.double() * gamma) @ M)


def _write(linear: nn.Linear, M: Tensor) -> None:
    """A linear writing into the stream: W ← Mᵀ·W ([D, K]), b ← b·M."""
    _set(linear.weight, M.t() @ linear.weight.double())
    if linear.bias is not None:
        _set(linear.bias, linear.bias.double() @ M)


def _rotate_heads(layer: nn.Module, family: Family, H: Tensor, cfg) -> None:
    """Each value head v ← v·H: its rows of the values' linear ← Hᵀ·rows (bias: b·H), its
    columns of the output linear ← columns·H."""
    d = H.shape[0]
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    values = layer.get_submodule(family.values)
    start = values.weight.shape[0] - n_kv * d  # a fused qkv keeps the values last
    W = values.weight.double()
    Wv = W[start:].reshape(n_kv, d, -1)  # [heads, d, K]
    W[start:] = torch.einsum("ji,hjk->hik", H, Wv).reshape(n_kv * d, -1)
    _set(values.weight, W)
    if values.bias is not None:
        b = values.bias.double()
        b[start:] = (b[start:].reshape(n_kv, d) @ H).reshape(-1)
        _set(values.bias, b)
    out = layer.get_submodule(family.out)
    Wo = out.weight.double()  # [D, heads·d]
    heads = Wo.shape[1] // d
    _set(out.weight, (Wo.reshape(-1, heads, d) @ H).reshape(Wo.shape))


def _set(param: Tensor, value: Tensor) -> None:
    param.copy_(value.to(param.dtype))
