"""llama.cpp's block types as discq grids, checked against the `gguf` package's reference code:
the byte layout decodes as theirs bit for bit, round to nearest picks each weight's nearest
point of its group's grid, our legacy quantizers are as accurate as theirs, and GPTQ and
DiscQuant target the same grids (mixtures resolved per layer as llama.cpp does)."""
import gguf
import numpy as np
import pytest
import torch
from discq.passes import gguf_mixture as mix
from discq.tensors import gguf_codebook as books
from discq.tensors import gguf_codebook_fit as book_fit
from discq.tensors import gguf_layout as layout
from discq.tensors.gguf import GGUFGrid, GGUFQuantizedTensor
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_random_llama
from transformers import LlamaConfig, LlamaForCausalLM

import discq

TYPES = sorted(layout.TYPES)
SCALAR = sorted(set(TYPES) - set(layout.VECTOR_TYPES))  # a code per weight


def random_blocks(t: layout.BlockType, n: int, seed: int) -> np.ndarray:
    """Random bytes with finite fp16 factors in the header's d/dmin/m fields."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, t.nbytes), dtype=np.uint8)
    at = 0
    for name, size in t.fields:
        if name in ("d", "dmin", "m", "blocks"):  # a codebook type's block starts with d
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
    if t.vector:
        c = books.TYPES[name]
        back = books.join(books.split(torch.from_numpy(raw), c), c)
    else:
        back = layout.join(layout.header(torch.from_numpy(raw), t),
                           layout.codes(torch.from_numpy(raw), t), t)
    assert np.array_equal(back.numpy(), raw)  # split and join are inverse
    assert t.nbytes == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][1]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(SCALAR), st.integers(1, 5), st.integers(0, 10**6),
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
    codes = q.codes().long()
    err = (a * layout.values(codes, t) + b - W).abs()
    for step in (-1, 1):  # levels ascend, so the nearest is nearer than either neighbour
        other = layout.values((codes + step).clamp(0, t.qmax), t)
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
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "IQ4_NL", "IQ4_XS"):
        grid = GGUFGrid(name)
        codes, _, _, headers = gptq_quantize(W, H, grid, scale_dtype=torch.float32)
        gptq = grid.pack(codes, headers, W.dtype)
        assert isinstance(gptq, GGUFQuantizedTensor) and gptq.ggml_type == name
        assert proxy(gptq.dequantize()) < 0.8 * proxy(grid.quantize(W).dequantize()), name


def smollm2_shaped_types(mixture: str, imatrix: bool = False) -> dict[str, int]:
    """How many of SmolLM2-135M's linears (30 layers, 576 wide, 1536 ffn) get each type."""
    counts: dict[str, int] = {}
    for i in range(30):
        for name, row in [("q_proj", 576), ("k_proj", 576), ("v_proj", 576), ("o_proj", 576),
                          ("gate_proj", 576), ("up_proj", 576), ("down_proj", 1536)]:
            t = mix.tensor_type(mixture, f"model.layers.{i}.x.{name}", row, 30, n_gqa=3,
                                imatrix=imatrix)
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
    # IQ4_XS: 576-wide rows fall back to IQ4_NL; without an importance matrix the first
    # eighth of ffn_down gets Q5_K, with one (discq's data-driven methods) it stays IQ4_XS
    assert smollm2_shaped_types("IQ4_XS") == {"IQ4_NL": 180, "Q5_K": 3, "IQ4_XS": 27, "Q8_0": 1}
    assert smollm2_shaped_types("IQ4_XS", imatrix=True) == {"IQ4_NL": 180, "IQ4_XS": 30,
                                                            "Q8_0": 1}
    assert smollm2_shaped_types("IQ4_NL") == {"IQ4_NL": 207, "Q5_K": 3, "Q8_0": 1}
    # IQ2_XS: only ffn_down's 1536-wide rows hold IQ2_XS blocks (llama.cpp wrote the same
    # counts for SmolLM2-135M with an importance matrix)
    assert smollm2_shaped_types("IQ2_XS", imatrix=True) == {
        "IQ4_NL": 150, "Q4_0": 30, "Q2_K": 3, "IQ2_XS": 27, "Q8_0": 1}
    # llama-quantize --imatrix wrote these for SmolLM2-135M (llama-cpp-python 0.3.36's
    # llama.cpp); its "IQ2_S" mixture is IQ2_XS blocks, "IQ2_M" IQ2_S blocks
    llama_cpp_wrote = {
        "IQ2_XXS": {"IQ4_NL": 150, "Q4_0": 30, "Q2_K": 3, "IQ2_XXS": 27, "Q8_0": 1},
        "IQ2_S": {"IQ4_NL": 180, "IQ3_S": 3, "IQ2_XS": 27, "Q8_0": 1},
        "IQ2_M": {"IQ4_NL": 180, "IQ3_S": 3, "IQ2_S": 27, "Q8_0": 1},
        "IQ3_XXS": {"IQ4_NL": 180, "IQ3_XXS": 30, "Q8_0": 1},
        "IQ3_XS": {"IQ4_NL": 180, "IQ3_S": 30, "Q8_0": 1},
        "IQ3_M": {"IQ4_NL": 120, "Q5_0": 60, "Q4_K": 3, "IQ3_S": 27, "Q8_0": 1},
        "IQ4_XS": {"IQ4_NL": 180, "IQ4_XS": 30, "Q8_0": 1},
        "IQ4_NL": {"IQ4_NL": 210, "Q8_0": 1}}
    for mixture, types in llama_cpp_wrote.items():
        assert smollm2_shaped_types(mixture, imatrix=True) == types, mixture
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
@pytest.mark.parametrize("mixture", ["Q4_K_M", "IQ4_XS"])
def test_every_method_rounds_onto_the_mixtures_types(method, mixture, tmp_path):
    model = tiny_llama_256()
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    config = {"rtn": lambda: discq.rtn_config(gguf=mixture),
              "gptq": lambda: discq.gptq_config(gguf=mixture, calibration=[ids]),
              "disc": lambda: discq.disc_config(gguf=mixture, calibration=[ids], steps=4,
                                                batch_size=2, warmup=1)}[method]()
    discq.quantize_(model, config, filter_fn=lambda m, fqn: fqn != "lm_head")
    n, n_gqa, _ = mix.model_shape(model)
    for fqn, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and fqn != "lm_head":
            assert isinstance(m.weight, GGUFQuantizedTensor)
            assert m.weight.ggml_type == mix.tensor_type(
                mixture, fqn, 256 if "down" not in fqn else 512, n, n_gqa,
                imatrix=method != "rtn")
            assert m.discq_config["gguf"] == mixture
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


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["Q4_0", "IQ4_NL", "IQ4_XS"]), st.integers(0, 10**6))
def test_bracket_holds_each_point_between_its_neighbours(name, seed):
    # DiscQuant's relaxation: t lies between the values of its two candidate codes, at the
    # fraction y of the way; the nearest code is one of the two
    grid = GGUFGrid(name)
    t = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 80
    t = t if grid.levels is not None else t / 8 + 8
    down, up, y = grid.bracket(t)
    lv = grid.levels if grid.levels is not None else torch.arange(16.0)
    lo, hi = lv[down.long()], lv[up.long()]
    inside = (t >= lv[0]) & (t <= lv[-1])
    assert ((up.long() - down.long()) <= 1).all() and (up >= down).all()
    assert ((lo <= t + 1e-5) & (t <= hi + 1e-5))[inside].all()
    assert torch.allclose((lo + y * (hi - lo))[inside], t[inside], atol=1e-4)
    assert ((y >= 0) & (y <= 1)).all() and (y[up == down] == 0).all()
    q = grid.nearest(t)
    assert ((q == down) | (q == up)).all()


