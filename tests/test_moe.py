"""Mixture-of-experts layers: the stacked forward against transformers' own implementations,
each expert's Hessian from the tokens routed to it (or from every token), experts that saw few
tokens, configs addressing experts, and a failed run putting every expert back."""
import pytest
import torch
from discq.passes import experts as ex
from discq.passes.capture import shrink_few_tokens
from discq.passes.quantize import coverage_of
from discq.tensors.experts import ExpertsQuantizedTensor
from families import MOE_FAMILIES, calibration, tiny_family
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import discq

IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def dequantized_copy(model, family):
    """The family's model holding the quantized model's values as plain tensors, running
    transformers' own experts code."""
    ref = tiny_family(family)
    ref.load_state_dict({k: v.dequantize() if hasattr(v, "format_name") else v
                         for k, v in model.state_dict().items()})
    return ref


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_stacked_forward_equals_transformers_experts(family):
    model = tiny_family(family)
    discq.quantize_(model, discq.rtn_config(4, 32))
    ref = dequantized_copy(model, family)
    for impl in ("eager", "grouped_mm", "batched_mm"):
        ref.set_experts_implementation(impl)
        assert torch.allclose(logits(model), logits(ref), atol=1e-5), impl


def test_exploded_forward_is_the_layer_and_calibrate_all_changes_no_output():
    model = tiny_family("gpt_oss")  # transposed stacks, biases, interleaved gate/up
    experts = model.model.layers[0].mlp.experts
    h = torch.randn(10, 64)
    index = torch.randint(0, 4, (10, 2))
    weights = torch.rand(10, 2)
    with torch.no_grad():
        want = experts(h, index, weights)
        for every in (False, True):
            ex.explode(experts, ex.stack_names(experts), calibrate_all=every)
            assert torch.allclose(experts(h, index, weights), want, atol=1e-5)
            ex.undo(experts)
    assert type(experts).__name__ == "GptOssExperts" and experts.gate_up_proj.dim() == 3


def routed_inputs(model, layer: int = 0):
    """Per expert of layer `layer`'s MLP, the calibration rows routed to it (fp model)."""
    experts = model.model.layers[layer].mlp.experts
    seen = {e: [] for e in range(experts.num_experts)}

    def grab(module, args):
        h, index = args[0], args[1]
        for e in seen:
            seen[e].append(h[(index == e).any(-1)])

    handle = experts.register_forward_pre_hook(grab)
    with torch.no_grad():
        for b in calibration(n=2, batch=8, length=64):
            model(b)
    handle.remove()
    return {e: torch.cat(v) for e, v in seen.items()}


def record_hessians(monkeypatch):
    """GPTQ's layer function, recording each layer's Hessian."""
    from discq.passes import gptq
    seen, original = {}, gptq.gptq_layer

    def spy(W, H, config, name="", H_out=None):
        seen[name] = H.clone()
        return original(W, H, config, name, H_out)
    monkeypatch.setattr(gptq, "gptq_layer", spy)
    return seen


@pytest.mark.parametrize("every", [False, True])
def test_each_expert_hessian_comes_from_its_routed_tokens(monkeypatch, every):
    model = tiny_family("mixtral")
    x = routed_inputs(model)
    seen = record_hessians(monkeypatch)
    only_experts = {"re:.*experts.*": discq.gptq_config(4, 32, calibration=calibration(
        n=2, batch=8, length=64)), "_default": None}
    discq.quantize_(model, only_experts, calibrate_all_experts=every)
    for e in range(4):
        X = torch.cat(list(x.values())) if every else x[e]
        X = X.unique(dim=0) if every else X  # each token once
        H = seen[f"model.layers.0.mlp.experts.gate_up_proj.{e}"]
        assert X.shape[0] >= 64  # enough tokens: no shrinking
        assert torch.allclose(H, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-6)
    assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, ExpertsQuantizedTensor)


def never_routed(model, expert: int = 3):
    """gpt-oss's routers have biases: one expert is never chosen."""
    for layer in model.model.layers:
        with torch.no_grad():
            layer.mlp.router.bias[expert] = -1e4


def test_an_expert_without_tokens_is_rounded_on_its_layers_pooled_hessian():
    model = never_routed_model = tiny_family("gpt_oss")
    never_routed(never_routed_model)
    config = discq.gptq_config(4, 32, calibration=calibration())
    with pytest.warns(UserWarning, match="fewer calibration tokens"):
        discq.quantize_(model, config)
    few = coverage_of(model).few_tokens
    assert few["model.layers.0.mlp.experts.gate_up_proj[3]"] == 0
    assert "gate_up_proj[3]: 0" in coverage_of(model).describe(names=20)
    W = model.model.layers[0].mlp.experts.gate_up_proj.expert(3).dequantize()
    assert W.abs().sum() > 0  # not the zero weight a Hessian of zeros would give
    # every token through every expert: nobody is short of tokens
    model = tiny_family("gpt_oss")
    never_routed(model)
    discq.quantize_(model, config, calibrate_all_experts=True)
    assert coverage_of(model).few_tokens == {}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=2, max_size=5), st.integers(0, 1000))
