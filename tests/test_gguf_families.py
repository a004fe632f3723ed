"""GGUF export of every family llama.cpp runs (the architecture table, discq/export/gguf_archs.py):
the `gguf` package's reference dequantizers read discq's blocks back bit for bit, stacked
experts as llama.cpp's `ffn_*_exps` tensors; `slow` (llama.cpp's Python bindings, make
test-all): each file runs in llama.cpp with the perplexity discq's evaluation gives."""
import gguf
import numpy as np
import pytest
import torch
from discq.export.gguf_archs import ARCHS
from families import FAMILIES, MOE_FAMILIES, calibration, tiny_family, tiny_tokenizer

import discq

TOK = None


def tokenizer():
    global TOK
    TOK = TOK or tiny_tokenizer()
    return TOK


METHODS = {
    "rtn": lambda: discq.rtn_config(gguf="Q4_0"),
    "gptq": lambda: discq.gptq_config(gguf="Q4_0", calibration=calibration()),
    "disc": lambda: discq.disc_config(gguf="Q4_0", calibration=calibration(), steps=2,
                                      warmup=1, batch_size=2),
}


def exported(family, method, tmp_path):
    model = tiny_family(family)
    discq.quantize_(model, METHODS[method]())
    path = discq.export.to_gguf(model, tmp_path / f"{family}.gguf", tokenizer=tokenizer(),
                                pre="gpt-2")
    return model, path


def tensors(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def dequantized(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type)


def test_every_family_has_an_entry():
    for family in FAMILIES:
        assert tiny_family(family).config.model_type in ARCHS


@pytest.mark.parametrize("family", FAMILIES)
def test_the_file_holds_discqs_values_under_llama_cpps_names(family, tmp_path):
    model, path = exported(family, "rtn", tmp_path)
    reader, found = tensors(path)
    entry = ARCHS[model.config.model_type]
    assert reader.fields["general.architecture"].contents() == \
        gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, entry.arch)]
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    quantized = [t for t in found.values() if t.tensor_type == gguf.GGMLQuantizationType.Q4_0]
    assert len(quantized) >= 2 * 4  # every layer's attention and MLP matrices
    # the down projection of layer 1, as llama.cpp reads it, is discq's (experts: each one's)
    name = "blk.1.ffn_down_exps.weight" if family in MOE_FAMILIES else "blk.1.ffn_down.weight"
    block = model.get_decoder().layers[1] if family != "gpt2" else model.transformer.h[1]
    mlp = block.mlp
    if family in MOE_FAMILIES:
        ours = mlp.experts.down_proj.dequantize()
        ours = ours.transpose(1, 2) if mlp.experts.is_transposed else ours  # [E, N, K]
    elif family == "gpt2":
        ours = mlp.c_proj.weight.dequantize()
    else:
        ours = mlp.down_proj.weight.dequantize()
    assert np.array_equal(dequantized(found[name]), ours.numpy())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gate_and_up_experts_are_split_as_llama_cpp_reads_them(family, tmp_path):
    model, path = exported(family, "rtn", tmp_path)
    _, found = tensors(path)
    experts = model.get_decoder().layers[0].mlp.experts
    W = torch.stack([experts.gate_up_proj.expert(e).dequantize()
                     for e in range(experts.num_experts)])  # [E, 2I, H]
    gate, up = (W[:, ::2], W[:, 1::2]) if not experts.is_concatenated else W.chunk(2, dim=1)
    assert np.array_equal(dequantized(found["blk.0.ffn_gate_exps.weight"]), gate.numpy())
    assert np.array_equal(dequantized(found["blk.0.ffn_up_exps.weight"]), up.numpy())
    assert dict(found)["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_families_llama_cpp_does_not_have_are_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model("olmo2", hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=4, vocab_size=320)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="families llama.cpp runs"):
        discq.export.to_gguf(model, tmp_path / "x.gguf", tokenizer=tokenizer())
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_file_runs_in_llama_cpp_with_discqs_perplexity(family, method, tmp_path):
    from discq.eval import compare
    from discq.llamacpp import LlamaCppModel
    from discq.tensors.gguf import GGUFGrid
    model, path = exported(family, method, tmp_path)
    emb = model.get_input_embeddings()
    if not hasattr(emb.weight, "format_name"):  # the file rounds an untied one to Q4_0 too
        with torch.no_grad():
            emb.weight.copy_(GGUFGrid("Q4_0").quantize(emb.weight).dequantize())
    g = torch.Generator().manual_seed(3)
    windows = [torch.randint(3, 300, (2, 48), generator=g)]
    ours = compare(model, model, windows, progress=False)
    with LlamaCppModel(path, n_ctx=64) as m:
        theirs = compare(model, m, windows, progress=False)
    # llama.cpp rounds activations to 8 bits in its quantized matmuls: close, not bit for bit
    assert abs(theirs["perplexity"] / ours["perplexity"] - 1) < 0.01, (theirs, ours)
    assert theirs["kl"] < 1e-3  # measured 1e-5 .. 3e-5 (experts and routing included)