@pytest.mark.parametrize("name", ["IQ4_XS", "IQ2_XS", "IQ3_XXS"])
def test_discquant_on_the_i_quants_beats_round_to_nearest(name):
    # IQ4_XS: DiscQuant relaxes between neighbouring levels of the non-linear table; the
    # codebook types: each 8 weights between their nearest codes and the runner-up
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    ref = tiny_llama_256()
    logp = ref(ids).logits.log_softmax(-1).detach()

    def kl(model):
        out = model(ids).logits.log_softmax(-1)
        return float(torch.nn.functional.kl_div(out, logp, log_target=True, reduction="batchmean"))
    rtn, disc = tiny_llama_256(), tiny_llama_256()
    discq.quantize_(rtn, discq.rtn_config(gguf=name))
    discq.quantize_(disc, discq.disc_config(gguf=name, calibration=[ids], steps=30,
                                            batch_size=4, warmup=2, init="rtn"))
    assert disc.model.layers[1].mlp.down_proj.weight.ggml_type == name
    assert kl(disc) < 0.9 * kl(rtn)  # measured 0.86 (IQ4_XS), 0.72, 0.80 of RTN's


BOOKS = sorted(books.TYPES)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(BOOKS), st.integers(0, 10**6), st.sampled_from([0.3, 1.0, 3.0]))
def test_codeword_search_is_exact_where_the_signs_allow_it(name, seed, spread):
    # 8 weights whose signs the type can store (any, or an even number of negatives with
    # parity): no pair of codewords with those signs is closer than the one chosen; with odd
    # parity only the smallest weight's sign is off
    c = books.TYPES[name]
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(seed)) * spread * 20
    idx, sign, v = book_fit.nearest(x, c)
    assert torch.equal(books.signed_vectors(idx.reshape(1, -1), sign.reshape(1, -1), c)
                       .view(-1, 8), v)  # the codes decode to the values returned
    ok = ((x < 0).sum(-1) % 2 == 0) | (not c.parity)
    G = books.grid(c)  # [E, vec]: each vector of the 8 is searched on its own
    t = (x.abs() * 1).view(-1, c.vec)
    best = ((G[None] - t[:, None]).pow(2).sum(-1).amin(-1)).view(200, -1).sum(-1)
    err = (v - x).pow(2).sum(-1)
    assert (err[ok] <= best[ok] * (1 + 1e-5) + 1e-4).all()
    if c.parity:
        assert ((v < 0).sum(-1) % 2 == 0).all()  # an even count of negatives
    wrong = (torch.sign(v) != torch.sign(x)) & (x != 0)
    assert (wrong.sum(-1) <= (~ok).int()).all()


