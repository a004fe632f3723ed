"""Fuzzing the checkpoint loader: corrupted bytes only ever raise the documented errors."""
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import tiny_random_llama

from discq import load_quantized, quantize_, rtn_config, save_quantized
from discq.io import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_random_llama()
    quantize_(model, rtn_config(3, 32))
    path = tmp_path_factory.mktemp("fuzz") / "m"
    save_quantized(model, path)
    return path


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(file=st.sampled_from(["model.safetensors", "discq.json"]),
       data=st.data())
def test_corrupted_bytes_raise_only_checkpoint_error(saved, tmp_path_factory, file, data):
    path = tmp_path_factory.mktemp("c") / "m"
    shutil.copytree(saved, path)
    raw = bytearray((path / file).read_bytes())
    mode = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if mode == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255)) if mode == "flip" else raw[i] ^ 0xFF
    (path / file).write_bytes(bytes(raw))
    skeleton = tiny_random_llama(seed=1)
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    try:
        load_quantized(path, skeleton)
    except CheckpointError:
        # nothing was half-loaded
        after = skeleton.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    # a flip inside tensor data (not the header) loads: safetensors has no checksum, and the
    # values are still well-formed codes/scales; what matters is no other exception type
