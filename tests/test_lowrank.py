"""LoRC: the low-rank correction lowers the error and is paid for in bits per weight."""
import pytest
import torch
from discq.passes.lowrank import add_lowrank
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.grid import AffineGrid
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_random_llama
from torch import nn

import discq


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.sampled_from([2, 3, 4]), st.integers(0, 1000))
def test_lowrank_reduces_the_error_and_is_counted(rank, bits, seed):
    W = torch.randn(32, 48, generator=torch.Generator().manual_seed(seed))
    q = AffineQuantizedTensor.from_hp(W, AffineGrid(bits, 16))
    c = add_lowrank(q, W, rank)
    assert (c.dequantize() - W).norm() < (q.dequantize() - W).norm()
    assert c.storage_bits() == q.storage_bits() + 16 * rank * (32 + 48)
    x = torch.randn(3, 48)
    assert torch.allclose(nn.functional.linear(x, c), x @ c.dequantize().t(), atol=1e-4)


def test_lowrank_through_quantize_save_and_load(tmp_path):
    model = tiny_random_llama()
    discq.quantize_(model, discq.gptq_config(3, 32, lowrank=4,
                                             calibration=[torch.randint(0, 320, (2, 16))]))
    w = model.model.layers[0].self_attn.q_proj.weight
    assert w.lowrank_u.shape == (64, 4) and w.lowrank_u.dtype == torch.float16
    discq.save_quantized(model, tmp_path / "m")
    x = torch.randint(0, 320, (1, 8))
    assert torch.equal(discq.load_quantized(tmp_path / "m")(x).logits, model(x).logits)


@pytest.mark.parametrize("kw", [dict(lowrank=-1), dict(lowrank=2.5),
                                dict(lowrank=4, incoherence=True)])
def test_bad_lowrank(kw):
    with pytest.raises((ValueError, TypeError)):
        discq.rtn_config(**kw)