@pytest.mark.parametrize("name", BOOKS)
def test_codebook_types_round_read_back_in_gguf_and_gptq_beats_rtn(name):
    from discq.passes.gptq_core import gptq_quantize
    g = torch.Generator().manual_seed(4)
    W = torch.randn(32, 512, generator=g)
    X = torch.randn(2048, 512, generator=g) @ torch.randn(512, 512, generator=g) * 0.1
    H = X.t() @ X / len(X)
    grid = GGUFGrid(name)
    rtn = grid.quantize(W)
    theirs = gguf.quants.dequantize(rtn.qdata.numpy(), gguf.GGMLQuantizationType[name])
    assert np.array_equal(theirs, rtn.dequantize().numpy())
    # measured: 0.33, 0.29, 0.24, 0.18, 0.13 (IQ2_XXS … IQ3_S) on Gaussian weights
    bound = {"IQ2_XXS": 0.35, "IQ2_XS": 0.3, "IQ2_S": 0.25, "IQ3_XXS": 0.19, "IQ3_S": 0.14}
    assert float((rtn.dequantize() - W).norm() / W.norm()) < bound[name]
    codes, _, _, headers = gptq_quantize(W, H, grid)
    gptq = grid.pack(codes, headers, W.dtype)
    assert gptq.ggml_type == name and gptq.qdata.shape == rtn.qdata.shape

    def proxy(What):
        D = W - What
        return float(((D @ H) * D).sum())
    assert proxy(gptq.dequantize()) < 0.85 * proxy(rtn.dequantize())


@pytest.mark.parametrize("mixture", ["IQ2_XXS", "IQ2_M", "IQ3_XXS", "IQ3_M"])
def test_gptq_rounds_onto_the_codebook_mixtures_and_the_file_reads_back(mixture, tmp_path):
    from families import tiny_tokenizer
    model = tiny_llama_256()
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    discq.quantize_(model, discq.gptq_config(gguf=mixture, calibration=[ids]))
    n, n_gqa, tied = mix.model_shape(model)
    path = discq.export.to_gguf(model, tmp_path / "m.gguf", tokenizer=tiny_tokenizer(300),
                                pre="gpt-2")
    reader = gguf.GGUFReader(str(path))
    assert int(reader.fields["general.file_type"].contents()) == \
        int(gguf.LlamaFileType[f"MOSTLY_{mixture}"])
    tensors = {t.name: t for t in reader.tensors}
    w = model.model.layers[1].mlp.down_proj.weight
    assert w.ggml_type == mix.tensor_type(mixture, "model.layers.1.mlp.down_proj", 512, n,
                                          n_gqa, tied, imatrix=True)
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type.name == w.ggml_type
    assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), w.dequantize().numpy())


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(BOOKS), st.integers(0, 10**6))
def test_the_runner_up_is_the_next_nearest_code_with_the_same_signs(name, seed):
    c = books.TYPES[name]
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(seed)) * 20
    _, sign, v = book_fit.nearest(x, c)
    idx2, sign2, v2 = book_fit.runner_up(x, c)
    assert torch.equal(sign, sign2)  # the same signs, a different codeword
    assert ((v2 - v).abs().sum(-1) > 0).all()
    assert ((v - x).pow(2).sum(-1) <= (v2 - x).pow(2).sum(-1) + 1e-4).all()
    assert torch.equal(books.signed_vectors(idx2.reshape(1, -1), sign2.reshape(1, -1), c)
                       .view(-1, 8), v2)