def test_few_token_hessians_move_toward_the_pooled_one(counts, seed):
    K = 16
    g = torch.Generator().manual_seed(seed)
    Hs = []
    for n in counts:
        X = torch.randn(max(n, 1), K, generator=g)
        Hs.append(2 * X.t() @ X / max(n, 1) if n else torch.zeros(K, K))
    out = shrink_few_tokens(Hs, counts)
    total = sum(counts)
    for H, n, S in zip(Hs, counts, out):
        assert torch.allclose(S, S.t(), atol=1e-5)
        assert torch.linalg.eigvalsh(S).min() > -1e-4  # still positive semi-definite
        if total == 0:
            assert torch.equal(S, torch.eye(K))
        elif n >= K:
            assert torch.equal(S, H)  # enough tokens: untouched
        else:
            pooled = sum(c * h for c, h in zip(counts, Hs)) / total
            assert torch.allclose(S, (n * H + (K - n) * pooled) / K, atol=1e-5)


def test_configs_address_expert_stacks_by_name(tmp_path):
    import json
    model = tiny_family("qwen3_moe")
    spec = {"model.layers.0.mlp.experts.down_proj": None,
            "re:.*experts.*": discq.rtn_config(3, 32), "_default": discq.rtn_config(8, 32)}
    discq.quantize_(model, spec)
    layer0, layer1 = (model.model.layers[i].mlp.experts for i in (0, 1))
    assert type(layer0.down_proj) is nn.Parameter and layer0.down_proj.dim() == 3
    assert isinstance(layer0.gate_up_proj, ExpertsQuantizedTensor)
    assert json.loads(layer1.down_proj.inner_attributes)["bits"] == 3
    assert model.model.layers[0].self_attn.q_proj.weight.bits == 8
    discq.save_quantized(model, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "discq.json").read_text())["quantized"]
    assert manifest["model.layers.1.mlp.experts.down_proj"]["config"]["bits"] == 3
    assert "model.layers.0.mlp.experts.down_proj" not in manifest
    assert torch.equal(logits(discq.load_quantized(tmp_path / "q")), logits(model))
    with pytest.raises(ValueError, match="name the stack"):
        discq.quantize_(tiny_family("qwen3_moe"),
                        {"model.layers.0.mlp.experts.down_proj.2": discq.rtn_config(4, 32)})


def test_routers_stay_in_full_precision_unless_named():
    model = tiny_family("qwen2_moe")  # its shared-expert gate is an nn.Linear with one row
    discq.quantize_(model, discq.rtn_config(4, 32))
    gate = model.model.layers[0].mlp.shared_expert_gate
    assert not hasattr(gate.weight, "format_name")
    assert coverage_of(model).reasons()["routers"][0] == 4
    model = tiny_family("qwen2_moe")
    discq.quantize_(model, {"model.layers.0.mlp.shared_expert_gate": discq.rtn_config(8, None)})
    assert model.model.layers[0].mlp.shared_expert_gate.weight.bits == 8


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt2"])
def test_a_failed_run_puts_every_matrix_back(monkeypatch, family):
    from discq.passes import gptq
    model = tiny_family(family)
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    calls = []
    original = gptq.gptq_layer

    def third_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(gptq, "gptq_layer", third_fails)
    with pytest.raises(KeyboardInterrupt):
        discq.quantize_(model, discq.gptq_config(4, 32, calibration=calibration()))
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is v for k, v in before.items())
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_fine_tuning_tunes_an_expert_layers_biases_and_keeps_its_codes():
    from discq.training import finetune_
    model = tiny_family("gpt_oss")
    discq.quantize_(model, discq.rtn_config(2, 32))
    experts = model.model.layers[0].mlp.experts
    bias, codes = experts.gate_up_proj_bias.detach().clone(), experts.gate_up_proj.qdata.clone()
    report = finetune_(model, tiny_family("gpt_oss"), calibration(n=4, batch=4, length=64),
                       steps=12, val_every=4, lr=3e-2, batch_size=2)
    assert report["kl_after"] < report["kl_before"]  # measured 0.0739 -> 0.0726
    assert not torch.equal(experts.gate_up_proj_bias, bias)
    assert torch.equal(experts.gate_up_proj.qdata, codes)
