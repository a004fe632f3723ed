"""llama.cpp's importance matrix (discq/export/imatrix.py), read back with the `gguf` package:
llama.cpp's tensor names, Σ x² of each linear's inputs and the token counts, the key-values
its quantizer reads."""
import gguf
import numpy as np
import pytest
import torch
from families import calibration, tiny_family

import discq


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


@pytest.mark.parametrize("family", ["llama", "llama-untied", "qwen3", "phi3", "gpt2"])
def test_the_file_holds_each_linears_input_square_sums(family, tmp_path):
    model = tiny_family(family)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    calib = calibration(n=2, batch=2, length=16)
    path = discq.export.to_imatrix(model, calib, tmp_path / "m.imatrix.gguf", dataset="plays")
    fields, tensors = read(path)
    assert fields["general.type"] == "imatrix" and fields["imatrix.datasets"] == ["plays"]
    assert fields["imatrix.chunk_size"] == 16 and fields["imatrix.chunk_count"] == 4
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(
        a[0].reshape(-1, a[0].shape[-1]))) for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    with torch.no_grad():
        for ids in calib:
            model(ids)
    for h in hooks:
        h.remove()
    q, fqn = {"phi3": ("blk.1.attn_qkv.weight", "model.layers.1.self_attn.qkv_proj"),
              "gpt2": ("blk.1.attn_qkv.weight", "transformer.h.1.attn.c_attn")}.get(
        family, ("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj"))
    X = torch.cat(seen[fqn]).double()
    np.testing.assert_allclose(tensors[f"{q}.in_sum2"].reshape(-1), (X * X).sum(0).numpy(),
                               rtol=1e-5)
    assert float(tensors[f"{q}.counts"].reshape(-1)[0]) == 64
    assert ("output.weight.in_sum2" in tensors) == (not tied)  # tied: llama.cpp has no output
    linears = sum(isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
                  for m in model.modules())
    assert len(tensors) == 2 * (linears - tied)


def test_it_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="expert stacks"):
        discq.export.to_imatrix(tiny_family("mixtral"), calibration(), tmp_path / "x.gguf")
    (tmp_path / "y.gguf").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        discq.export.to_imatrix(tiny_family("llama"), calibration(), tmp_path / "y.gguf")
    assert (tmp_path / "y.gguf").read_text() == "mine"


def test_discq_imatrix_from_the_command_line(tmp_path, capsys):
    from conftest import CALIB_TEXT, TINY_LLAMA
    from test_cli import discq_here, discq_in_process
    out = tmp_path / "t.imatrix.gguf"
    r = discq_here(capsys, "imatrix", TINY_LLAMA, "--calib", CALIB_TEXT, "--n-calib", "2",
                   "--seq-len", "32", "--out", out)
    assert r["tokens"] == 64 and r["out"] == str(out)
    fields, tensors = read(out)
    assert fields["imatrix.chunk_size"] == 32 and "blk.0.ffn_down.weight.in_sum2" in tensors
    rc, _, err = discq_in_process(capsys, "imatrix", TINY_LLAMA, "--out", out)
    assert rc == 2 and "--overwrite" in err and "Traceback" not in err


def test_llama_cpps_quantizer_with_an_imatrix_says_what_it_needs(tmp_path, monkeypatch):
    # the C API cannot take an importance matrix: the llama-quantize program is named, with
    # how to build it; a missing imatrix file is named; nothing is written either way
    from discq import llamacpp
    monkeypatch.setenv("DISCQ_LLAMA_QUANTIZE", str(tmp_path / "no-such-program"))
    monkeypatch.setenv("PATH", str(tmp_path))
    (tmp_path / "m.imatrix.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="make llama-tools"):
        llamacpp.quantize(tmp_path / "src.gguf", tmp_path / "out.gguf", "IQ2_XS",
                          imatrix=tmp_path / "m.imatrix.gguf")
    with pytest.raises(FileNotFoundError, match="no importance matrix"):
        llamacpp.quantize(tmp_path / "src.gguf", tmp_path / "out.gguf", "IQ2_XS",
                          imatrix=tmp_path / "none.gguf")
    assert not (tmp_path / "out.gguf").exists()
