"""discq.generate: the compiled token step equals transformers' generate, and its options."""
import copy
import warnings

import pytest
import torch
from models import tiny_quantized_llama, tiny_random_llama
from transformers import AutoModelForCausalLM

import discq
from discq.decode import Sampling, pick
from discq.inference import PlainLinear, plain_linears


def hf_greedy(model, ids, n):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones_like(ids))


@pytest.fixture(scope="module")
def quantized_llama():
    return tiny_quantized_llama(seed=3)


def test_greedy_equals_transformers_generate(quantized_llama):
    """Quantized model, prompts of two lengths through one dynamic prefill program, the token
    step in Inductor's C++ wrapper (the default)."""
    for S in (7, 12):
        ids = torch.randint(0, 320, (1, S), generator=torch.Generator().manual_seed(S))
        out = discq.generate(quantized_llama, ids, 9, eos_token_id=None)
        assert torch.equal(out, hf_greedy(quantized_llama, ids, 9))
    assert quantized_llama._discq_decoder.step._direct is not None  # Dynamo skipped (graph_call)
    assert quantized_llama._discq_decoder.cpp_wrapper is True  # the affine grid's default
    # a copy of the model does not carry programs that read the original's tensors
    assert copy.deepcopy(quantized_llama).__dict__.get("_discq_decoder") is None


def test_decoder_is_reused_and_rebuilt_when_weights_change():
    model = tiny_random_llama(seed=4)
    ids = torch.randint(0, 320, (2, 5))
    discq.generate(model, ids, 4, eos_token_id=None, cpp_wrapper=False)
    decoder = model._discq_decoder
    discq.generate(model, ids[:, :3], 4, eos_token_id=None, cpp_wrapper=False)
    assert model._discq_decoder is decoder  # shorter prompt, same programs
    discq.quantize_(model, discq.rtn_config(2, 32))  # new weights: the old view would be stale
    b = discq.generate(model, ids, 4, eos_token_id=None, cpp_wrapper=False)
    view = model._discq_decoder.model
    assert view.model.layers[1].mlp.down_proj.qdata is model.model.layers[1].mlp.down_proj.weight.qdata
    fused = view.model.layers[1].mlp.up_proj.group.fused  # gate and up stacked from the new weights
    up = model.model.layers[1].mlp.up_proj.weight.qdata
    assert torch.equal(fused.qdata[-up.shape[0]:], up)
    assert torch.equal(b, hf_greedy(model, ids, 4))


def test_stops_at_end_token_and_pads_ended_rows():
    model = tiny_random_llama(seed=5)
    ids = torch.randint(0, 320, (1, 6))
    full = discq.generate(model, ids, 8, eos_token_id=None, cpp_wrapper=False)
    eos = int(full[0, 6 + 3])  # the 4th new token
    first = int((full[0, 6:] == eos).nonzero()[0])
    out = discq.generate(model, ids, 8, eos_token_id=eos, cpp_wrapper=False)
    assert torch.equal(out, full[:, :6 + first + 1])


def test_sampling_is_repeatable_and_top1_is_greedy():
    model = tiny_random_llama(seed=6)
    ids = torch.randint(0, 320, (1, 5))
    kw = dict(eos_token_id=None, cpp_wrapper=False)
    a = discq.generate(model, ids, 6, temperature=1.5, seed=0, **kw)
    assert torch.equal(a, discq.generate(model, ids, 6, temperature=1.5, seed=0, **kw))
    assert not torch.equal(a, discq.generate(model, ids, 6, temperature=1.5, seed=1, **kw))
    greedy = discq.generate(model, ids, 6, **kw)
    assert torch.equal(discq.generate(model, ids, 6, temperature=2.0, top_k=1, seed=0, **kw),
                       greedy)


def test_pick_samples_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20000, 4, generator=g)
    picks = pick(logits.expand(20000, 4), Sampling(1.0), u)[:, 0]
    freq = torch.bincount(picks, minlength=4).float() / 20000
    assert torch.allclose(freq, logits.softmax(-1)[0], atol=0.015)
    top2 = pick(logits.expand(20000, 4), Sampling(1.0, top_k=2), u)[:, 0]
    assert set(top2.tolist()) == {1, 2}


@pytest.mark.parametrize("kw, err", [
    (dict(max_new_tokens=0), ValueError), (dict(temperature=-1.0), ValueError),
    (dict(top_k=0), ValueError), (dict(max_cache_len=8), ValueError)])
def test_bad_arguments(kw, err):
    model = tiny_random_llama()
    args = dict(max_new_tokens=4) | kw
    with pytest.raises(err):
        discq.generate(model, torch.zeros(1, 6, dtype=torch.long), **args)
    with pytest.raises(TypeError, match="LongTensor"):
        discq.generate(model, torch.zeros(1, 6), 4)


def test_falls_back_to_transformers_generate_and_says_so(monkeypatch):
    model = tiny_random_llama(seed=7)
    monkeypatch.setattr(type(model), "_can_compile_fullgraph", False)
    ids = torch.randint(0, 320, (1, 5))
    with pytest.warns(UserWarning, match="transformers' generate"):
        out = discq.generate(model, ids, 5, eos_token_id=None)
    assert torch.equal(out, hf_greedy(model, ids, 5))


