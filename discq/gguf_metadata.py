"""The key-values of a GGUF file discq writes: copied from the GGUF the model came from, or
written from the transformers config and tokenizer (Llama-family decoders with a GPT-2-style
byte-level BPE tokenizer, or a SentencePiece/Llama one, read by the `gguf` package's vocab
readers from the tokenizer's files).
"""
from __future__ import annotations

import tempfile
from pathlib import Path


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


def check_config(config) -> None:
    """Refuse what llama.cpp's llama architecture would run differently from transformers."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"to_gguf writes plain rotary embeddings; this model uses "
                         f"{rope.get('rope_type')!r} rope scaling (pass source= a GGUF of it)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("to_gguf writes Llama decoders without biases; this one has them")


def write_hf_metadata(writer, model, tokenizer, file_type: str | None, pre: str) -> None:
    """Architecture hyper-parameters from `model.config`, the vocabulary from `tokenizer` (a
    transformers tokenizer or the directory holding its files)."""
    c = model.config
    check_config(c)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    writer.add_name(getattr(c, "_name_or_path", "") or type(model).__name__)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if file_type is not None:
        writer.add_file_type(file_type_value(file_type))
    writer.add_quantization_version(2)  # the block layouts of llama.cpp today (GGML_QNT_VERSION)
    _write_vocab(writer, tokenizer, c.vocab_size, pre)


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
        except (FileNotFoundError, TypeError, ValueError, ImportError):
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
