"""Rounding invariants of the affine grid, property by property."""
import math

import pytest
import torch
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.grid import (
    AffineGrid,
    expand_groups,
    fit_groups,
    min_scale,
    neighbours,
    quantize_rows,
    resolved_group_size,
    to_rows,
)
from discq.tensors.packing import pack_codes, packed_width, unpack_codes
from hypothesis import given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def grids_and_weights(draw):
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    N = draw(st.integers(1, 24))
    K = draw(st.integers(1, 40))
    group_size = draw(st.one_of(st.none(), st.integers(1, 48)))
    grid = AffineGrid(bits, group_size, draw(st.booleans()),
                      draw(st.sampled_from(["input", "output"])),
                      draw(st.sampled_from([torch.float16, torch.float32, None])))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * scale
    return grid, W


def _row_params(q: AffineQuantizedTensor, grid: AffineGrid):
    """Per-weight step and zero in row form."""
    C = to_rows(q.dequantize(), grid).shape[1]
    g = q.group_size
    s = expand_groups(q.scale.float(), g, C)
    z = grid.zero_sym if q.zero_point is None else expand_groups(q.zero_point.float(), g, C)
    return s, z


@SETTINGS
@given(grids_and_weights())
def test_dequantized_values_lie_on_their_groups_grid(case):
    grid, W = case
    q = AffineQuantizedTensor.from_hp(W, grid)
    Wq = to_rows(q.dequantize(), grid)
    s, z = _row_params(q, grid)
    k = Wq / s + z  # grid index of every value: must be an integer in [0, qmax]
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert k.round().min() >= 0 and k.round().max() <= grid.qmax


@SETTINGS
@given(grids_and_weights())
def test_at_most_2_to_bits_values_per_group_and_codes_in_range(case):
    grid, W = case
    q = AffineQuantizedTensor.from_hp(W, grid)
    codes = to_rows(q.codes(), grid)
    assert codes.max() <= grid.qmax
    R, C = codes.shape
    g = q.group_size
    Wq = to_rows(q.dequantize(), grid)
    for start in range(0, C, g):
        for r in range(min(R, 3)):
            assert Wq[r, start:start + g].unique().numel() <= 2**grid.bits


@SETTINGS
@given(grids_and_weights())
def test_rtn_error_at_most_half_a_step(case):
    grid, W = case
    q = AffineQuantizedTensor.from_hp(W, grid)
    s, z = _row_params(q, grid)
    Wr = to_rows(W, grid)
    err = (to_rows(q.dequantize(), grid) - Wr).abs()
    # a symmetric grid has one level more on the extreme's side: weights beyond the short end
    # (at most the extreme's magnitude) are clipped to it, at most one step away
    k = Wr / s + z
    step = torch.where((k >= -0.5) & (k <= grid.qmax + 0.5), 0.5, 1.0) * s.abs()
    # scales are rounded up when stored in fp16, so even the clipped ends stay within the bound
    tol = step * (1 + 1e-5) + 1e-7 * Wr.abs().amax()
    assert (err <= tol).all(), (err / s.abs()).max()


@SETTINGS
@given(grids_and_weights())
def test_symmetric_grid_puts_each_groups_signed_extreme_on_its_far_level(case):
    """llama.cpp's rule: all 2^bits levels are used and the extreme is represented, exactly
    with fp32 scales, to the scale's own rounding otherwise (no level lies beyond it)."""
    grid, W = case
    grid = AffineGrid(grid.bits, grid.group_size, True, grid.group_along, grid.scale_dtype)
    q = AffineQuantizedTensor.from_hp(W, grid)
    Wr, Wq, codes = (to_rows(t, grid) for t in (W, q.dequantize(), q.codes()))
    g = q.group_size
    for start in range(0, Wr.shape[1], g):
        i = Wr[:, start:start + g].abs().argmax(dim=1, keepdim=True) + start  # [R, 1]
        extreme, decoded = Wr.gather(1, i), Wq.gather(1, i)
        # groups whose scale is above the smallest normal of the scale dtype (else clamped)
        nonzero = extreme.abs() / grid.zero_sym >= min_scale(grid.scale_dtype or W.dtype)
        assert (codes.gather(1, i)[nonzero] == 0).all()  # the level -2^(bits-1)
        rel = 0 if grid.scale_dtype in (torch.float32, None) else 2.0**-10
        assert ((decoded - extreme).abs() <= rel * extreme.abs() + 1e-30)[nonzero].all()


