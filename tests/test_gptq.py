"""GPTQ: properties of the rounding, the layer-by-layer driver, and errors."""
import copy

import pytest
import torch
from discq.passes import gptq_config
from discq.passes.gptq import proxy_loss
from discq.passes.gptq_core import gptq_quantize
from discq.tensors.grid import (
    AffineGrid,
    dequantize_rows,
    from_rows,
    quantize_rows,
    to_rows,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_random_llama

import discq


@st.composite
def gptq_cases(draw):
    N, K = draw(st.integers(1, 12)), draw(st.integers(2, 70))
    grid = AffineGrid(draw(st.sampled_from([2, 3, 4, 8])), draw(st.sampled_from([None, 8, 16, 24])),
                      draw(st.booleans()), draw(st.sampled_from(["input", "output"])))
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(draw(st.integers(0, 10**6))))
    return W, grid, draw(st.booleans()), draw(st.sampled_from([4, 16, 128]))


@settings(max_examples=60, deadline=None)
@given(gptq_cases())
def test_with_identity_hessian_gptq_equals_rtn_exactly(case):
    W, grid, act_order, block = case
    codes, scale, zero, _ = gptq_quantize(W, torch.eye(W.shape[1]), grid, act_order=act_order,
                                       block_size=block)
    rtn_codes, rtn_scale, rtn_zero = quantize_rows(to_rows(W, grid), grid, torch.float16)
    assert torch.equal(codes, from_rows(rtn_codes, grid))
    assert torch.equal(scale, rtn_scale)
    assert (zero is None and rtn_zero is None) or torch.equal(zero, rtn_zero)


def _random_pd(K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * K, K, generator=g) @ torch.randn(K, K, generator=g)  # correlated inputs
    return X.t() @ X / X.shape[0] + 1e-3 * torch.eye(K)


@settings(max_examples=25, deadline=None)
@given(st.integers(8, 48), st.sampled_from([2, 3, 4]), st.sampled_from([None, 8, 16]),
       st.sampled_from(["input", "output"]), st.booleans(), st.integers(0, 10**6))
def test_gptq_proxy_loss_never_above_rtn(K, bits, g, along, act_order, seed):
    # GPTQ is greedy, so a single row can lose to RTN by chance; summed over 64 rows (a real
    # layer has hundreds) its expected advantage dominates, and that is the claim we test.
    H = _random_pd(K, seed)
    W = torch.randn(64, K, generator=torch.Generator().manual_seed(seed + 1))
    grid = AffineGrid(bits, g, False, along, torch.float32)
    codes, scale, zero, _ = gptq_quantize(W, H, grid, act_order=act_order, scale_dtype=torch.float32)
    Wg = from_rows(dequantize_rows(to_rows(codes, grid), scale, zero, grid, torch.float32), grid)
    rc, rs, rz = quantize_rows(to_rows(W, grid), grid, torch.float32)
    Wr = from_rows(dequantize_rows(rc, rs, rz, grid, torch.float32), grid)
    assert proxy_loss(W, Wg, H) <= proxy_loss(W, Wr, H) * (1 + 1e-6)


def test_dead_columns_are_zeroed():
    H = _random_pd(16, 0)
    H[3, :] = 0
    H[:, 3] = 0
    W = torch.randn(8, 16) + 5
    codes, scale, zero, _ = gptq_quantize(W, H, AffineGrid(4, None), scale_dtype=torch.float32)
    grid = AffineGrid(4, None, scale_dtype=torch.float32)
    Wq = dequantize_rows(codes, scale, zero, grid, torch.float32)
    assert Wq[:, 3].abs().max() <= scale.max() / 2 + 1e-6


def test_indefinite_hessian_retries_with_more_damping():
    H = torch.eye(12)
    H[0, 1] = H[1, 0] = 1.5  # not positive definite
    with pytest.warns(UserWarning, match="damp"):
        gptq_quantize(torch.randn(4, 12), H, AffineGrid(4, None))


