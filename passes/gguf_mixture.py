"""llama.cpp's named mixtures ("Q4_K_M", "Q3_K_M", …): which GGML type each tensor gets.

The rules are llama.cpp's `llama_tensor_get_type` for dense decoders without an importance
matrix (llama-quant.cpp), written here from its behaviour:
  - every quantized tensor starts at the mixture's base type (Q4_K for Q4_K_M);
  - attn_v, attn_output and ffn_down get more bits in some mixtures and layers
    (`use_more_bits`: the first and last eighth of the layers and every third in between);
  - the output head (and the token embedding when the head is tied to it) gets Q6_K
    (Q8_0 in Q8_0 mixtures); an untied token embedding keeps the base type;
  - a row length that is not a multiple of the type's block falls back: Q2_K/Q3_K -> Q4_0,
    Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 when even 32 does not divide it.
SmolLM2-135M's 576-wide rows take that fallback, so its "Q4_K_M" is mostly Q5_0: the types
here are the ones llama.cpp writes for the same model, which is what makes files comparable.
  - Phi-3's fused attn_qkv gets more bits in the K-mixtures; with 8 experts a layer
    (Mixtral), attn_v and attn_k get Q8_0 and attn_output Q5_K;
  - an expert stack's experts get the type of their stack's role (ffn_down_exps as ffn_down).
  - IQ4_NL/IQ4_XS: attn_v gets Q5_K with 4 or more query heads per key/value head, and the
    first eighth of the ffn_down layers Q5_K unless the quantizer had an importance matrix
    (`imatrix`: discq's data-driven methods count as having one — they weigh errors by the
    calibration inputs); IQ4_XS rows that are not whole 256-blocks fall back to IQ4_NL.
  - the 2- and 3-bit i-quant mixtures (IQ2_XXS … IQ3_M, llama.cpp's rules for each): e.g.
    IQ2_XS gives attn_v Q2_K (Q4_K with 4 or more query heads per key/value head or 4 or
    more experts), the first eighth of ffn_down and an untied token embedding Q2_K, the head
    Q5_K; IQ2_S/IQ2_M give those IQ3_S. Rows that are not whole 256-blocks fall back to IQ4_NL
    (SmolLM2's "IQ2_XS" is mostly IQ4_NL: only its 1536-wide ffn_down rows hold IQ2_XS).
Not reproduced: the 70B attn_v bump, Falcon rules, Q4_0/Q5_0's imatrix-only ffn_down rule.
"""
from __future__ import annotations

import re

from discq.tensors.gguf_layout import TYPES

BASE = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
        "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
        "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
        "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S",
        "IQ3_XXS": "IQ3_XXS", "IQ3_XS": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S",
        "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS"}
MIXTURES = tuple(BASE)
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
            **{t: "IQ4_NL" for t in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
                                     "IQ4_XS")}}
IQ4 = ("IQ4_NL", "IQ4_XS")
IQ2 = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M")  # llama.cpp's rules for the 2-bit mixtures
IQ3 = ("IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M")
CODEBOOK_MIXTURES = IQ2 + IQ3  # every tensor of their base type is a codebook type

# the role of a linear by the last part of its name (transformers' names: Llama-family, Phi-3's
# fused qkv_proj and gate_up_proj, GPT-2's Conv1D layers, an expert stack's experts)
ROLES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
         "lm_head": "output", "embed_tokens": "token_embd", "wte": "token_embd",
         "qkv_proj": "attn_qkv", "c_attn": "attn_qkv", "gate_up_proj": "ffn_up",
         "c_fc": "ffn_up"}


def check_mixture(name) -> None:
    if name not in BASE:
        raise ValueError(f"unknown GGUF mixture {name!r}; choose one of {MIXTURES} (llama.cpp's "
                         f"names) or a single block type")


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def role_and_layer(fqn: str) -> tuple[str | None, int | None]:
    """'model.layers.3.self_attn.v_proj' -> ('attn_v', 3); an expert of a stack,
    'model.layers.3.mlp.experts.down_proj.7', has its stack's role."""
    parts = fqn.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), None)
    if parts[-1].isdigit() and len(parts) > 1:
        parts = parts[:-1]
    if parts[-1] == "c_proj":  # GPT-2 names both outputs so
        return ("ffn_down" if "mlp" in parts else "attn_output"), layer
    return ROLES.get(parts[-1]), layer


def _by_role(mixture: str, role: str | None, i: int, n: int, n_gqa: int,
             n_expert: int = 1, imatrix: bool = False) -> str:
    base = BASE[mixture]
    if n_expert == 8 and role in ("attn_v", "attn_k"):  # llama.cpp: "trades just ~128MB"
        return "Q8_0"
    if n_expert == 8 and role == "attn_output" and mixture in ("Q2_K", "Q3_K_S", "Q3_K_M",
                                                                 "Q4_K_S", "Q4_K_M"):
        return "Q5_K"
    if mixture in IQ2:
        return _by_role_iq2(mixture, role, i, n, n_gqa, n_expert) or base
    if mixture in IQ3 + IQ4:
        return _by_role_iq34(mixture, role, i, n, n_gqa, n_expert, imatrix) or base
    if role == "attn_qkv":
        return {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "Q4_K_M": "Q5_K",
                "Q5_K_M": "Q6_K"}.get(mixture, base)
    if role == "attn_v":
        return {"Q2_K": "Q4_K" if n_gqa >= 4 else "Q3_K",
                "Q3_K_M": "Q5_K" if i < 2 else "Q4_K", "Q3_K_L": "Q5_K",
                "Q4_K_M": "Q6_K" if use_more_bits(i, n) else base,
                "Q5_K_M": "Q6_K" if use_more_bits(i, n) else base,
                "Q4_K_S": "Q5_K" if i < 4 else base}.get(mixture, base)
    if role == "ffn_down":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q5_K" if i < n // 16 else "Q4_K", "Q3_K_L": "Q5_K",
                "Q4_K_M": "Q6_K" if use_more_bits(i, n) else base,
                "Q5_K_M": "Q6_K" if use_more_bits(i, n) else base,
                "Q4_K_S": "Q5_K" if i < n // 8 else base}.get(mixture, base)
    if role == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mixture, base)
    return base


