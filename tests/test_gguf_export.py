"""GGUF export, checked with the real readers: the `gguf` package's reference dequantizers read
discq's Q4_0/Q8_0 blocks back bit for bit, and (slow, SmolLM2) the exported file loads in
transformers' GGUF loader with discq's weights and logits."""
import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import discq
from discq.gguf_blocks import block_type, to_blocks
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.grid import AffineGrid


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
    with pytest.raises(ValueError, match="symmetric=True"):
        to_blocks(w)


def test_to_gguf_refuses_other_architectures_and_missing_sources(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="Llama-family"):
        discq.export.to_gguf(nn.Sequential(nn.Linear(4, 4)), tmp_path / "x.gguf",
                             source=tmp_path / "none.gguf")
    with pytest.raises(ValueError, match="source"):
        discq.export.to_gguf(tiny_llama[0], tmp_path / "x.gguf", source=tmp_path / "none.gguf")


@pytest.mark.slow
def test_smollm2_q4_0_gguf_reads_back_in_gguf_and_transformers(tmp_path):
    from discq.models import bundled_path, load_model
    from discq.pipeline import keep_head_filter
    from transformers import AutoModelForCausalLM
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
    # transformers undoes llama.cpp's q/k row order on load: the same model comes back
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q4_0.gguf")
    q_proj = model.model.layers[0].self_attn.q_proj.weight.dequantize()
    assert torch.equal(back.model.layers[0].self_attn.q_proj.weight, q_proj)
    for name, p in model.named_parameters():  # every tensor, quantized or not, is discq's
        theirs = back.get_parameter(name)
        ours = p.dequantize() if isinstance(p, discq.QuantizedTensor) else p
        assert torch.equal(theirs, ours), name
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():  # dense matmuls there, discq's kernel here: summation order only
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-3, rtol=1e-4)