def test_gptq_beats_rtn_on_the_trained_fixture(tiny_llama, tiny_calibration, tiny_windows):
    from discq.eval import perplexity
    model, _ = tiny_llama
    ppl = {}
    for name, cfg in [("rtn", discq.rtn_config(3, 32)),
                      ("gptq", gptq_config(3, 32, calibration=tiny_calibration))]:
        q = copy.deepcopy(model)
        discq.quantize_(q, cfg)
        ppl[name] = perplexity(q, tiny_windows, progress=False)
    ppl["fp"] = perplexity(model, tiny_windows, progress=False)
    # GPTQ may even land below fp on held-out text (it did: 9.168 vs 9.177); what must hold is
    # that it keeps most of the way from RTN back to the original model
    assert ppl["gptq"] < ppl["rtn"], ppl
    assert ppl["gptq"] - ppl["fp"] < 0.5 * (ppl["rtn"] - ppl["fp"]), ppl


def test_auto_grouping_is_never_worse_than_either_direction():
    H = _random_pd(32, 3)
    W = torch.randn(24, 32)
    W[:, 7] *= 30  # an outlier input channel
    from discq.passes.gptq import gptq_layer
    losses = {}
    for along in ("input", "output", "auto"):
        q = gptq_layer(W, H, gptq_config(3, 8, group_along=along))
        losses[along] = proxy_loss(W, q.dequantize(), H)
    assert losses["auto"] <= min(losses["input"], losses["output"]) + 1e-9


def test_calibration_errors():
    model = tiny_random_llama()
    with pytest.raises(ValueError, match="calibration"):
        discq.quantize_(model, gptq_config(calibration=None))
    with pytest.raises(ValueError, match="empty"):
        discq.quantize_(model, gptq_config(calibration=[]))
    with pytest.raises(TypeError, match="integer"):
        discq.quantize_(model, gptq_config(calibration=[torch.rand(2, 8)]))
    with pytest.raises(ValueError, match="vocabulary"):
        discq.quantize_(model, gptq_config(calibration=[torch.full((2, 8), 5000)]))


def test_mixed_batch_shapes_are_handled():
    model = tiny_random_llama()
    calib = [torch.randint(0, 320, (2, 16)), torch.randint(0, 320, (3, 9)),
             torch.randint(0, 320, (12,))]
    discq.quantize_(model, gptq_config(4, 32, calibration=calib))
    assert discq.bits_per_weight(model) < 5


def test_interrupted_run_leaves_the_model_untouched(monkeypatch):
    model = tiny_random_llama()
    before = {n: p for n, p in model.named_parameters()}
    import discq.passes.gptq as g
    calls = []

    def boom(W, H, config, name="", H_out=None):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(W, H, config, name, H_out)

    real = g.gptq_layer
    monkeypatch.setattr(g, "gptq_layer", boom)
    with pytest.raises(KeyboardInterrupt):
        discq.quantize_(model, gptq_config(4, 32, calibration=[torch.randint(0, 320, (2, 8))]))
    assert all(p is before[n] for n, p in model.named_parameters())


@pytest.mark.parametrize("kw", [{"damp": 0}, {"damp": -1}, {"block_size": 0},
                                {"act_order": "yes"}, {"group_along": "diagonal"}])
def test_bad_gptq_arguments(kw):
    with pytest.raises((ValueError, TypeError)):
        gptq_config(**kw)


def test_same_data_and_config_give_bit_identical_weights():
    calib = [torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))]
    runs = []
    for _ in range(2):
        model = tiny_random_llama(seed=4)
        discq.quantize_(model, gptq_config(3, 32, calibration=calib, incoherence=True))
        runs.append({k: v for k, v in model.state_dict().items()})
    for k, a in runs[0].items():
        b = runs[1][k]
        if hasattr(a, "stored_tensors"):
            assert all(torch.equal(a.stored_tensors()[n], b.stored_tensors()[n])
                       for n in a.stored_tensors())
        else:
            assert torch.equal(a, b)
