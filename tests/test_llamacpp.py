"""discq's GGUF files in llama.cpp itself (llama-cpp-python, built from source by
`make test-all`): the mixtures' per-tensor types and file sizes are llama.cpp's own, the files
run, and llama.cpp's perplexity of them matches discq's evaluation of the same weights."""
import gguf
import numpy as np
import pytest
import torch
from conftest import CALIB_TEXT, HELDOUT_TEXT

import discq
from discq.data import eval_windows
from discq.eval import compare
from discq.models import bundled_path, load_model
from discq.pipeline import evaluate, keep_head_filter

pytestmark = pytest.mark.slow
llamacpp = pytest.importorskip("discq.llamacpp")
pytest.importorskip("llama_cpp", reason="make test-all installs llama-cpp-python")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def types_of(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("mixture", ["Q4_K_M", "Q3_K_M"])
def test_mixtures_write_llama_cpps_types_and_sizes(smollm2, tmp_path, mixture):
    model, _ = smollm2
    theirs = llamacpp.quantize(bundled_path("smollm2-135m"), tmp_path / "theirs.gguf", mixture)
    discq.quantize_(model := _copy(model), discq.rtn_config(gguf=mixture),
                    filter_fn=keep_head_filter(model))
    ours = discq.export.to_gguf(model, tmp_path / "ours.gguf", source=bundled_path("smollm2-135m"))
    assert types_of(ours) == types_of(theirs)
    assert abs(ours.stat().st_size - theirs.stat().st_size) < 2**16  # metadata may differ
    reader = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    t = reader["blk.2.ffn_down.weight"]  # Q6_K in Q4_K_M, Q4_K in Q3_K_M: discq's values
    ref = gguf.quants.dequantize(t.data, t.tensor_type)
    assert np.array_equal(ref, model.model.layers[2].mlp.down_proj.weight.dequantize().numpy())


def test_gptq_file_runs_in_llama_cpp_with_discqs_perplexity(smollm2, tmp_path):
    from discq.data import calibration_batches
    model, tok = smollm2
    q = _copy(model)
    calib = calibration_batches(tok, str(CALIB_TEXT), n_samples=8, seq_len=256, seed=0)
    discq.quantize_(q, discq.gptq_config(gguf="Q4_0", calibration=calib),
                    filter_fn=keep_head_filter(q))
    path = discq.export.to_gguf(q, tmp_path / "q.gguf", source=bundled_path("smollm2-135m"))
    windows = eval_windows(tok, str(HELDOUT_TEXT), n_windows=2, seq_len=512)
    ours = evaluate(q, model, windows, progress=False)
    with llamacpp.LlamaCppModel(path, n_ctx=512) as m:
        theirs = compare(model, m, windows, progress=False)
    # llama.cpp rounds activations to 8 bits inside its matmuls: within 1%, not bit for bit
    assert abs(theirs["perplexity"] / ours["perplexity"] - 1) < 0.01
    # and llama.cpp agrees with the original as often as discq does (llama.cpp: 0.797 here)
    assert abs(theirs["top1"] - ours["top1"]) < 0.02 and theirs["top1"] > 0.75


def test_metadata_written_from_transformers_runs_in_llama_cpp(smollm2, tmp_path):
    """No source GGUF: the config and the tokenizer make the metadata; llama.cpp tokenizes as
    transformers does and runs the weights discq wrote."""
    model, tok = smollm2
    q = _copy(model)
    discq.quantize_(q, discq.rtn_config(gguf="Q4_0"), filter_fn=keep_head_filter(q))
    path = discq.export.to_gguf(q, tmp_path / "q.gguf", tokenizer=tok, pre="smollm")
    windows = eval_windows(tok, str(HELDOUT_TEXT), n_windows=1, seq_len=512)
    with llamacpp.LlamaCppModel(path, n_ctx=512) as m:
        text = "To be, or not to be, that is the question: 'tis nobler 123 ☃."
        assert m.llm.tokenize(text.encode(), add_bos=False) == tok(text).input_ids
        theirs = compare(q, m, windows, progress=False)
    assert abs(theirs["perplexity"] / theirs["reference_perplexity"] - 1) < 0.01


def test_quantizer_keeps_embedding_and_head_in_the_type_asked(tmp_path):
    path = llamacpp.quantize(bundled_path("smollm2-135m"), tmp_path / "q.gguf", "Q4_0",
                             token_embedding_type="F32", output_tensor_type="F32")
    types = types_of(path)
    assert types["token_embd.weight"] == "F32" and types["blk.0.ffn_up.weight"] == "Q4_0"
    with pytest.raises(ValueError, match="token_embedding_type='F33' is not a GGML type"):
        llamacpp.quantize(bundled_path("smollm2-135m"), tmp_path / "r.gguf", "Q4_0",
                          token_embedding_type="F33")
    assert not (tmp_path / "r.gguf").exists()


@pytest.mark.parametrize("mixture", ["IQ4_XS", "IQ2_XS", "IQ3_XXS"])
def test_iquant_mixtures_are_llama_cpps_with_an_imatrix_and_run_there(smollm2, tmp_path,
                                                                       mixture):
    """llama-quantize --imatrix (discq's imatrix of the same calibration) writes the same types
    and file size as discq's GPTQ onto the i-quant grids, and llama.cpp runs discq's file with
    discq's perplexity."""
    from discq.data import calibration_batches
    try:
        llamacpp.llama_quantize_path()
    except FileNotFoundError:
        pytest.skip("needs llama.cpp's llama-quantize program: make llama-tools")
    model, tok = smollm2
    calib = calibration_batches(tok, str(CALIB_TEXT), n_samples=4, seq_len=256, seed=0)
    imatrix = discq.export.to_imatrix(model, calib, tmp_path / "i.imatrix.gguf")
    theirs = llamacpp.quantize(bundled_path("smollm2-135m"), tmp_path / "theirs.gguf", mixture,
                               imatrix=imatrix)
    q = _copy(model)
    discq.quantize_(q, discq.gptq_config(gguf=mixture, calibration=calib),
                    filter_fn=keep_head_filter(q))
    ours = discq.export.to_gguf(q, tmp_path / "ours.gguf", source=bundled_path("smollm2-135m"))
    assert types_of(ours) == types_of(theirs)
    assert abs(ours.stat().st_size - theirs.stat().st_size) < 2**16
    windows = eval_windows(tok, str(HELDOUT_TEXT), n_windows=1, seq_len=512)
    mine = evaluate(q, model, windows, progress=False)
    with llamacpp.LlamaCppModel(ours, n_ctx=512) as m:
        there = compare(model, m, windows, progress=False)
    assert abs(there["perplexity"] / mine["perplexity"] - 1) < 0.02


def test_llama_cpp_model_refuses_long_sequences_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        llamacpp.LlamaCppModel(tmp_path / "none.gguf")
    with llamacpp.LlamaCppModel(bundled_path("smollm2-135m"), n_ctx=16) as m:
        with pytest.raises(ValueError, match="n_ctx"):
            m(torch.zeros(1, 32, dtype=torch.long))


def _copy(model):
    import copy
    return copy.deepcopy(model)