@SETTINGS
@given(st.sampled_from([2, 3, 4, 8]), st.integers(1, 9), st.integers(1, 70), st.integers(0, 99))
def test_pack_unpack_identity_and_exact_size(bits, R, C, seed):
    codes = torch.randint(0, 2**bits, (R, C), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (R, packed_width(C, bits))
    assert packed.shape[1] * 8 <= bits * (C + 7)  # b bits per code, up to 7 codes of padding
    assert torch.equal(unpack_codes(packed, bits, C), codes)


@SETTINGS
@given(grids_and_weights())
def test_linear_equals_matmul_with_dequantized_weight(case):
    grid, W = case
    q = AffineQuantizedTensor.from_hp(W, grid)
    x = torch.randn(3, W.shape[1])
    bias = torch.randn(W.shape[0])
    y = torch.nn.functional.linear(x, q, bias)
    assert torch.allclose(y, x @ q.dequantize().t() + bias, rtol=1e-5, atol=1e-5 * W.abs().max())


@SETTINGS
@given(grids_and_weights())
def test_neighbours_bracket_the_weight(case):
    grid, W = case
    Wr = to_rows(W, grid)
    dtype = torch.float32
    scale, zero = fit_groups(Wr, grid, dtype)
    g = resolved_group_size(grid, Wr.shape[1])
    s = expand_groups(scale, g, Wr.shape[1])
    z = None if zero is None else expand_groups(zero, g, Wr.shape[1])
    down, up = neighbours(Wr, s, z, grid)
    codes, _, _ = quantize_rows(Wr, grid, dtype)
    assert ((codes == down) | (codes == up)).all()  # RTN picks one of the two neighbours
    assert (up.int() - down.int()).max() <= 1


def test_group_size_not_dividing_the_dimension_leaves_a_short_last_group():
    W = torch.randn(4, 576)
    q = AffineQuantizedTensor.from_hp(W, AffineGrid(4, 128))
    assert q.scale.shape == (4, math.ceil(576 / 128))  # torchao refuses this; we don't
    assert (q.dequantize() - W).abs().max() < 0.5


def test_output_grouping_isolates_an_outlier_input_channel():
    torch.manual_seed(0)
    W = torch.randn(256, 64) * 0.02
    W[:, 5] *= 100  # an outlier input channel
    err = {}
    for along in ("input", "output"):
        q = AffineQuantizedTensor.from_hp(W, AffineGrid(3, 64, group_along=along))
        err[along] = (q.dequantize() - W)[:, torch.arange(64) != 5].pow(2).mean()
    assert err["output"] < err["input"] / 10


@pytest.mark.parametrize("bits", [0, 1, 5, 9, 16])
def test_unsupported_bits_raise_value_error(bits):
    with pytest.raises(ValueError, match="bits"):
        AffineGrid(bits=bits)


@pytest.mark.parametrize("bits", [2.5, "3", None, True])
def test_non_integer_bits_raise_type_error(bits):
    with pytest.raises(TypeError, match="bits"):
        AffineGrid(bits=bits)


@pytest.mark.parametrize("group_size", [0, -1, -64])
def test_bad_group_size_raises(group_size):
    with pytest.raises(ValueError, match="group_size"):
        AffineGrid(group_size=group_size)


def test_bad_group_along_raises():
    with pytest.raises(ValueError, match="group_along"):
        AffineGrid(group_along="rows")


@pytest.mark.parametrize("g, C", [(32, 176), (32, 192), (64, 100), (7, 50)])
def test_expand_groups_compiles_to_the_same_values(g, C):
    """Inductor (CPU, torch 2.13) miscomputed `repeat_interleave(g)[:, :C]` when g does not
    divide C; expand_groups must give the same values compiled as eager."""
    t = torch.rand(8, -(-C // g), generator=torch.Generator().manual_seed(C)).half()
    eager = expand_groups(t, g, C)
    assert eager.shape == (8, C) and torch.equal(eager[:, g - 1], t[:, 0])
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(lambda: expand_groups(t, g, C).float())(),
                               eager.float(), rtol=0, atol=0)
