"""The transformers families `to_gguf` writes, one table entry each: llama.cpp's architecture,
the hyper-parameters it reads, and what differs in how the family's tensors are stored.

Tensor names come from the `gguf` package's map for the architecture (the same one llama.cpp's
converter uses); stacked experts are written as llama.cpp's `ffn_{gate,up,down}_exps` 3-D
tensors (`gguf_tensors.py`). What an entry says:
  arch        llama.cpp's architecture (a `gguf.MODEL_ARCH` name)
  rope_rows   q/k rows in the rotary order of llama.cpp's `llama` architecture (pairs
              interleaved within each head; transformers keeps the two halves apart). The
              other families use llama.cpp's NEOX rotary order, which is transformers'.
  norm_shift  added to every RMSNorm weight: Gemma's norms compute (1 + w)·x̂, llama.cpp's w·x̂
  keys        the family's own key-values, beyond the common ones (`common_keys`)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class GGUFArch:
    arch: str
    rope_rows: bool = False
    norm_shift: float = 0.0
    keys: Callable[[object, object], None] = lambda writer, config: None


def _moe_sizes(writer, c) -> None:
    """Qwen-MoE: each expert's and the shared expert's widths."""
    writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    if getattr(c, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)


def _sliding(writer, c) -> None:
    """The window and which layers use it (llama.cpp's per-layer pattern)."""
    if getattr(c, "sliding_window", None):
        writer.add_sliding_window(c.sliding_window)
        types = getattr(c, "layer_types", None)
        if types:
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])


def _gemma2(writer, c) -> None:
    writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
    writer.add_final_logit_softcapping(c.final_logit_softcapping)
    _sliding(writer, c)


def _gemma3(writer, c) -> None:
    if getattr(c, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    _sliding(writer, c)


def _gpt_oss(writer, c) -> None:
    writer.add_expert_feed_forward_length(c.intermediate_size)
    _sliding(writer, c)


def _phi3(writer, c) -> None:
    if getattr(c, "sliding_window", None):
        writer.add_sliding_window(c.sliding_window)


ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("LLAMA", rope_rows=True),
    "mistral": GGUFArch("LLAMA", rope_rows=True),
    "mixtral": GGUFArch("LLAMA", rope_rows=True),
    "qwen2": GGUFArch("QWEN2"),
    "qwen3": GGUFArch("QWEN3"),
    "qwen2_moe": GGUFArch("QWEN2MOE", keys=_moe_sizes),
    "qwen3_moe": GGUFArch("QWEN3MOE", keys=_moe_sizes),
    "gemma2": GGUFArch("GEMMA2", norm_shift=1.0, keys=_gemma2),
    "gemma3_text": GGUFArch("GEMMA3", norm_shift=1.0, keys=_gemma3),
    "phi3": GGUFArch("PHI3", keys=_phi3),
    "gpt2": GGUFArch("GPT2"),
    "gpt_oss": GGUFArch("GPT_OSS", keys=_gpt_oss),
}


def arch_of(model) -> GGUFArch:
    """The table's entry for `model` (by its config's model_type), or a ValueError naming the
    families there are."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(f"to_gguf writes the families llama.cpp runs that discq knows "
                         f"({', '.join(sorted(ARCHS))}); got "
                         f"{model_type or type(model).__name__!r}")
    return ARCHS[model_type]


def arch_name(entry: GGUFArch) -> str:
    """llama.cpp's name of the architecture ("llama", "qwen2moe", "gpt-oss", ...)."""
    import gguf
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, entry.arch)]
