"""Tiny random models of every transformers family discq is tested on, built from configs (no
download): one entry per family, with what its GGUF export is checked against."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# shapes every method takes: widths multiples of 64 (QuIP#'s 8, QTIP's 16 and GPTVQ's groups)
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=320, max_position_embeddings=128)
MOE = dict(num_experts_per_tok=2)

FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "llama-untied": dict(model_type="llama", tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", sliding_window=64),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    # attention scaled by head_dim^-1/2 (query_pre_attn_scalar), as llama.cpp computes Gemma
    "gemma2": dict(model_type="gemma2", head_dim=16, sliding_window=32,
                   query_pre_attn_scalar=16),
    "gemma3": dict(model_type="gemma3_text", head_dim=16, sliding_window=32,
                   query_pre_attn_scalar=16),
    "phi3": dict(model_type="phi3"),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=128,
                 vocab_size=320, bos_token_id=0, eos_token_id=0, replace=True),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, **MOE),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128, **MOE),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, moe_intermediate_size=64,
                      head_dim=16, **MOE),
    "gpt_oss": dict(model_type="gpt_oss", num_local_experts=4, head_dim=16, **MOE),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")


def tiny_family(name: str, seed: int = 0):
    """A tiny random causal LM of family `name` (eval mode)."""
    spec = dict(FAMILIES[name])
    model_type = spec.pop("model_type")
    kwargs = spec if spec.pop("replace", False) else {**COMMON, **spec}
    kwargs.setdefault("bos_token_id", 1)
    kwargs.setdefault("eos_token_id", 2)
    kwargs.setdefault("pad_token_id", 0)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.architectures = [type(model).__name__]
    from discq.passes.matrices import routers
    with torch.no_grad():  # random weights of a realistic size (some families init to zero)
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
        gates = routers(model)  # decisive routing, as trained routers are: tiny changes of
        for _, r in sorted((n, m) for n, m in model.named_modules() if m in gates):  # the
            r.weight.normal_(0, 1.0)  # input do not swap experts (in a fixed order: seeded)
    return model


def calibration(n: int = 2, batch: int = 4, length: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (batch, length), generator=g) for _ in range(n)]


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on the held-out fixture text (what a GGUF file's
    vocabulary is written from; the tiny models' vocabularies are 320)."""
    from conftest import HELDOUT_TEXT
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # the special tokens llama.cpp's vocabulary code looks up for some families (Phi-3)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|endoftext|>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(HELDOUT_TEXT)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
