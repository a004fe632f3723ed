"""compressed-tensors export (vLLM's and transformers' `pack-quantized`), checked with the real
readers: the `compressed-tensors` package unpacks discq's words to discq's codes and decompresses
asymmetric directories to discq's weights, and transformers loads symmetric ones (compressed-tensors
installed) with discq's weights."""
import copy

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.grid import AffineGrid
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import discq

IDS = torch.arange(7, 7 + 48).reshape(2, 24)


def _not_head(m, fqn):
    return isinstance(m, nn.Linear) and fqn != "lm_head"


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([4, 8]), st.integers(1, 9), st.sampled_from([32, 64, 96]),
       st.sampled_from([16, 32]), st.integers(0, 999))
def test_packed_words_unpack_in_compressed_tensors_to_discqs_codes(bits, N, K, g, seed):
    from discq.export.compressed import _ct_tensors
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    w = AffineQuantizedTensor.from_hp(W, AffineGrid(bits, g, symmetric=True))
    model = nn.Sequential(nn.Linear(K, N, bias=False))
    model[0].weight = nn.Parameter(w, requires_grad=False)
    tensors, _ = _ct_tensors(model)
    theirs = unpack_from_int32(tensors["0.weight_packed"], bits, torch.Size([N, K]))
    assert torch.equal(theirs.int(), w.codes().int() - 2 ** (bits - 1))  # signed, as they store
    assert torch.equal(tensors["0.weight_scale"], w.scale)


@pytest.mark.parametrize("bits", [4, 8])
def test_transformers_loads_it_with_discqs_weights(tiny_llama, tmp_path, bits):
    model = copy.deepcopy(tiny_llama[0])
    discq.quantize_(model, discq.rtn_config(bits=bits, group_size=32, symmetric=True),
                    filter_fn=_not_head)
    out = discq.export.to_compressed_tensors(model, tmp_path / "ct", tokenizer=tiny_llama[1])
    assert not any(k.endswith(".weight") and "layers" in k and "norm" not in k
                   for k in load_file(out / "model.safetensors"))  # only packed linears
    back = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        theirs, ours = back(IDS).logits, model(IDS).logits  # decompressed on the first forward
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    down = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(back.model.layers[1].mlp.down_proj.weight, down.dequantize())


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_directories_decompress_in_compressed_tensors_to_discqs_weights(
        tiny_llama, tmp_path, bits):
    """Zero points packed along the rows, as llm-compressor writes them and vLLM reads them;
    compressed-tensors' own decompressor gives discq's values bit for bit (transformers' loader
    cannot load any asymmetric pack-quantized checkpoint yet: llm-compressor issue #1618)."""
    import json

    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationScheme
    model = copy.deepcopy(tiny_llama[0])
    discq.quantize_(model, discq.rtn_config(bits=bits, group_size=32), filter_fn=_not_head)
    out = discq.export.to_compressed_tensors(model, tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["symmetric"] is False
    scheme = QuantizationScheme.model_validate(group)
    tensors = load_file(out / "model.safetensors")
    for fqn, m in model.named_modules():
        if isinstance(m.__dict__.get("_parameters", {}).get("weight"), AffineQuantizedTensor):
            part = {k.removeprefix(f"{fqn}."): v for k, v in tensors.items()
                    if k.startswith(f"{fqn}.weight_")}
            theirs = PackedQuantizationCompressor.decompress(part, scheme)["weight"]
            # they decode in the scales' dtype (fp16): (q - z)·scale rounded once, as ours
            assert torch.equal(theirs, m.weight.dequantize(theirs.dtype)), fqn


@pytest.mark.parametrize("config", [discq.rtn_config(bits=3, group_size=32, symmetric=True),
                                    discq.rtn_config(bits=4, group_size=32, symmetric=True,
                                                     group_along="output")])
def test_weights_it_cannot_hold_are_refused_with_the_fix(tiny_llama, tmp_path, config):
    model = copy.deepcopy(tiny_llama[0])
    discq.quantize_(model, config, filter_fn=_not_head)
    with pytest.raises(ValueError, match="4- or 8-bit weights grouped along the input"):
        discq.export.to_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


# ---- every family: names as the checkpoint stores them ----------------------------------------

FAMILY_CT = [f for f in __import__("families").FAMILIES if f != "gpt_oss"]


@pytest.mark.parametrize("family", FAMILY_CT)
def test_every_family_is_written_under_its_checkpoints_names(family, tmp_path):
    """The directory's tensors are the family's own checkpoint tensors (what save_pretrained
    writes for the fp model, experts one per expert), each quantized linear as its parts;
    transformers loads it back to discq's values (experts decompressed to fp16 on load)."""
    from discq.pipeline import keep_head_filter
    from families import tiny_family
    model = tiny_family(family)
    model.save_pretrained(tmp_path / "fp")
    fp_keys = set(load_file(tmp_path / "fp" / "model.safetensors"))
    discq.quantize_(model, discq.rtn_config(4, 32, symmetric=True),
                    filter_fn=keep_head_filter(model))
    out = discq.export.to_compressed_tensors(model, tmp_path / "ct")
    ct_keys = set(load_file(out / "model.safetensors"))
    packed = {k.removesuffix("_packed") for k in ct_keys if k.endswith(".weight_packed")}
    assert packed and packed <= fp_keys
    assert {k for k in ct_keys if not k.endswith(("_packed", "_scale", "_shape"))} \
        == fp_keys - packed
    if family == "gpt2":  # transformers' compressed-tensors loader has no Conv1D path
        return
    back = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=2e-3, rtol=1e-3)


def test_experts_of_a_stacked_checkpoint_are_refused_with_the_alternative(tmp_path):
    from families import tiny_family
    model = tiny_family("gpt_oss")
    discq.quantize_(model, discq.rtn_config(4, 32, symmetric=True))
    with pytest.raises(ValueError, match="to_gguf"):
        discq.export.to_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
