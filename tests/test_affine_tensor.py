"""The packed tensor subclass as a user meets it: nn.Linear, compile, export, to/clone/detach."""
import pytest
import torch
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.grid import AffineGrid
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn


def _quantized_linear(K=96, N=40, grid=AffineGrid(3, 32), bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    lin.weight = nn.Parameter(AffineQuantizedTensor.from_hp(lin.weight, grid), requires_grad=False)
    return lin


def test_packed_codes_cost_bits_per_weight():
    q = AffineQuantizedTensor.from_hp(torch.randn(64, 512), AffineGrid(3, 64))
    assert q.qdata.numel() * 8 == 3 * 64 * 512  # 3 bits per weight, really packed
    assert q.storage_bits() / q.numel() == pytest.approx(3 + (16 + 8) / 64)  # fp16 scale, u8 zero


def test_repr_shows_bits_group_and_shape():
    r = repr(AffineQuantizedTensor.from_hp(torch.randn(8, 64), AffineGrid(2, 32)))
    assert "bits=2" in r and "group_size=32" in r and "(8, 64)" in r


def test_detach_clone_to_keep_values():
    q = AffineQuantizedTensor.from_hp(torch.randn(8, 64), AffineGrid(4, 16))
    for t in (q.detach(), q.clone(), q.to("cpu")):
        assert isinstance(t, AffineQuantizedTensor)
        assert torch.equal(t.dequantize(), q.dequantize())
    half = q.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half.qdata, q.qdata)


def test_linear_module_inference_and_grad_to_activations():
    lin = _quantized_linear()
    x = torch.randn(2, 5, 96, requires_grad=True)
    y = lin(x)
    assert y.shape == (2, 5, 40) and not lin.weight.requires_grad
    y.sum().backward()
    W = lin.weight.dequantize()
    assert torch.allclose(x.grad, torch.ones(2, 5, 40) @ W, atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(st.sampled_from([2, 3, 4, 8]), st.sampled_from([None, 24, 32]),
       st.sampled_from(["input", "output"]), st.booleans())
def test_compile_fullgraph_equals_eager(bits, group_size, along, symmetric):
    torch._dynamo.reset()
    lin = _quantized_linear(grid=AffineGrid(bits, group_size, symmetric, along))
    x = torch.randn(3, 96)
    with torch.no_grad():
        eager = lin(x)
        compiled = torch.compile(lin, fullgraph=True)(x)
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-4)


def test_export_has_one_quantized_node_and_matches_eager(tmp_path):
    lin = _quantized_linear()
    x = torch.randn(4, 96)
    ep = torch.export.export(lin, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.discq.affine_linear.default in targets
    assert torch.ops.aten.linear.default not in targets
    torch.export.save(ep, tmp_path / "lin.pt2")
    loaded = torch.export.load(tmp_path / "lin.pt2")
    with torch.no_grad():
        assert torch.allclose(loaded.module()(x), lin(x), atol=1e-5)



def test_flatten_and_compiled_code_follow_a_reassigned_field():
    # __tensor_flatten__ caches its answer (compiled calls flatten every weight twice per call):
    # a field set afterwards must show, and compiled code must see the new weight
    lin = _quantized_linear(K=64, N=8, grid=AffineGrid(4, 16), bias=False)
    w, x = lin.weight, torch.randn(2, 64)
    f = torch.compile(lin)
    with torch.no_grad():
        y0 = f(x)
        assert "lowrank_u" not in w.__tensor_flatten__()[0]
        w.lowrank_u, w.lowrank_v = torch.randn(8, 2), torch.randn(2, 64)  # a LoRC correction
        assert w.__tensor_flatten__()[0][-2:] == ["lowrank_u", "lowrank_v"]
        y1 = f(x)
    assert torch.allclose(y1, x @ w.dequantize().t(), atol=1e-5)
    assert not torch.allclose(y1, y0, atol=1e-3)
