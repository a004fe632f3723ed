"""llama.cpp's block types as discq grids, checked against the `gguf` package's reference code:
the byte layout decodes as theirs bit for bit, round to nearest picks each weight's nearest
point of its group's grid, our legacy quantizers are as accurate as theirs, and GPTQ and
DiscQuant target the same grids (mixtures resolved per layer as llama.cpp does)."""
import gguf
import numpy as np
import pytest
import torch
from discq.passes import gguf_mixture as mix
from discq.tensors import gguf_layout as layout
from discq.tensors.gguf import GGUFGrid, GGUFQuantizedTensor
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_random_llama
from transformers import LlamaConfig, LlamaForCausalLM

import discq

TYPES = sorted(layout.TYPES)


def random_blocks(t: layout.BlockType, n: int, seed: int) -> np.ndarray:
    """Random bytes with finite fp16 factors in the header's d/dmin/m fields."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, t.nbytes), dtype=np.uint8)
    at = 0
    for name, size in t.fields:
        if name in ("d", "dmin", "m"):
            raw[:, at:at + 2] = rng.normal(size=(n, 1)).astype(np.float16).view(np.uint8)
        at += size
    return raw


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(TYPES), st.integers(1, 6), st.integers(0, 10**6))
def test_decoding_any_block_equals_the_gguf_reference(name, n, seed):
    t = layout.TYPES[name]
    raw = random_blocks(t, n, seed)
    theirs = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[name])
    ours = layout.dequantize(torch.from_numpy(raw), t).numpy()
    assert np.array_equal(theirs.reshape(n, -1), ours)  # equal values (±0 alike)
    back = layout.join(layout.header(torch.from_numpy(raw), t), layout.codes(torch.from_numpy(raw), t), t)
    assert np.array_equal(back.numpy(), raw)  # split and join are inverse
    assert t.nbytes == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][1]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(TYPES), st.integers(1, 5), st.integers(0, 10**6),
       st.sampled_from([1e-3, 1.0, 50.0]))
def test_round_to_nearest_reads_back_in_gguf_and_picks_the_nearest_point(name, N, seed, mag):
    grid = GGUFGrid(name)
    W = torch.randn(N, 2 * grid.block, generator=torch.Generator().manual_seed(seed)) * mag
    q = grid.quantize(W)
    theirs = gguf.quants.dequantize(q.qdata.numpy(), gguf.GGMLQuantizationType[name])
    assert np.array_equal(theirs, q.dequantize().numpy())
    # each code is its group's nearest level: neither neighbouring level is closer
    t = layout.TYPES[name]
    a, b = layout.affine(layout.header(q.qdata.view(-1, t.nbytes), t), t)
    a, b = (v.reshape(N, -1).repeat_interleave(t.group, 1) for v in (a, b))
    codes = q.codes().float()
    err = (a * codes + b - W).abs()
    for step in (-1, 1):
        other = (codes + step).clamp(0, t.qmax)
        assert (err <= (a * other + b - W).abs() * (1 + 1e-5) + 1e-6 * mag).all()
    assert (a != 0).all()  # no zero step: (w - b) / a is always defined


@pytest.mark.parametrize("name", TYPES)
def test_zero_and_constant_rows_stay_finite_and_close(name):
    W = torch.zeros(3, 256)
    W[1] = 0.5  # constant: a singular least-squares fit for the scale-and-min types
    W[2, :100] = -1e-6
    What = GGUFGrid(name).quantize(W).dequantize()
    assert torch.isfinite(What).all() and (What - W).abs().max() < 1e-3


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_legacy_types_are_as_accurate_as_the_gguf_reference_quantizer(name):
    W = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    W[:, 7] *= 10  # outlier columns, as in real weights
    kind = gguf.GGMLQuantizationType[name]
    theirs = gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), kind), kind)
    ours = GGUFGrid(name).quantize(W).dequantize().numpy()
    assert np.linalg.norm(ours - W.numpy()) <= np.linalg.norm(theirs - W.numpy()) * 1.001


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q8_0"])
def test_the_signed_extreme_of_every_legacy_block_is_exact(name):
    W = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    What = GGUFGrid(name).quantize(W).dequantize()
    idx = W.view(-1, 32).abs().argmax(-1, keepdim=True)
    extreme = W.view(-1, 32).gather(-1, idx)
    assert torch.allclose(What.view(-1, 32).gather(-1, idx), extreme, rtol=2e-3)


def test_rows_that_are_not_whole_blocks_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="32-weight type"):
        GGUFGrid("Q4_K").quantize(torch.randn(4, 576))
    with pytest.raises(ValueError, match="unknown GGUF block type"):
        GGUFGrid("Q4_X")


def test_gptq_beats_rtn_on_every_k_quant_grid():
    from discq.passes.gptq_core import gptq_quantize
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 512, generator=g)
    X = torch.randn(2048, 512, generator=g) @ torch.randn(512, 512, generator=g) * 0.1
    H = X.t() @ X / len(X)

    def proxy(What):
        D = W - What
        return float(((D @ H) * D).sum())
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0"):
        grid = GGUFGrid(name)
        codes, _, _, headers = gptq_quantize(W, H, grid, scale_dtype=torch.float32)
        gptq = grid.pack(codes, headers, W.dtype)
        assert isinstance(gptq, GGUFQuantizedTensor) and gptq.ggml_type == name
        assert proxy(gptq.dequantize()) < 0.8 * proxy(grid.quantize(W).dequantize()), name


def smollm2_shaped_types(mixture: str) -> dict[str, int]:
    """How many of SmolLM2-135M's linears (30 layers, 576 wide, 1536 ffn) get each type."""
    counts: dict[str, int] = {}
    for i in range(30):
        for name, row in [("q_proj", 576), ("k_proj", 576), ("v_proj", 576), ("o_proj", 576),
                          ("gate_proj", 576), ("up_proj", 576), ("down_proj", 1536)]:
            t = mix.tensor_type(mixture, f"model.layers.{i}.x.{name}", row, 30, n_gqa=3)
            counts[t] = counts.get(t, 0) + 1
    t = mix.tensor_type(mixture, "model.embed_tokens", 576, 30, n_gqa=3, tied=True)
    counts[t] = counts.get(t, 0) + 1
    return counts


