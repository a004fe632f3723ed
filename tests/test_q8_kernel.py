"""The 8-bit-activation CPU kernel (`kernels/affine_q8_cpu.cpp`, `discq::affine_linear_q8`):
the activation rounding's invariants (hypothesis), the kernel against the torch reference
(x rounded the same way, then the float reference) on a grid with an SQNR floor and for any
shape, any number of rows (blocks of 64), its VNNI build against the AVX2 one, the portable
build (`test_cpu_kernel.py`), and the swap in `plain_linears(..., int8_activations=True)`."""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import discq
from discq.inference import plain_linears
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.grid import AffineGrid
from discq.tensors.kernels import affine_cpu
from discq.tensors.kernels.affine_ref import (affine_linear_ref, dequantize_packed,
                                              round_activations)

SQNR_FLOOR_DB = 100.0  # the same x̂ and integer dots: only fp32 summation order differs

needs_kernel = pytest.mark.skipif(not affine_cpu.load(), reason="no C++ compiler for the kernel")


def sqnr_db(y, ref):
    err = (y.float() - ref.float()).pow(2).sum().clamp(min=1e-30)
    return float(10 * torch.log10(ref.float().pow(2).sum().clamp(min=1e-30) / err))


@settings(max_examples=60, deadline=None)
@given(blocks=st.integers(1, 6), rows=st.integers(1, 4), seed=st.integers(0, 2**16),
       scale=st.floats(1e-6, 1e4), zeros=st.integers(0, 31))
def test_rounding_stays_within_half_a_step_of_its_block(blocks, rows, seed, scale, zeros):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, blocks * 32, generator=g) * scale
    x[..., :zeros] = 0  # an all-zero block keeps d = 0 and rounds to zeros
    xh = round_activations(x)
    d = x.view(rows, blocks, 32).abs().amax(-1, keepdim=True) / 127  # [rows, blocks, 1]
    err = (xh - x).view(rows, blocks, 32).abs()
    assert bool((err <= d / 2 * (1 + 1e-5) + 1e-30).all())
    codes = xh.view(rows, blocks, 32) / torch.where(d > 0, d, torch.ones_like(d))
    assert bool((codes.abs() <= 127 + 1e-3).all())
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # every x̂ a multiple of its d
    # the block's largest magnitude is kept exactly (up to one fp32 rounding)
    assert torch.allclose(xh.abs().view(rows, blocks, 32).amax(-1), d[..., 0] * 127, rtol=1e-6)


def test_rounding_is_idempotent_and_scale_equivariant():
    x = torch.randn(3, 96)
    xh = round_activations(x)
    assert torch.equal(round_activations(xh), xh)
    assert torch.allclose(round_activations(4 * x), 4 * xh)  # a power of two: exact


def case(N, K, M, bits, g, sym, scale_dtype=torch.float16, bias=True, seed=0):
    torch.manual_seed(seed)
    W, x = torch.randn(N, K), torch.randn(M, K)
    b = torch.randn(N) if bias else None
    q = AffineQuantizedTensor.from_hp(W, AffineGrid(bits, g, sym, scale_dtype=scale_dtype))
    return x, (q.qdata, q.scale, q.zero_point, b, bits, q.group_size, False, K)


def op_and_ref(x, args):
    y = torch.ops.discq.affine_linear_q8(x, *args)
    return y, affine_linear_ref(round_activations(x), *args)


@needs_kernel
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kernel_matches_the_reference_on_a_grid(bits):
    # N = 42: the one-row path's tiles of four leave two rows; M up to 5: tiles of 4 rows + tail
    low = {}
    for g, M, sym, K in itertools.product([32, 64, 128], [1, 2, 3, 4, 5, 16], [False, True],
                                          [128, 96, 160]):
        x, args = case(42, K, M, bits, min(g, K), sym)
        y, ref = op_and_ref(x, args)
        assert y.shape == (M, 42) and y.dtype == x.dtype
        if (db := sqnr_db(y, ref)) < SQNR_FLOOR_DB:
            low[(g, M, sym, K)] = db
    assert not low, low


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 70), blocks=st.integers(1, 12), M=st.integers(1, 9),
       bits=st.sampled_from([2, 3, 4, 8]), g_blocks=st.integers(1, 4), sym=st.booleans(),
       bias=st.booleans(), scale_dtype=st.sampled_from([torch.float16, torch.bfloat16,
                                                        torch.float32]),
       seed=st.integers(0, 2**16))
def test_kernel_equals_reference_for_any_shape(N, blocks, M, bits, g_blocks, sym, bias,
                                               scale_dtype, seed):
    K = 32 * blocks
    x, args = case(N, K, M, bits, min(32 * g_blocks, K), sym, scale_dtype, bias, seed)
    y, ref = op_and_ref(x, args)
    # fp32 dot products in another order (the kernel sums Σ q·x̂ and the zero point's z·Σx̂
    # apart): within a few ulps of the sum of |terms|, however much the terms cancel
    W = dequantize_packed(*args[:3], bits, args[5], False, K, torch.float32)
    scale_of_terms = round_activations(x).abs() @ (W.abs() + args[1].float().abs().amax()
                                                   * 2 ** bits).t()
    assert bool(((y - ref).abs() <= 1e-6 * scale_of_terms + 1e-6).all())


