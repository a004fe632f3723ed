"""Mixed widths: `quantize_(model, budget=discq.bits(b), candidates=[...])` (passes/mixed.py) on
tiny models of the families: the budget holds, the choice follows the predicted KL, expert
stacks keep one format, the plan reaches the manifest and GGUF's per-tensor types."""
import gguf
import pytest
import torch
from discq.eval import compare
from discq.passes.quantize import plan_of
from discq.tensors.experts import ExpertsQuantizedTensor
from families import calibration, tiny_family, tiny_tokenizer

import discq

IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(5))


def gptq(bits: int, **kw):
    return discq.gptq_config(bits=bits, group_size=32, calibration=calibration(),
                             hessian="kl", **kw)


def kl(model, reference) -> float:
    return compare(reference, model, [IDS], progress=False)["kl"]


def quantized_bits(model) -> float:
    return discq.bits_per_weight(model)


def test_the_budget_holds_and_buys_lower_kl_than_the_narrower_width():
    ref = tiny_family("llama")
    two, three = tiny_family("llama"), tiny_family("llama")
    discq.quantize_(two, gptq(2))
    discq.quantize_(three, gptq(3))
    b2, b3 = quantized_bits(two), quantized_bits(three)
    mixed = tiny_family("llama")
    discq.quantize_(mixed, budget=discq.bits((b2 + b3) / 2), candidates=[gptq(2), gptq(3)])
    plan = plan_of(mixed)
    assert quantized_bits(mixed) <= (b2 + b3) / 2 + 1e-9
    assert plan.bits_per_weight == pytest.approx(quantized_bits(mixed))
    assert set(plan.layers.values()) == {"gptq 2-bit g32 kl", "gptq 3-bit g32 kl"}
    assert plan.uniform["gptq 2-bit g32 kl"][1] > plan.predicted_kl > \
        plan.uniform["gptq 3-bit g32 kl"][1]
    assert kl(two, ref) > kl(mixed, ref) > kl(three, ref)
    # each matrix holds what its own candidate rounds (the same as the uniform runs: KL
    # Hessians make the layers independent of each other)
    for fqn, lab in plan.layers.items():
        twin = (two if lab.startswith("gptq 2") else three).get_submodule(fqn)
        torch.testing.assert_close(mixed.get_submodule(fqn).weight.dequantize(),
                                   twin.weight.dequantize())


@pytest.mark.parametrize("family", ["qwen3", "gpt2", "gemma3"])
def test_a_generous_budget_gives_every_matrix_the_widest_and_one_kl_pass(monkeypatch, family):
    from discq.passes import kl_hessian
    calls = []
    collect = kl_hessian.collect
    monkeypatch.setattr(kl_hessian, "collect", lambda *a, **k: calls.append(1) or collect(*a, **k))
    model = tiny_family(family)
    discq.quantize_(model, budget=discq.bits(8.0), candidates=[gptq(2), gptq(4)])
    assert set(plan_of(model).layers.values()) == {"gptq 4-bit g32 kl"}
    assert len(calls) == 1  # every candidate rounded with the budget's own factors


def test_expert_stacks_keep_one_format():
    model = tiny_family("mixtral")
    discq.quantize_(model, budget=discq.bits(3.2), candidates=[gptq(2), gptq(3), gptq(4)])
    plan = plan_of(model)
    stacks = [n for n in plan.layers if n.endswith(("gate_up_proj", "down_proj"))
              and "experts" in n]
    assert stacks
    for name in stacks:
        module_name, _, param = name.rpartition(".")
        W = getattr(model.get_submodule(module_name), param)
        assert isinstance(W, ExpertsQuantizedTensor)
        assert {W.expert(e).bits for e in range(W.shape[0])} == {int(plan.layers[name][5])}


def test_a_candidate_that_cannot_hold_a_matrix_leaves_it_to_the_others():
    model = tiny_family("llama")  # rows of 64 and 128: Q4_K's 256-blocks fit none
    discq.quantize_(model, budget=discq.bits(8.5), candidates=[
        gptq(4, gguf="Q4_K"), gptq(4, gguf="Q8_0")])
    assert set(plan_of(model).layers.values()) == {"gptq Q8_0 kl"}
    with pytest.raises(ValueError, match="no candidate can quantize"):
        discq.quantize_(tiny_family("llama"), budget=discq.bits(8.5),
                        candidates=[gptq(4, gguf="Q4_K")])


def test_gguf_writes_each_tensor_in_the_type_it_got(tmp_path):
    model = tiny_family("llama")
    head = model.get_output_embeddings()
    discq.quantize_(model, budget=discq.bits(6.5), candidates=[
        gptq(4, gguf="Q4_0"), gptq(4, gguf="Q8_0")], filter_fn=lambda m, f: m is not head)
    plan = plan_of(model)
    assert set(plan.layers.values()) == {"gptq Q4_0 kl", "gptq Q8_0 kl"}
    path = discq.export.to_gguf(model, tmp_path / "m.gguf", tokenizer=tiny_tokenizer(),
                                pre="gpt-2")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for fqn, lab in plan.layers.items():
        assert types[names.get_name(fqn + ".weight", try_suffixes=(".weight",))] == lab[5:9]


def test_the_plan_is_in_the_manifest_and_reloads(tmp_path):
    import json

    from discq.io import load_quantized
    model = tiny_family("llama")
    discq.quantize_(model, budget=discq.bits(3.5), candidates=[gptq(2), gptq(4)])
    out = discq.save_quantized(model, tmp_path / "q")
    found = [json.loads(p.read_text()) for p in out.glob("*.json")]
    plans = [m["bit_plan"] for m in found if isinstance(m, dict) and "bit_plan" in m]
    assert plans and plans[0]["layers"] == plan_of(model).layers
    back = load_quantized(out)
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(config=discq.rtn_config(bits=3), budget=discq.bits(3.0), candidates=[]), TypeError,
     "not both"),
    (dict(budget=2.5, candidates=[None]), TypeError, "discq.bits"),
    (dict(budget=discq.bits(3.0), candidates=[]), TypeError, "non-empty list"),
    (dict(budget=discq.bits(3.0), candidates=["gptq"]), TypeError, r"candidates\[0\]"),
    (dict(budget=discq.bits(3.0), candidates=[discq.rtn_config(bits=2),
                                              discq.rtn_config(bits=3)]),
     ValueError, "calibration"),
    (dict(budget=discq.bits(3.0), candidates=[discq.rtn_config(bits=2),
                                              discq.rtn_config(bits=2)]),
     ValueError, "must differ"),
    (dict(budget=discq.bits(1.5, calibration=calibration()),
          candidates=[discq.rtn_config(bits=2), discq.rtn_config(bits=3)]),
     ValueError, "below the smallest"),
    (dict(budget=discq.bits(3.0), candidates=[gptq(2, finetune=True), gptq(3)]),
     ValueError, "fine-tune after"),
])
def test_bad_budgets_and_candidates_are_refused_with_the_fix(kwargs, error, match):
    model = tiny_family("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        discq.quantize_(model, **kwargs)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed
    assert plan_of(model) is None
