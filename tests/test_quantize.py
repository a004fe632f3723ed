"""quantize_ and rtn_config as a user calls them."""
import json
import warnings

import pytest
import torch
from discq.passes import QuantConfig
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_random_bert, tiny_random_llama
from torch import nn

from discq import AffineQuantizedTensor, bits_per_weight, quantize_, rtn_config


def _n_quantized(model):
    return sum(isinstance(m.weight, AffineQuantizedTensor)
               for m in model.modules() if isinstance(m, nn.Linear))


def test_every_linear_of_a_llama_decoder_is_quantized():
    model = tiny_random_llama()
    x = torch.randint(0, 320, (2, 12))
    ref = model(x).logits
    quantize_(model, rtn_config(bits=4, group_size=32))
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert _n_quantized(model) == n_linear
    out = model(x).logits
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()


def test_bert_encoder_is_quantized_and_close():
    model = tiny_random_bert()
    x = torch.randint(0, 200, (2, 10))
    ref = model(x).last_hidden_state
    quantize_(model, rtn_config(bits=4, group_size=64))
    assert _n_quantized(model) > 0
    cos = torch.cosine_similarity(model(x).last_hidden_state, ref, dim=-1)
    assert cos.min() > 0.95


def test_three_bit_group_64_costs_about_3_4_bits_per_weight():
    model = tiny_random_llama()
    quantize_(model, rtn_config(bits=3, group_size=64))
    assert 3.3 <= bits_per_weight(model) <= 3.45  # 3 + (16-bit scale + 8-bit zero) / 64


def test_filter_fn_keeps_the_head_full_precision():
    model = tiny_random_llama(tie=False)
    quantize_(model, rtn_config(bits=4), filter_fn=lambda m, fqn: "lm_head" not in fqn
              and isinstance(m, nn.Linear))
    assert not isinstance(model.lm_head.weight, AffineQuantizedTensor)
    assert isinstance(model.model.layers[0].mlp.down_proj.weight, AffineQuantizedTensor)


def test_filter_selecting_nothing_warns():
    model = tiny_random_llama()
    with pytest.warns(UserWarning, match="selected no"):
        quantize_(model, rtn_config(), filter_fn=lambda m, fqn: False)


def test_model_without_linear_is_an_error():
    with pytest.raises(ValueError, match="no weight matrix"):
        quantize_(nn.Sequential(nn.ReLU()), rtn_config())


def test_wrong_argument_types():
    with pytest.raises(TypeError, match="model"):
        quantize_("model", rtn_config())
    with pytest.raises(TypeError, match="config"):
        quantize_(tiny_random_llama(), {"bits": 4})


def test_nan_weight_names_the_layer():
    model = tiny_random_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj"):
        quantize_(model, rtn_config())


def test_torchao_quantize_accepts_our_config():
    from torchao.quantization import quantize_ as ao_quantize_
    model = tiny_random_llama()
    ao_quantize_(model, rtn_config(bits=3, group_size=32))
    assert _n_quantized(model) > 0


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 3, 4, 8]), st.one_of(st.none(), st.integers(1, 4096)),
       st.booleans(), st.sampled_from(["input", "output"]))
def test_config_json_round_trip(bits, group_size, symmetric, along):
    cfg = rtn_config(bits, group_size, symmetric, along)
    again = QuantConfig.from_json(cfg.to_json())
    assert again == cfg and json.loads(cfg.to_json())["version"] == 1


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.integers(-5, 1), st.integers(5, 7), st.integers(9, 64), st.floats(),
                 st.text(max_size=3)),
       st.one_of(st.integers(-100, 0), st.floats(), st.text(max_size=2)))
def test_bad_configs_raise_clear_errors(bits, group_size):
    with pytest.raises((ValueError, TypeError)):
        rtn_config(bits=bits, group_size=group_size)


def test_unknown_or_newer_config_json_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        QuantConfig.from_dict({"method": "magic"})
    with pytest.raises(ValueError, match="newer"):
        QuantConfig.from_dict({"method": "rtn", "version": 99})


def test_quantizing_twice_skips_already_quantized_layers():
    model = tiny_random_llama()
    quantize_(model, rtn_config(bits=4))
    q = model.model.layers[0].self_attn.q_proj.weight
    with warnings.catch_warnings(record=True):
        quantize_(model, rtn_config(bits=2))
    assert model.model.layers[0].self_attn.q_proj.weight is q


# ---- per-module configs -----------------------------------------------------------------------

def _layer_formats(model):
    return {fqn: (m.weight.bits if isinstance(m.weight, AffineQuantizedTensor) else None)
            for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_per_module_configs_exact_names_patterns_default_and_skips(tmp_path):
    import discq
    model = tiny_random_llama(tie=False)
    mlp, rest = rtn_config(bits=2, group_size=32), rtn_config(bits=4, group_size=32)
    quantize_(model, {"re:.*mlp.*": mlp, "lm_head": None, "model.layers.0.mlp.down_proj": None,
                      "_default": rest})
    bits = _layer_formats(model)
    assert bits["lm_head"] is None and bits["model.layers.0.mlp.down_proj"] is None
    assert bits["model.layers.1.mlp.down_proj"] == 2 and bits["model.layers.0.mlp.up_proj"] == 2
    assert bits["model.layers.0.self_attn.q_proj"] == 4
    assert sum(b is None for b in bits.values()) == 2  # nothing else skipped
    discq.save_quantized(model, tmp_path / "m")  # each layer's config in the manifest
    spec = json.loads((tmp_path / "m" / "discq.json").read_text())["quantized"]
    assert spec["model.layers.1.mlp.gate_proj.weight"]["config"]["bits"] == 2
    assert spec["model.layers.1.self_attn.o_proj.weight"]["config"]["bits"] == 4
    assert "lm_head.weight" not in spec


def test_per_module_configs_without_default_leave_the_rest_alone():
    model = tiny_random_llama(tie=False)
    quantize_(model, {"re:.*q_proj": rtn_config(bits=3, group_size=32)})
    quantized = {f for f, b in _layer_formats(model).items() if b is not None}
    assert quantized == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}


@pytest.mark.parametrize("spec, error, match", [
    ({"lm_haed": None}, ValueError, "lm_haed"),            # a typo must not be ignored
    ({"re:([": rtn_config()}, ValueError, "regular expression"),
    ({"_default": "rtn"}, TypeError, "discq config or None"),
    ({3: rtn_config()}, TypeError, "module names"),
])
def test_bad_per_module_configs_are_clear_errors(spec, error, match):
    model = tiny_random_llama(tie=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        quantize_(model, spec)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_failing_second_method_restores_the_first_ones_weights():
    model = tiny_random_llama(tie=False)
    originals = {f: m.weight for f, m in model.named_modules() if isinstance(m, nn.Linear)}
    bad = rtn_config(bits=4, group_size=32)
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")  # fails its method
    with pytest.raises(ValueError, match="NaN"):
        quantize_(model, {"re:model.layers.0.*": rtn_config(bits=2, group_size=32),
                          "_default": bad})
    assert all(m.weight is originals[f] for f, m in model.named_modules()
               if isinstance(m, nn.Linear))
