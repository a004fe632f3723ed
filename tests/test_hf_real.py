"""`make test-all`: the Hugging Face round trip on the real models. SmolLM2-135M (loaded from its
GGUF file; `load_model` drops transformers' GGUF marks) quantized with every method saves with
`save_pretrained` and reloads with `from_pretrained` in a fresh process with bit-identical logits,
from safetensors only, in the bytes `bits_per_weight` promises; MiniLM does the same through
`AutoModel`."""

import pytest
import torch
from conftest import run_python
from safetensors import safe_open
from torch import nn

import discq
from discq.data import calibration_batches
from discq.methods import available_methods, build_config
from discq.models import load_model

pytestmark = pytest.mark.slow

# small budgets: this checks the round trip, not the rounding
SETTINGS = {"disc": {"steps": 2, "batch_size": 2}, "quip-sharp": {"finetune": False,
                                                                   "refine_passes": 0},
            "qtip": {"finetune": False, "state_bits": 10}, "gptvq": {"kmeans_iters": 5}}


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load_model("smollm2-135m")
    calib = calibration_batches(tok, "shakespeare", n_samples=8, seq_len=128, batch_size=4)
    return model, tok, calib


@pytest.mark.parametrize("method", available_methods())
def test_smollm2_round_trip_in_a_fresh_process(smollm2, method, tmp_path):
    import copy
    original, tok, calib = smollm2
    model = copy.deepcopy(original)
    config = build_config(method, bits=3 if method != "quip-sharp" else 2, group_size=64,
                          calibration=calib, **SETTINGS.get(method, {}))
    head = model.get_output_embeddings()
    discq.quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear)
                    and m is not head)
    model.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert [f for f in files if not f.endswith(".json")] == ["model.safetensors"]
    _bytes_match_bits_per_weight(model, tmp_path / "m" / "model.safetensors")
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    run_python(f"""
        import torch, discq
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)).logits
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        assert torch.equal(logits, expected)
    """)


def _bytes_match_bits_per_weight(model: nn.Module, file) -> None:
    """Bytes of the quantized weights' parts (placeholders aside) = bits_per_weight x weights."""
    names = [n for n, p in model.named_parameters() if isinstance(p, discq.QuantizedTensor)]
    with safe_open(file, "pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys()
                     if any(k.startswith(n + ".") for n in names))
    n_weights = sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert stored * 8 == pytest.approx(discq.bits_per_weight(model) * n_weights, rel=1e-6)


def test_minilm_encoder_round_trip_through_automodel(tmp_path):
    from transformers import AutoModel
    model, tok = load_model("minilm-l6")
    discq.quantize_(model, discq.rtn_config(bits=4, group_size=32))
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    ids = tok(["a quantized encoder", "round trip"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(loaded(**ids).last_hidden_state, model(**ids).last_hidden_state)

