"""save_quantized / load_quantized: bit-exact, no pickle, atomic, never clobbering."""
import json
import os

import pytest
import torch
from discq.tensors.base import QuantizedTensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import tiny_random_bert, tiny_random_llama
from torch import nn

from discq import bits_per_weight, load_quantized, quantize_, rtn_config, save_quantized
from discq.io import CheckpointError

X = torch.randint(0, 200, (2, 12))


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], QuantizedTensor):
            for part, t in sa[k].stored_tensors().items():
                assert torch.equal(t, sb[k].stored_tensors()[part]), (k, part)
            assert sa[k].attributes() == sb[k].attributes()
        else:
            assert torch.equal(sa[k], sb[k]), k


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([2, 3, 4, 8]), st.sampled_from([None, 16, 48]),
       st.booleans(), st.sampled_from(["input", "output"]))
def test_save_load_identity_rebuilding_from_config(tmp_path_factory, bits, g, sym, along):
    model = tiny_random_llama()
    quantize_(model, rtn_config(bits, g, sym, along))
    path = tmp_path_factory.mktemp("q") / "out"
    save_quantized(model, path)
    loaded = load_quantized(path)
    _assert_same_state(model, loaded)
    assert torch.equal(loaded(X).logits, model(X).logits)


def test_load_into_meta_skeleton_and_bert(tmp_path):
    model = tiny_random_bert()
    quantize_(model, rtn_config(3, 64))
    save_quantized(model, tmp_path / "bert")
    with torch.device("meta"):
        bad = tiny_random_bert()
    with pytest.raises(CheckpointError, match="init_empty_weights"):
        load_quantized(tmp_path / "bert", bad)
    from accelerate import init_empty_weights
    with init_empty_weights():
        skeleton = tiny_random_bert()
    assert skeleton.encoder.layer[0].output.dense.weight.is_meta
    loaded = load_quantized(tmp_path / "bert", skeleton)
    _assert_same_state(model, loaded)
    assert torch.equal(loaded(X).last_hidden_state, model(X).last_hidden_state)


def test_file_size_is_the_packed_bits(tmp_path):
    model = tiny_random_llama(tie=False)
    quantize_(model, rtn_config(3, 64))
    save_quantized(model, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    header = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    plain = sum(p.numel() * p.element_size() for p in model.state_dict().values()
                if not isinstance(p, QuantizedTensor))
    quantized = [p for p in model.state_dict().values() if isinstance(p, QuantizedTensor)]
    on_disk_bits = (os.path.getsize(f) - header - plain) * 8
    assert on_disk_bits == sum(q.storage_bits() for q in quantized)
    assert on_disk_bits / sum(q.numel() for q in quantized) == pytest.approx(3.375, abs=0.02)
    assert bits_per_weight(model) == pytest.approx(3.375, abs=0.02)


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model = tiny_random_llama(tie=True)
    quantize_(model, rtn_config(4), filter_fn=lambda m, f: "lm_head" not in f)
    save_quantized(model, tmp_path / "t")
    manifest = json.loads((tmp_path / "t" / "discq.json").read_text())
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_quantized(tmp_path / "t")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_existing_directory_is_never_clobbered(tmp_path):
    model = tiny_random_llama()
    quantize_(model, rtn_config(4))
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_quantized(model, target)
    assert os.listdir(target) == ["notes.txt"]
    save_quantized(model, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"  # files discq does not write are kept
    assert (target / "discq.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_failed_save_leaves_nothing_behind(tmp_path):
    model = tiny_random_llama()
    quantize_(model, rtn_config(4))
    model.config.save_pretrained = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_planted_pickle_is_ignored(tmp_path):
    model = tiny_random_llama()
    quantize_(model, rtn_config(4))
    save_quantized(model, tmp_path / "m")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle you want")
    (tmp_path / "m" / "model.pt").write_bytes(b"\x80\x04evil")
    loaded = load_quantized(tmp_path / "m")
    assert torch.equal(loaded(X).logits, model(X).logits)


def test_wrong_skeleton_shape_names_the_tensor(tmp_path):
    model = tiny_random_llama()
    quantize_(model, rtn_config(4))
    save_quantized(model, tmp_path / "m")
    other = tiny_random_llama()
    other.model.layers[0].mlp.up_proj = nn.Linear(64, 100, bias=False)
    before = other.model.layers[1].mlp.down_proj.weight.clone()
    with pytest.raises(CheckpointError, match="up_proj"):
        load_quantized(tmp_path / "m", other)
    assert torch.equal(other.model.layers[1].mlp.down_proj.weight, before)  # untouched


def test_truncated_weights_and_bad_manifest(tmp_path):
    model = tiny_random_llama()
    quantize_(model, rtn_config(4))
    save_quantized(model, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_quantized(tmp_path / "m")
    save_quantized(model, tmp_path / "n")
    (tmp_path / "n" / "discq.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="discq.json"):
        load_quantized(tmp_path / "n")


def test_manifest_disagreeing_with_tensors(tmp_path):
    model = tiny_random_llama()
    quantize_(model, rtn_config(4))
    save_quantized(model, tmp_path / "m")
    mf = tmp_path / "m" / "discq.json"
    manifest = json.loads(mf.read_text())
    key = next(iter(manifest["quantized"]))
    manifest["quantized"][key]["attributes"]["bits"] = 3
    mf.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError):
        load_quantized(tmp_path / "m")


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="save_quantized"):
        load_quantized(tmp_path / "nope", tiny_random_llama())