def test_plain_view_shares_weights_and_computes_the_same(quantized_llama):
    view = plain_linears(quantized_llama)
    q_proj = view.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, PlainLinear)
    assert q_proj.qdata is quantized_llama.model.layers[0].self_attn.q_proj.weight.qdata
    assert view.model.norm.weight is quantized_llama.model.norm.weight
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        assert torch.equal(view(ids).logits, quantized_llama(ids).logits)


def test_quantized_head_stays_tied_to_the_embedding(tmp_path):
    model = tiny_random_llama(seed=8)
    ref = copy.deepcopy(model)
    discq.quantize_head_(model, 8)
    W = model.lm_head.weight
    assert isinstance(W, discq.AffineQuantizedTensor) and model.model.embed_tokens.weight is W
    ids = torch.randint(0, 320, (2, 7))
    with torch.no_grad():
        emb = model.model.embed_tokens(ids)
        assert torch.equal(emb, W.dequantize()[ids])  # rows decoded alone = the table's rows
        ref.model.embed_tokens.weight.data = W.dequantize()  # tied: the head too
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)
        model.save_pretrained(tmp_path)
        back = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert back.model.embed_tokens.weight is back.lm_head.weight
        assert torch.equal(back(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="max_norm"):
        torch.nn.functional.embedding(ids, W, max_norm=1.0)


def test_quantize_head_needs_a_linear_head():
    with pytest.raises(ValueError, match="output head"):
        discq.quantize_head_(torch.nn.Sequential(torch.nn.Linear(4, 4)), 8)
    model = tiny_random_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        discq.quantize_head_(model, 4)  # selects the head: no "nothing was quantized" warning
    with pytest.raises(ValueError, match="quantized already"):
        discq.quantize_head_(model, 8)


def test_int8_activations_decode_the_model_that_eval_scores(quantized_llama):
    """generate(int8_activations=True) decodes greedily exactly what the 8-bit-activation view
    (the one `discq eval --int8-activations` scores) predicts at every position."""
    ids = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(1))
    out = discq.generate(quantized_llama, ids, 8, eos_token_id=None, cpp_wrapper=False,
                         int8_activations=True)
    view = plain_linears(quantized_llama, int8_activations=True)
    assert any(m.op is torch.ops.discq.affine_linear_q8.default
               for m in view.modules() if isinstance(m, PlainLinear))
    with torch.no_grad():
        logits = view(out[:, :-1]).logits[0, 5:]  # the prediction after each decoded prefix
    assert torch.equal(logits.argmax(-1), out[0, 6:])
    assert quantized_llama._discq_decoder.int8_activations
    float_out = discq.generate(quantized_llama, ids, 8, eos_token_id=None, cpp_wrapper=False)
    assert not quantized_llama._discq_decoder.int8_activations  # rebuilt, not reused
    assert torch.equal(float_out, hf_greedy(quantized_llama, ids, 8))


def test_the_default_cache_is_the_next_power_of_two():
    model = tiny_random_llama(seed=9)
    ids = torch.randint(0, 320, (1, 5))
    discq.generate(model, ids, 4, eos_token_id=None, cpp_wrapper=False)
    assert model._discq_decoder.max_cache_len == 64  # at least 64
    discq.generate(model, ids, 70, eos_token_id=None, cpp_wrapper=False)
    assert model._discq_decoder.max_cache_len == 128  # 75 positions


def _rotated_formats(fmt: str):
    """tiny_random_llama with every decoder linear in QTIP's 2-bit HYB format or QuIP#'s 2-bit
    E8P (coded without data, 10-bit trellis for speed), and the model with the same weights
    dequantized into plain nn.Linear."""
    from discq.tensors.lattice import LatticeQuantizedTensor
    from discq.tensors.qtip import TrellisQuantizedTensor
    model = tiny_random_llama(seed=11)
    plain = copy.deepcopy(model)
    for (name, m), (_, p) in zip(model.named_modules(), plain.named_modules()):
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            w = (TrellisQuantizedTensor.from_hp(m.weight, 2, "hyb", state_bits=10)
                 if fmt == "qtip" else LatticeQuantizedTensor.from_hp(m.weight, 2))
            m.weight = torch.nn.Parameter(w, requires_grad=False)
            p.weight = torch.nn.Parameter(w.dequantize(), requires_grad=False)
    return model, plain


@pytest.mark.parametrize("fmt", ["qtip", "quip"])
def test_rotated_formats_run_their_cpu_op_in_the_view_and_in_generate(fmt):
    """QTIP's and QuIP#'s inference views call the whole C++ linear (`inference_call`): for one
    row (registers) and 18 rows (decoded weight, one GEMM) the logits are the dequantized
    model's, and discq.generate's compiled program greedy-decodes what transformers does."""
    model, plain = _rotated_formats(fmt)
    view = plain_linears(model)
    op = {"qtip": torch.ops.discq.qtip_linear_cpu.default,
          "quip": torch.ops.discq.e8p_linear_cpu.default}[fmt]
    assert view.model.layers[0].mlp.down_proj.op is op
    with torch.no_grad():
        for ids in (torch.randint(0, 320, (1, 1)), torch.randint(0, 320, (2, 9))):
            torch.testing.assert_close(view(ids).logits, plain(ids).logits, atol=2e-4,
                                       rtol=1e-4)
    ids = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(discq.generate(model, ids, 5, eos_token_id=None), hf_greedy(model, ids, 5))
    # these formats' steps are compiled without the C++ wrapper unless asked (its compile time)
    assert model._discq_decoder.cpp_wrapper is False
