"""Rotations folded into the weights (passes/rotate.py): the rotated full-precision model computes
the original's logits, stays an ordinary model of its family (quantize_, save_pretrained, GGUF),
and spreads an outlier channel so that round-to-nearest loses less."""
import pytest
import torch
from discq.eval import compare
from families import calibration, tiny_family, tiny_tokenizer

import discq

IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(11))
ROTATED = ["llama", "llama-untied", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", ROTATED)
def test_the_rotated_model_computes_the_original_logits(family):
    model, original = tiny_family(family), tiny_family(family)
    with torch.no_grad():  # norms with scales far from 1, so that folding them matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        original.load_state_dict(model.state_dict())
    discq.rotate_(model, seed=3)
    torch.testing.assert_close(logits(model), logits(original), rtol=1e-4, atol=1e-4)
    changed = [n for n, p in model.named_parameters()
               if not torch.equal(p, original.state_dict()[n])]
    assert any("v_proj" in n or "qkv_proj" in n for n in changed)  # the heads, always
    if not family.startswith("gemma"):  # the residual stream too (see rotate.py)
        assert "model.embed_tokens.weight" in changed and any("o_proj" in n for n in changed)


def test_a_tied_head_is_untied_and_the_model_reloads(tmp_path):
    model = tiny_family("llama")
    discq.rotate_(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    model.save_pretrained(tmp_path / "r")
    back = type(model).from_pretrained(tmp_path / "r")
    torch.testing.assert_close(logits(back), logits(model))


def test_rotation_spreads_an_outlier_channel_for_round_to_nearest():
    """One residual channel 30x larger in what every reader sees (as trained LLMs have): RTN
    4-bit with one scale a row loses less on the rotated model (with small groups the outlier
    costs only its own group, and spreading it can cost more)."""
    def with_outlier():
        model = tiny_family("llama-untied")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p[5] = 30.0
        return model
    ref = with_outlier()
    kls = {}
    for rotated in (False, True):
        model = with_outlier()
        if rotated:
            discq.rotate_(model)
        discq.quantize_(model, discq.rtn_config(bits=4, group_size=None),
                        filter_fn=lambda m, fqn: fqn != "lm_head")
        kls[rotated] = compare(ref, model, [IDS], progress=False)["kl"]
    assert kls[True] < 0.7 * kls[False], kls


def test_the_rotated_model_quantizes_and_exports_to_gguf(tmp_path):
    import gguf
    model = tiny_family("qwen2")
    discq.rotate_(model)
    discq.quantize_(model, discq.gptq_config(gguf="Q4_0", calibration=calibration()))
    path = discq.export.to_gguf(model, tmp_path / "r.gguf", tokenizer=tiny_tokenizer(),
                                pre="gpt-2")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "output.weight" in names  # untied by the rotation


@pytest.mark.parametrize("family, match", [("gpt2", "model_type 'gpt2'"),
                                           ("mixtral", "model_type 'mixtral'")])
def test_families_it_cannot_rotate_are_refused(family, match):
    with pytest.raises(ValueError, match=match):
        discq.rotate_(tiny_family(family))


def test_a_quantized_model_is_refused():
    model = tiny_family("llama")
    discq.quantize_(model, discq.rtn_config(bits=4))
    with pytest.raises(ValueError, match="rotate first"):
        discq.rotate_(model)
