"""GGUF export, checked with the real readers: the `gguf` package's reference dequantizers read
discq's Q4_0/Q8_0 blocks back bit for bit, and (slow, SmolLM2) the exported file loads in
transformers' GGUF loader with discq's weights and logits."""
import gguf
import numpy as np
import pytest
import torch
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.gguf import GGUFGrid
from discq.tensors.grid import AffineGrid
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import discq
from discq.export.gguf_blocks import block_type, to_blocks


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([4, 8]), st.integers(1, 9), st.integers(1, 5), st.integers(0, 999),
       st.sampled_from([1e-3, 1.0, 30.0]))
def test_blocks_dequantize_in_gguf_to_discqs_values(bits, N, blocks, seed, magnitude):
    W = torch.randn(N, 32 * blocks, generator=torch.Generator().manual_seed(seed)) * magnitude
    w = AffineQuantizedTensor.from_hp(W, AffineGrid(bits, 32, symmetric=True))
    kind = block_type(w)
    assert kind == {4: "Q4_0", 8: "Q8_0"}[bits]
    data = to_blocks(w)
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
    assert theirs.shape == (N, 32 * blocks)
    assert np.array_equal(theirs, w.dequantize().numpy())  # bit for bit
    assert data.nbytes * 8 == w.numel() * (bits + 0.5)  # 4.5 / 8.5 bits per weight


@pytest.mark.parametrize("grid", [AffineGrid(3, 32, True), AffineGrid(4, 32, False),
                                  AffineGrid(4, 64, True), AffineGrid(4, 32, True, "output")])
def test_weights_without_a_block_twin_are_refused_with_the_fix(grid):
    w = AffineQuantizedTensor.from_hp(torch.randn(8, 64), grid)
    assert block_type(w) is None
    with pytest.raises(ValueError, match="gguf='Q4_K_M'"):
        to_blocks(w)


def test_to_gguf_refuses_other_architectures_and_missing_sources(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="families llama.cpp runs"):
        discq.export.to_gguf(nn.Sequential(nn.Linear(4, 4)), tmp_path / "x.gguf",
                             source=tmp_path / "none.gguf")
    with pytest.raises(ValueError, match="source"):
        discq.export.to_gguf(tiny_llama[0], tmp_path / "x.gguf", source=tmp_path / "none.gguf")


@pytest.mark.slow
def test_smollm2_q4_0_gguf_reads_back_in_gguf_and_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from discq.models import bundled_path, load_model
    from discq.pipeline import keep_head_filter
    model, tok = load_model("smollm2-135m")
    discq.quantize_(model, discq.rtn_config(bits=4, group_size=32, symmetric=True),
                    filter_fn=keep_head_filter(model))
    out = discq.export.to_gguf(model, tmp_path / "q4_0.gguf", source=bundled_path("smollm2-135m"))
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    q = tensors["blk.3.ffn_down.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.Q4_0
    ours = model.model.layers[3].mlp.down_proj.weight.dequantize().numpy()
    assert np.array_equal(gguf.quants.dequantize(q.data, q.tensor_type), ours)
    assert "tokenizer.ggml.tokens" in reader.fields and "output.weight" not in tensors
    # the tied embedding as llama.cpp's Q4_0 mixture stores it: Q8_0, rounded to nearest
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.Q8_0
    Q8 = GGUFGrid("Q8_0").quantize(model.model.embed_tokens.weight).dequantize()
    # transformers undoes llama.cpp's q/k row order on load: the same model comes back
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q4_0.gguf")
    q_proj = model.model.layers[0].self_attn.q_proj.weight.dequantize()
    assert torch.equal(back.model.layers[0].self_attn.q_proj.weight, q_proj)
    assert torch.equal(back.model.embed_tokens.weight, Q8)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(Q8)  # (tied: the head too)
    for name, p in model.named_parameters():  # every tensor is the one discq wrote
        theirs = back.get_parameter(name)
        ours = p.dequantize() if isinstance(p, discq.QuantizedTensor) else p
        assert torch.equal(theirs, ours), name
    with pytest.raises(ValueError, match="the mixture gives it"):  # Q4_0 layers, Q4_K_M file
        discq.export.to_gguf(model, tmp_path / "x.gguf", source=bundled_path("smollm2-135m"),
                             type="Q4_K_M")
    assert not (tmp_path / "x.gguf").exists()
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():  # dense matmuls there, discq's kernel here: summation order only
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-3, rtol=1e-4)


def test_to_gguf_writes_metadata_and_vocabulary_from_config_and_tokenizer(tmp_path):
    from models import tiny_random_llama
    model = tiny_random_llama()  # vocab 320, rows of 64: Q4_0 throughout
    from families import tiny_tokenizer
    tok = tiny_tokenizer(300)
    discq.quantize_(model, discq.rtn_config(gguf="Q4_0"), filter_fn=lambda m, f: f != "lm_head")
    out = discq.export.to_gguf(model, tmp_path / "t.gguf", tokenizer=tok, pre="gpt-2")
    reader = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert f["llama.block_count"] == 2 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.embedding_length"] == 64 and f["llama.rope.dimension_count"] == 16
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == 320 and tokens[:len(tok)] == [tok.convert_ids_to_tokens(i)
                                                        for i in range(len(tok))]
    assert f["tokenizer.ggml.merges"] and f["general.file_type"] == 2  # MOSTLY_Q4_0
    with pytest.raises(ValueError, match="not both"):
        discq.export.to_gguf(model, tmp_path / "u.gguf", tokenizer=tok,
                             source=tmp_path / "t.gguf")
    with pytest.raises(ValueError, match="pass source="):
        discq.export.to_gguf(model, tmp_path / "u.gguf")


def test_llama_cpp_helpers_without_the_bindings_say_how_to_install(monkeypatch, tmp_path):
    import sys

    from discq import llamacpp
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as on a machine without it
    with pytest.raises(ImportError, match="pip install llama-cpp-python"):
        llamacpp.quantize(tmp_path / "a.gguf", tmp_path / "b.gguf", "Q4_K_M")
    with pytest.raises(ValueError, match="unknown GGUF mixture"):
        llamacpp.quantize(tmp_path / "a.gguf", tmp_path / "b.gguf", "Q4_K_X")