def test_mixtures_make_llama_cpps_choices_for_smollm2():
    # what llama.cpp's llama_model_quantize writes for SmolLM2-135M (checked against it in the
    # slow test): 576-wide rows fall back from k-quants, use_more_bits picks 14 of 30 layers
    assert smollm2_shaped_types("Q4_0") == {"Q4_0": 210, "Q8_0": 1}
    assert smollm2_shaped_types("Q4_K_M") == {"Q5_0": 166, "Q8_0": 15, "Q6_K": 14, "Q4_K": 16}
    assert smollm2_shaped_types("Q3_K_M") == {"Q4_0": 120, "Q5_1": 2, "Q5_0": 58, "Q5_K": 1,
                                              "Q4_K": 29, "Q8_0": 1}
    assert smollm2_shaped_types("Q2_K") == {"Q4_0": 180, "Q3_K": 30, "Q8_0": 1}
    assert [mix.use_more_bits(i, 30) for i in range(8)] == [1, 1, 1, 0, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="unknown GGUF mixture"):
        mix.tensor_type("Q4_K_X", "model.layers.0.x.q_proj", 256, 2)


def tiny_llama_256() -> LlamaForCausalLM:
    """A decoder whose rows are whole k-quant super-blocks (hidden 256, ffn 512)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["rtn", "gptq", "disc"])
def test_every_method_rounds_onto_the_mixtures_types(method, tmp_path):
    model = tiny_llama_256()
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    config = {"rtn": lambda: discq.rtn_config(gguf="Q4_K_M"),
              "gptq": lambda: discq.gptq_config(gguf="Q4_K_M", calibration=[ids]),
              "disc": lambda: discq.disc_config(gguf="Q4_K_M", calibration=[ids], steps=4,
                                                batch_size=2, warmup=1)}[method]()
    discq.quantize_(model, config, filter_fn=lambda m, fqn: fqn != "lm_head")
    n, n_gqa, _ = mix.model_shape(model)
    for fqn, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and fqn != "lm_head":
            assert isinstance(m.weight, GGUFQuantizedTensor)
            assert m.weight.ggml_type == mix.tensor_type("Q4_K_M", fqn, 256 if "down" not in fqn
                                                         else 512, n, n_gqa)
            assert m.discq_config["gguf"] == "Q4_K_M"
    discq.save_quantized(model, tmp_path / "q")
    back = discq.load_quantized(tmp_path / "q")
    w = back.model.layers[1].mlp.down_proj.weight
    assert torch.equal(w.qdata, model.model.layers[1].mlp.down_proj.weight.qdata)


def test_gguf_config_is_validated():
    with pytest.raises(ValueError, match="gguf must be"):
        discq.rtn_config(gguf="Q4_K_X")
    with pytest.raises(ValueError, match="input dimension"):
        discq.rtn_config(gguf="Q4_K", group_along="output")
    with pytest.raises(ValueError, match="incoherence"):
        discq.gptq_config(gguf="Q4_K", incoherence=True)
    with pytest.raises(ValueError, match="codebook"):
        discq.disc_config(gguf="Q4_K", codebook="e8p", bits=2)
    # one block type on rows that are not whole blocks: refused naming the layer; a mixture
    # falls back per layer as llama.cpp does (64-wide rows: Q4_K -> Q5_0)
    model = tiny_random_llama()
    with pytest.raises(ValueError, match="q_proj"):
        discq.quantize_(model, discq.rtn_config(gguf="Q4_K"))
    discq.quantize_(model, discq.rtn_config(gguf="Q4_K_S"), filter_fn=lambda m, f: "q_proj" in f)
    assert model.model.layers[0].self_attn.q_proj.weight.ggml_type == "Q5_0"
