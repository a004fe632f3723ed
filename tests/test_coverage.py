"""What quantize_ quantizes of a model's weight matrices, and what it leaves and why; tied
output heads stay tied to the token embedding, for every format."""
import pytest
import torch
from discq.passes.matrices import matrix_parameters
from discq.passes.quantize import coverage_of, planned_coverage
from discq.pipeline import keep_head_filter
from families import calibration, tiny_family
from torch import nn
from transformers import AutoModelForCausalLM

import discq

IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_the_report_names_what_stays_in_full_precision_and_why():
    model = tiny_family("llama-untied")
    discq.quantize_(model, discq.rtn_config(4, 32), filter_fn=keep_head_filter(model))
    report = coverage_of(model)
    reasons = report.reasons()
    assert reasons["token embeddings"][0] == 1 and reasons["left out by filter_fn"][0] == 1
    assert report.kept["lm_head.weight"][1] == "left out by filter_fn"
    quantized = sum(report.quantized.values())
    assert report.share == pytest.approx(quantized / matrix_parameters(model))
    text = report.describe()
    assert f"{report.share:.1%}" in text and "lm_head.weight" in text
    # the plan says the same before any work
    fresh = tiny_family("llama-untied")
    _, planned = planned_coverage(fresh, keep_head_filter(fresh))
    assert planned.share == pytest.approx(report.share)


class OddBlock(nn.Module):
    """A block with a weight matrix of a kind no rule covers (a raw 3-D parameter)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.mix = nn.Parameter(torch.randn(2, 16, 16))

    def forward(self, x):
        return self.proj(x) + torch.einsum("bi,kij->bj", x, self.mix)


def test_a_matrix_no_rule_covers_is_warned_about():
    model = nn.Sequential(nn.ModuleList([OddBlock(), OddBlock()]))
    with pytest.warns(UserWarning, match="no rule|does not quantize"):
        discq.quantize_(model, discq.rtn_config(4, 16))
    report = coverage_of(model)
    assert report.uncovered == ["0.0.mix", "0.1.mix"]
    assert report.kept["0.0.mix"][1] == "3-D parameters no rule covers"


def tied(family="llama"):
    model = tiny_family(family)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


FORMATS = {  # one config per format family a tied head can take
    "affine": lambda: discq.rtn_config(4, 32),
    "affine+lowrank": lambda: discq.rtn_config(3, 32, lowrank=4),
    "incoherent": lambda: discq.rtn_config(4, 32, incoherence=True),
    "gguf": lambda: discq.rtn_config(gguf="Q8_0"),
    # GPTQ lends its rounded head to the model while it runs (passes/disc_init.py)
    "affine, DiscQuant from GPTQ": lambda: discq.disc_config(4, 32, calibration=calibration(),
                                                             steps=2, warmup=1, batch_size=2,
                                                             init="gptq"),
    "lattice": lambda: discq.quip_sharp_config(2, calibration=calibration(), finetune=False),
    "trellis": lambda: discq.qtip_config(2, calibration=calibration(), finetune=False,
                                         state_bits=8),
    "codebook": lambda: discq.gptvq_config(2, 2, calibration=calibration(), kmeans_iters=3),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tied_head_stays_tied_and_reloads_identically(fmt, tmp_path):
    model = tied()
    discq.quantize_(model, FORMATS[fmt]())
    head, emb = model.lm_head.weight, model.get_input_embeddings().weight
    assert emb is head and hasattr(head, "format_name")
    model.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert torch.equal(logits(loaded), logits(model))
    discq.save_quantized(model, tmp_path / "dq")
    assert torch.equal(logits(discq.load_quantized(tmp_path / "dq")), logits(model))


@pytest.mark.slow
def test_the_bundled_smollm2_reloads_after_quantize_(tmp_path):
    """The issue's case: the documented front door on the tied SmolLM2-135M."""
    from discq.models import load_model
    model, _ = load_model("smollm2-135m")
    discq.quantize_(model, discq.rtn_config(bits=4))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(loaded), logits(model))
