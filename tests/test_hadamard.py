"""Randomized Hadamard transforms and incoherent quantization."""
import pytest
import torch
from discq.tensors.grid import AffineGrid
from discq.tensors.hadamard import (
    fwht,
    random_orthogonal,
    random_signs,
    rotate,
    rotate_weight,
    split_size,
    transform,
    unrotate,
)
from discq.tensors.incoherent import IncoherentQuantizedTensor
from hypothesis import given, settings
from hypothesis import strategies as st

import discq

SIZES = [1, 2, 8, 64, 12, 20 * 4, 576, 1536, 12 * 2**5]


@pytest.mark.parametrize("n", SIZES)
def test_transform_is_orthogonal(n):
    Q = random_orthogonal(split_size(n)[0], 0, torch.float64)
    T = transform(torch.eye(n, dtype=torch.float64), Q)  # rows: T applied to basis vectors
    assert torch.allclose(T @ T.t(), torch.eye(n, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("n", [2, 16, 256])
def test_walsh_hadamard_is_its_own_inverse(n):
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(fwht(fwht(x)), x, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(SIZES), st.integers(0, 10**6))
def test_randomized_rotation_round_trip_up_to_the_signs(n, seed):
    s = random_signs(n, seed).double()
    Q = random_orthogonal(split_size(n)[0], seed, torch.float64)
    x = torch.randn(4, n, dtype=torch.float64)
    y = rotate(x, s, Q)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.allclose(unrotate(y, s, Q), x, atol=1e-10)


def test_rotated_weight_computes_the_same_linear_map():
    W, x = torch.randn(24, 576, dtype=torch.float64), torch.randn(5, 576, dtype=torch.float64)
    s_in, s_out = random_signs(576, 1).double(), random_signs(24, 2).double()
    q_in = random_orthogonal(9, 1, torch.float64)
    q_out = random_orthogonal(3, 2, torch.float64)
    Wt = rotate_weight(W, s_out, s_in, q_out, q_in)
    y = unrotate(rotate(x, s_in, q_in) @ Wt.t(), s_out, q_out)
    assert torch.allclose(y, x @ W.t(), atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([2, 3, 4]), st.sampled_from([None, 32]), st.sampled_from([48, 64, 96]),
       st.integers(0, 1000))
def test_incoherent_dequantization_is_within_the_grid_error(bits, g, K, seed):
    W = torch.randn(16, K, generator=torch.Generator().manual_seed(seed))
    q = IncoherentQuantizedTensor.from_hp(W, AffineGrid(bits, g, scale_dtype=torch.float32), seed)
    err_rotated = (q.rotated().dequantize() - rotate_weight(W, q.s_out.float(), q.s_in.float(),
                                                           q.q_out, q.q_in))
    assert (err_rotated.abs() <= q.rotated().scale.max() / 2 + 1e-5).all()
    # the rotation is orthogonal, so the error in the original basis has the same size
    assert torch.isclose((q.dequantize() - W).norm(), err_rotated.norm(), rtol=1e-3)


def test_incoherent_layer_compiles_exports_saves_and_loads(tmp_path):
    from models import tiny_random_llama
    model = tiny_random_llama()
    discq.quantize_(model, discq.rtn_config(3, 32, incoherence=True))
    w = model.model.layers[0].mlp.down_proj.weight
    assert isinstance(w, IncoherentQuantizedTensor)
    N, K = w.shape
    side = 16 * (N + K) + 32 * (split_size(N)[0] ** 2 + split_size(K)[0] ** 2)  # signs, factors
    groups = N * -(-K // 32)  # the last group of 176 = 5.5 x 32 is shorter
    assert w.storage_bits() == 3 * N * K + 24 * groups + side
    x = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        ref = model(x).logits
        assert torch.allclose(torch.compile(model, fullgraph=True)(x).logits, ref, atol=1e-4)
        ep = torch.export.export(model, (x,), kwargs={"use_cache": False})
        torch.export.save(ep, tmp_path / "e.pt2")
        again = torch.export.load(tmp_path / "e.pt2").module()
        assert torch.allclose(again(x, use_cache=False).logits, ref, atol=1e-5)
    discq.save_quantized(model, tmp_path / "m")
    again = discq.load_quantized(tmp_path / "m")
    assert torch.equal(again(x).logits, ref)


def test_incoherence_helps_a_layer_with_an_outlier_channel():
    torch.manual_seed(0)
    W = torch.randn(64, 256) * 0.02
    W[:, 9] = 1.0  # one huge input channel wrecks its groups' scales
    plain = discq.AffineQuantizedTensor.from_hp(W, AffineGrid(3, 64))
    inc = IncoherentQuantizedTensor.from_hp(W, AffineGrid(3, 64))
    assert (inc.dequantize() - W).norm() < 0.8 * (plain.dequantize() - W).norm()
