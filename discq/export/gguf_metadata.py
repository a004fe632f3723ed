"""The key-values of a GGUF file discq writes: copied from the GGUF the model came from, or
written from the transformers config (the keys llama.cpp reads for the family's architecture,
`gguf_archs.py`) and the tokenizer (a GPT-2-style byte-level BPE or a SentencePiece/Llama one,
read by the `gguf` package's vocab readers from the tokenizer's files).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .gguf_archs import GGUFArch


def file_type_value(file_type: str) -> int:
    """general.file_type of a mixture, or of a single type by the mixture named after it."""
    import gguf
    known = gguf.LlamaFileType.__members__
    return int(known.get(f"MOSTLY_{file_type}") or known[f"MOSTLY_{file_type}_M"])


def copy_metadata(writer, reader, file_type: str | None) -> None:
    """The source's key-values (architecture hyper-parameters, tokenizer, chat template), with
    general.file_type naming the mixture (or the block type most tensors use)."""
    import gguf
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # written by the writer itself
        vtype = field.types[0]
        value = field.contents()
        if field.name == "general.file_type" and file_type is not None:
            value = file_type_value(file_type)
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)


def source_arch(reader) -> str | None:
    """general.architecture of a GGUF file."""
    field = reader.fields.get("general.architecture")
    return field.contents() if field is not None else None


def rope(config) -> tuple[dict, dict | None]:
    """(the full-attention layers' rotary parameters, the sliding layers' or None): transformers
    keeps one dict, or one per layer type."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params or "sliding_attention" in params:
        return dict(params.get("full_attention") or {}), params.get("sliding_attention")
    if not params and getattr(config, "rope_theta", None) is not None:  # older configs
        params = {"rope_type": "default", "rope_theta": config.rope_theta,
                  **(getattr(config, "rope_scaling", None) or {})}
    return params, None


def check_config(config) -> None:
    """Refuse what llama.cpp would run differently from transformers."""
    full, _ = rope(config)
    kind = full.get("rope_type", "default")
    if kind not in ("default", "linear", "yarn"):
        raise ValueError(f"to_gguf writes default, linear and YaRN rotary embeddings; this "
                         f"model uses {kind!r} (pass source= a GGUF of it)")


def write_hf_metadata(writer, model, entry: GGUFArch, tokenizer, file_type: str | None,
                      pre: str) -> None:
    """The hyper-parameters llama.cpp reads for `entry`'s architecture, from `model.config`;
    the vocabulary from `tokenizer` (a transformers tokenizer or the directory of its files)."""
    c = model.config.get_text_config(decoder=True)
    check_config(c)
    heads = c.num_attention_heads
    writer.add_name(getattr(c, "_name_or_path", "") or type(model).__name__)
    writer.add_context_length(_first(c, "max_position_embeddings", "n_positions"))
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(_first(c, "intermediate_size", "n_inner")
                                   or 4 * c.hidden_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or heads)
    if getattr(c, "head_dim", None):
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    _rope_keys(writer, c)
    _norm_eps(writer, c)
    writer.add_vocab_size(c.vocab_size)
    _expert_counts(writer, c)
    entry.keys(writer, c)
    if file_type is not None:
        writer.add_file_type(file_type_value(file_type))
    writer.add_quantization_version(2)  # the block layouts of llama.cpp today (GGML_QNT_VERSION)
    _write_vocab(writer, tokenizer, c.vocab_size, pre)


def _first(c, *names):
    return next((getattr(c, n) for n in names if getattr(c, n, None) is not None), None)


def _rope_keys(writer, c) -> None:
    full, sliding = rope(c)
    if not full:  # learned positions (GPT-2)
        return
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    fraction = full.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(int(head_dim * (fraction or 1.0)))
    writer.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    if sliding is not None and sliding.get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(_scaling("LINEAR"))
        writer.add_rope_scaling_factor(full["factor"])
    elif full.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(_scaling("YARN"))
        writer.add_rope_scaling_factor(full["factor"])
        writer.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
        if full.get("beta_fast") is not None:
            writer.add_rope_scaling_yarn_beta_fast(full["beta_fast"])
        if full.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(full["beta_slow"])


def _scaling(name: str):
    import gguf
    return getattr(gguf.RopeScalingType, name)


def _norm_eps(writer, c) -> None:
    if getattr(c, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    elif _first(c, "layer_norm_epsilon", "layer_norm_eps") is not None:
        writer.add_layer_norm_eps(_first(c, "layer_norm_epsilon", "layer_norm_eps"))


def _expert_counts(writer, c) -> None:
    experts = _first(c, "num_local_experts", "num_experts", "n_routed_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(c.num_experts_per_tok)


def check_tokenizer(tokenizer) -> None:
    """Refuse, before any work, a tokenizer the `gguf` package's vocab readers cannot read."""
    import gguf.vocab as gv
    with tempfile.TemporaryDirectory() as d:
        path = Path(tokenizer) if isinstance(tokenizer, (str, Path)) else Path(d)
        if not isinstance(tokenizer, (str, Path)):
            tokenizer.save_pretrained(d)
        _vocab(path, gv)


def _write_vocab(writer, tokenizer, n_vocab: int, pre: str) -> None:
    import gguf.vocab as gv
    with tempfile.TemporaryDirectory() as d:
        path = Path(tokenizer) if isinstance(tokenizer, (str, Path)) else Path(d)
        if not isinstance(tokenizer, (str, Path)):
            tokenizer.save_pretrained(d)
        vocab = _vocab(path, gv)
        tokens, scores, types = zip(*vocab.all_tokens())
        tokens, scores, types = _pad(list(tokens), list(scores), list(types), n_vocab)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gv.SpecialVocab(path, load_merges=vocab.tokenizer_model == "gpt2",
                                  n_vocab=len(tokens))
        special.add_to_gguf(writer, quiet=True)


def _vocab(path: Path, gv):
    for make in (gv.BpeVocab, gv.LlamaHfVocab, gv.SentencePieceVocab):
        try:
            return make(path)
        except (FileNotFoundError, TypeError, ValueError, ImportError, RuntimeError):
            continue
    raise ValueError(f"the tokenizer in {path} is neither a byte-level BPE nor a SentencePiece "
                     f"tokenizer the gguf package reads; pass source= the model's GGUF file")


def _pad(tokens, scores, types, n_vocab: int):
    """llama.cpp wants one token per embedding row: rows beyond the tokenizer get padding."""
    import gguf
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types
