"""Every family discq is tested on (tiny random models built from configs, tests/families.py),
with every method: each decoder weight matrix (experts included) ends up in a discq format,
the model reloads through `from_pretrained` with identical logits, streams block by block to the
same result, compiles whole, and generates with `discq.generate`."""
import copy

import pytest
import torch
from discq.passes.capture import find_blocks
from discq.passes.matrices import routers
from discq.passes.quantize import coverage_of
from discq.pipeline import keep_head_filter
from discq.tensors.base import QuantizedTensor
from discq.tensors.experts import ExpertsQuantizedTensor
from families import FAMILIES, MOE_FAMILIES, calibration, tiny_family
from transformers import AutoModelForCausalLM

import discq

CALIB = calibration()
METHODS = {
    "rtn": lambda: discq.rtn_config(4, 32),
    "gptq": lambda: discq.gptq_config(4, 32, calibration=CALIB),
    "gptq-kl": lambda: discq.gptq_config(4, 32, calibration=CALIB, hessian="kl", kl_rows=16),
    "gptvq": lambda: discq.gptvq_config(2, 2, calibration=CALIB, kmeans_iters=3,
                                        codebook_update=False),
    "disc": lambda: discq.disc_config(4, 32, calibration=CALIB, steps=2, warmup=1,
                                      batch_size=2),
    "disc-from-gptq": lambda: discq.disc_config(4, 32, calibration=CALIB, steps=2, warmup=1,
                                                batch_size=2, init="gptq"),
    "quip-sharp": lambda: discq.quip_sharp_config(2, calibration=CALIB, finetune=False),
    "qtip": lambda: discq.qtip_config(2, calibration=CALIB, finetune=False, state_bits=8),
}
IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def decoder_matrices(model):
    """(name, parameter) of every weight matrix in the decoder blocks but the routers."""
    _, blocks = find_blocks(model)
    skip = routers(model)
    for module in blocks.modules():
        if module in skip:
            continue
        for name, p in module._parameters.items():  # (an experts module's biases are rows)
            if p is not None and p.dim() >= 2 and not name.endswith("_bias"):
                yield f"{type(module).__name__}.{name}", p


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_decoder_matrix_is_quantized_and_reloads(family, method, tmp_path):
    model = tiny_family(family)
    discq.quantize_(model, METHODS[method]())
    left = [name for name, p in decoder_matrices(model) if not isinstance(p, QuantizedTensor)]
    assert not left, f"{family}: left in full precision: {left}"
    if family in MOE_FAMILIES:
        assert any(isinstance(p, ExpertsQuantizedTensor) for _, p in decoder_matrices(model))
    assert coverage_of(model).uncovered == []
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_quantizing_in_memory(family, tmp_path):
    """The original checkpoint layout (transformers writes one tensor per expert) is read
    block by block, stacked experts and GPT-2's Conv1D included, to the in-memory result."""
    model = tiny_family(family)
    model.save_pretrained(tmp_path / "fp")
    config = discq.gptq_config(4, 32, calibration=CALIB)
    discq.quantize_pretrained(tmp_path / "fp", config, tmp_path / "q")
    discq.quantize_(model, config, filter_fn=keep_head_filter(model))
    assert torch.equal(logits(discq.load_quantized(tmp_path / "q")), logits(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_quantized_load_quantized_rebuilds_the_model(family, tmp_path):
    model = tiny_family(family)
    discq.quantize_(model, discq.rtn_config(3, 32))
    discq.save_quantized(model, tmp_path / "q")
    assert torch.equal(logits(discq.load_quantized(tmp_path / "q")), logits(model))


def _generate_family(family):
    model = tiny_family(family)
    discq.quantize_(model, discq.rtn_config(4, 32))
    prompt = IDS[:1, :6]
    out = discq.generate(model, prompt, max_new_tokens=5, eos_token_id=None, cpp_wrapper=False)
    # each new token is the argmax of the quantized model's own logits there
    full = logits(model, out)[0]
    assert out.shape == (1, 11)
    for t in range(6, 11):
        assert out[0, t] == full[t - 1].argmax()


@pytest.mark.parametrize("family", ["mixtral", "gpt2", "gemma3"])
def test_generate(family):
    _generate_family(family)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"mixtral", "gpt2", "gemma3"}))
def test_generate_every_family(family):
    _generate_family(family)


def _compile_family(family):
    torch._dynamo.reset()
    model = tiny_family(family)
    discq.quantize_(model, discq.rtn_config(4, 32))
    compiled = torch.compile(model, fullgraph=True)
    assert torch.allclose(logits(compiled), logits(model), atol=1e-4)


@pytest.mark.parametrize("family", [*MOE_FAMILIES, "gpt2"])
def test_compile_fullgraph_equals_eager(family):
    _compile_family(family)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {*MOE_FAMILIES, "gpt2"}))
def test_compile_fullgraph_every_family(family):
    _compile_family(family)


def test_quantize_and_the_model_it_copies():
    """quantize_copy (the CLI's path) leaves the original model untouched, experts included."""
    from discq.pipeline import quantize_copy
    model = tiny_family("qwen3_moe")
    before = copy.deepcopy(model.state_dict())
    quantized, summary = quantize_copy(model, "gptq", bits=4, group_size=32, calibration=CALIB)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert summary["bits_per_weight"] < 5
    assert isinstance(quantized.model.layers[0].mlp.experts.down_proj, ExpertsQuantizedTensor)