def _by_role_iq2(mixture: str, role: str | None, i: int, n: int, n_gqa: int,
                 n_expert: int) -> str | None:
    """The 2-bit i-quant mixtures' exceptions to their base type (None: the base)."""
    more = "IQ3_S" if mixture in ("IQ2_S", "IQ2_M") else "Q2_K"  # their "a bit more"
    if role == "attn_v":
        return "Q4_K" if n_gqa >= 4 or n_expert >= 4 else more
    if role == "attn_k" and n_expert == 8:
        return "Q4_K"
    if role == "token_embd":
        return more
    if role == "ffn_down" and i < n // 8:
        return more
    if role == "attn_output":
        return "Q5_K" if n_expert == 8 else ("IQ3_S" if more == "IQ3_S" else None)
    return None


def _by_role_iq34(mixture: str, role: str | None, i: int, n: int, n_gqa: int, n_expert: int,
                  imatrix: bool) -> str | None:
    """The 3- and 4-bit i-quant mixtures' exceptions to their base type (None: the base)."""
    if role == "attn_v":
        if mixture == "IQ3_XXS":
            return "Q4_K" if n_gqa >= 4 else ("IQ3_XXS" if imatrix else "IQ3_S")
        if mixture == "IQ3_M" or (mixture in ("IQ3_XS", "IQ3_S") and n_gqa >= 4):
            return "Q4_K"
        return "Q5_K" if mixture in IQ4 and n_gqa >= 4 else None
    if role in ("attn_k", "attn_q"):
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(mixture)
    if role == "token_embd":
        return "IQ3_S" if mixture == "IQ3_XXS" else None
    if role == "ffn_down":
        if mixture == "IQ3_XXS" and not imatrix:
            return "Q4_K" if i < n // 8 else "Q3_K"
        if mixture == "IQ3_M" and (i < n // 8 or (n_expert == 8 and use_more_bits(i, n))):
            return "Q4_K"
        return "Q5_K" if mixture in IQ4 and i < n // 8 and not imatrix else None
    if role == "attn_output":
        if n_expert == 8:
            return "Q5_K"
        return {"IQ3_XXS": "IQ3_S", "IQ3_M": "Q4_K"}.get(mixture)
    if role == "attn_qkv" and mixture == "IQ3_M":
        return "Q4_K"
    if role in ("ffn_gate", "ffn_up") and mixture == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
        return "IQ3_XXS"
    return None


def head_type(mixture: str, row: int) -> str:
    """The output head's type (also the tied token embedding's)."""
    base = BASE[mixture]
    if row % TYPES[base].block or base == "Q8_0":
        return "Q8_0"
    return fallback("Q5_K" if mixture in IQ2 or mixture == "IQ3_XXS" else "Q6_K", row)


def fallback(ggml_type: str, row: int) -> str:
    """llama.cpp's type for rows of `row` weights when `ggml_type`'s block does not divide it."""
    if row % TYPES[ggml_type].block == 0:
        return ggml_type
    ggml_type = FALLBACK.get(ggml_type, ggml_type)
    return ggml_type if row % TYPES[ggml_type].block == 0 else "F16"


def tensor_type(mixture: str, fqn: str, row: int, n_layers: int, n_gqa: int = 1,
                tied: bool = False, n_expert: int = 1, imatrix: bool = False) -> str:
    """The GGML type (or "F16") llama.cpp gives the 2-D tensor `fqn` with rows of `row`
    weights in `mixture` (`n_expert`: experts per mixture-of-experts layer; `imatrix`: the
    quantizer weighs errors by calibration data, as llama-quantize --imatrix)."""
    check_mixture(mixture)
    role, i = role_and_layer(fqn)
    if role == "output" or (role == "token_embd" and tied):
        return head_type(mixture, row)
    t = _by_role(mixture, role, i or 0, n_layers, n_gqa, n_expert, imatrix)
    return fallback(t, row)


def experts_per_layer(model) -> int:
    """Experts of a mixture-of-experts layer (1 for a dense model), from the config."""
    cfg = getattr(model, "config", None)
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    return 1


def model_shape(model) -> tuple[int, int, bool]:
    """(number of decoder layers, query heads per key/value head, head tied to embeddings)."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if n is None:
        layers = {int(m.group(1)) for name, _ in model.named_modules()
                  if (m := re.search(r"\.(\d+)\.", name))}
        n = len(layers) or 1
    heads = getattr(cfg, "num_attention_heads", 1)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return n, heads // kv, bool(getattr(cfg, "tie_word_embeddings", False))


def layer_types(model, mixture: str, targets, imatrix: bool = False) -> dict[str, str]:
    """{fqn: type} for the selected linears `targets` [(fqn, module)] of `model`."""
    n, n_gqa, tied = model_shape(model)
    n_expert = experts_per_layer(model)
    return {fqn: tensor_type(mixture, fqn, m.in_features, n, n_gqa, tied, n_expert, imatrix)
            for fqn, m in targets}
