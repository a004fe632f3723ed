"""The Hugging Face round trip on the tiny Llama and a tiny encoder: `save_pretrained` of a
discq-quantized model, `from_pretrained` after `import discq` (also in a fresh process, also
sharded, also saved again), the refusals without discq or from a newer discq, and
`discq.load_quantized` on the same directory."""
import copy
import json

import pytest
import torch
from conftest import run_python
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, BertModel

import discq
from discq import gptq_config, quantize_, quip_sharp_config, rtn_config
from discq.passes import disc_config

IDS = torch.arange(7, 7 + 48).reshape(2, 24)


def _not_head(m, fqn):
    return isinstance(m, nn.Linear) and fqn != "lm_head"


CONFIGS = {
    "rtn": lambda calib: rtn_config(bits=3, group_size=32),
    "rtn-incoherent": lambda calib: rtn_config(bits=4, group_size=32, incoherence=True),
    "rtn-lowrank": lambda calib: rtn_config(bits=3, group_size=32, lowrank=4),
    "gptq-output-groups": lambda calib: gptq_config(bits=3, group_size=16, calibration=calib,
                                                     group_along="output"),
    "disc": lambda calib: disc_config(bits=2, group_size=32, calibration=calib, steps=2,
                                      batch_size=8),
    "quip-sharp": lambda calib: quip_sharp_config(bits=2, calibration=calib, finetune=False),
}


@pytest.fixture(scope="module")
def quantized(tiny_llama, tiny_calibration):
    """{name: quantized copy of the tiny Llama}, head in full precision."""
    out = {}
    for name, make in CONFIGS.items():
        model = copy.deepcopy(tiny_llama[0])
        quantize_(model, make(tiny_calibration), filter_fn=_not_head)
        out[name] = model
    return out


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    wa, wb = dict(a.named_parameters()), dict(b.named_parameters())
    assert wa.keys() == wb.keys()
    for name, p in wa.items():
        assert type(wb[name]) is type(p), name
        if isinstance(p, discq.QuantizedTensor):
            for part, t in p.stored_tensors().items():
                assert torch.equal(getattr(wb[name], part), t), (name, part)
        else:
            assert torch.equal(wb[name], p), name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_then_from_pretrained_is_bit_identical(quantized, name, tmp_path):
    model = quantized[name]
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "discq" and config["discq_version"] == discq.__version__
    assert config["modules_not_converted"] == ["lm_head"]
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    # every weight came from the checkpoint: none was allocated and initialized as missing
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    _same_weights(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied


def test_fresh_process_from_safetensors_only(quantized, tmp_path):
    model = quantized["gptq-output-groups"]
    model.save_pretrained(tmp_path)
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.suffix not in (".json",)) == \
        [".safetensors"]
    with torch.no_grad():
        torch.save(model(IDS).logits, tmp_path.parent / "expected.pt")
    run_python(f"""
        import torch, discq
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        ids = torch.arange(7, 7 + 48).reshape(2, 24)
        expected = torch.load({str(tmp_path.parent / 'expected.pt')!r}, weights_only=True)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)
    """)


def test_sharded_save_with_index_and_saving_a_loaded_model_again(quantized, tmp_path):
    model = quantized["rtn"]
    model.save_pretrained(tmp_path / "a", max_shard_size="100KB")
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert any(k.endswith(".weight.qdata") for k in index["weight_map"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")  # a loaded model saves again, unchanged
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    _same_weights(model, again)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_discq_load_quantized_reads_a_save_pretrained_directory(quantized, tmp_path):
    model = quantized["quip-sharp"]
    discq.hf.save_pretrained(model, tmp_path / "m", metadata={"source": "tiny"})
    assert discq.io.is_quantized_dir(tmp_path / "m")
    assert discq.io.read_metadata(tmp_path / "m") == {"source": "tiny"}
    loaded = discq.load_quantized(tmp_path / "m")
    _same_weights(model, loaded)
    with pytest.raises(ValueError, match="without"):
        discq.load_quantized(tmp_path / "m", model=copy.deepcopy(model))


def test_without_import_discq_loading_fails_instead_of_random_weights(quantized, tmp_path):
    quantized["rtn"].save_pretrained(tmp_path)
    out = run_python(f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        except RuntimeError as e:
            print("refused:", e)
        else:
            raise SystemExit("loaded a discq checkpoint without discq")
        import sys
        assert "discq" not in sys.modules
    """)
    assert "refused" in out


def test_checkpoint_of_a_newer_format_version_says_what_to_do(quantized, tmp_path):
    quantized["rtn"].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format version 99.*pip install -U"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_gguf_loaded_model_saves_with_discqs_config_after_quantization(tiny_llama, tmp_path):
    """transformers marks a model it loaded from a .gguf file as GGUF-quantized and refuses to
    save it; once discq has quantized it, discq's quantization_config replaces GGUF's."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig
    model = copy.deepcopy(tiny_llama[0])
    model.config.quantization_config = GgufConfig(gguf_file="model.gguf")
    model.hf_quantizer = GgufHfQuantizer(model.config.quantization_config)
    with pytest.raises(ValueError, match="gguf"):
        model.save_pretrained(tmp_path / "before")
    quantize_(model, rtn_config(bits=4, group_size=32), filter_fn=_not_head)
    model.save_pretrained(tmp_path / "after")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "after")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_encoder_round_trip_through_automodel(tmp_path):
    config = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    quantize_(model, rtn_config(bits=4, group_size=32))
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)
    assert isinstance(loaded.encoder.layer[0].attention.self.query.weight, discq.QuantizedTensor)