@needs_kernel
@pytest.mark.parametrize("M", [65, 130])  # above 64 rows: blocks of 64 rows, one after another
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_many_rows_run_in_row_blocks_and_each_row_is_its_own(bits, M):
    x, args = case(40, 128, M, bits, 32, False)
    y, ref = op_and_ref(x, args)
    assert y.shape == (M, 40) and sqnr_db(y, ref) > SQNR_FLOOR_DB
    # a row's output has the same bits alone and in any tile of any row block (a prefill and
    # the decode steps that follow it agree exactly)
    for i in (0, 3, 63, 64, M - 1):
        assert torch.equal(y[i:i + 1], torch.ops.discq.affine_linear_q8(x[i:i + 1], *args))


@needs_kernel
def test_bf16_activations_come_back_in_bf16():
    x, args = case(24, 64, 3, 4, 32, False)
    y = torch.ops.discq.affine_linear_q8(x.bfloat16(), *args)
    assert y.dtype == torch.bfloat16
    assert sqnr_db(y, affine_linear_ref(round_activations(x.bfloat16()).float(), *args)) > 40


AVX2_BUILD = textwrap.dedent("""
    import sys, torch, discq
    from discq.tensors.kernels import affine_cpu
    assert affine_cpu._vnni_flags() == [] and affine_cpu.load()
    cases = torch.load(sys.argv[1], weights_only=True)
    torch.save([torch.ops.discq.affine_linear_q8(x, *args) for x, args in cases], sys.argv[2])
""")


@needs_kernel
def test_the_vnni_build_gives_the_avx2_builds_bits(tmp_path):
    # CPUs with AVX-VNNI/AVX512-VNNI get vpdpbusd where AVX2 has maddubs + madd (and, with
    # AVX-512's 32 registers, wider tiles): the same integers, summed in the same order. On a
    # CPU without VNNI both builds are the AVX2 one and this checks a second process's bits.
    cases = [case(40, 160, M, bits, g, sym, seed=M)
             for bits, M, g, sym in [(2, 1, 32, True), (3, 5, 64, False), (4, 16, 32, True),
                                     (4, 70, 64, False), (8, 3, 32, False)]]
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "DISCQ_CPU_KERNEL": "avx2"}
    done = subprocess.run([sys.executable, "-c", AVX2_BUILD, str(tmp_path / "cases.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for (x, args), y in zip(cases, torch.load(tmp_path / "y.pt", weights_only=True)):
        assert torch.equal(torch.ops.discq.affine_linear_q8(x, *args), y)


def test_where_the_kernel_cannot_serve_the_reference_answers(monkeypatch):
    monkeypatch.setattr(affine_cpu, "load", lambda build=True: False)
    x, args = case(24, 96, 2, 4, 32, True)
    y, ref = op_and_ref(x, args)
    assert sqnr_db(y, ref) > SQNR_FLOOR_DB
    # output grouping is not the kernel's layout either
    q = AffineQuantizedTensor.from_hp(torch.randn(24, 64), AffineGrid(4, 32, False, "output"))
    y = torch.ops.discq.affine_linear_q8(x[:, :64], q.qdata, q.scale, q.zero_point, None, 4, 32,
                                         True, 64)
    assert torch.allclose(y, round_activations(x[:, :64]) @ q.dequantize().t(), atol=1e-4)


def test_inputs_not_in_blocks_of_32_are_refused_with_the_fix():
    x, args = case(8, 40, 1, 4, 8, True)
    with pytest.raises(ValueError, match="blocks of 32.*float activations"):
        torch.ops.discq.affine_linear_q8(x, *args)


@needs_kernel
def test_plain_linears_swap_to_8_bit_activations():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))
    discq.quantize_(model, discq.rtn_config(4, 16))
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(plain_linears(model)(x), model(x))
        view = plain_linears(model, int8_activations=True)
        # 48 inputs are not whole blocks of 32: that layer keeps float activations
        assert view[0].op is torch.ops.discq.affine_linear_q8.default
        assert view[2].op is torch.ops.discq.affine_linear.default
        h = torch.relu(torch.ops.discq.affine_linear_q8(x, *_args(model[0])))
        ref = torch.ops.discq.affine_linear(h, *_args(model[2]))
        y, y_float = view(x), model(x)
    assert torch.allclose(y, ref, atol=1e-5)
    assert 0 < (y - y_float).abs().max() < 0.05 * y_float.abs().max()


def _args(linear):
    w = linear.weight
    return (w.qdata, w.scale, w.zero_point, linear.bias, w.bits, w.group_size,
            w.group_along == "output", w.shape[1])
