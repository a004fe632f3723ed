"""LDLQ / BlockLDLQ: the block LDL factorization, equality with GPTQ, coordinate-descent refinement."""
import pytest
import torch
from discq.passes.gptq import proxy_loss
from discq.passes.gptq_core import gptq_quantize
from discq.passes.ldlq import block_ldl, ldlq, refine
from discq.tensors.grid import AffineGrid, decode, dequantize_rows, encode, fit_scale
from hypothesis import given, settings
from hypothesis import strategies as st


def _random_pd(K: int, seed: int) -> torch.Tensor:
    """A damped Hessian of correlated inputs (as GPTQ would use it)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * K, K, generator=g) @ torch.randn(K, K, generator=g)
    H = X.t() @ X / X.shape[0]
    return H + 0.01 * H.diagonal().mean() * torch.eye(K)


def _scalar_quantizer(W: torch.Tensor, bits: int):
    """Per-row affine grid fitted on W, applied to any block of columns."""
    grid = AffineGrid(bits, None, scale_dtype=torch.float32)
    scale, zero = fit_scale(W, grid, torch.float32)
    return lambda w, b: decode(encode(w, scale, zero, grid), scale, zero, grid)


def _lattice_quantizer(step: float):
    """A stand-in vector quantizer: the nearest point of step·D_g (integer points, even sum)."""
    def q(w, b):
        x = w / step
        r = torch.round(x)
        odd = r.sum(-1).remainder(2) == 1
        worst = (x - r).abs().argmax(-1, keepdim=True)  # fix parity on the costliest coordinate
        flip = torch.where(torch.gather(x - r, -1, worst) > 0, 1.0, -1.0)
        r = torch.where(odd[:, None], r.scatter_add(-1, worst, flip), r)
        return r * step
    return q


@settings(max_examples=20, deadline=None)
@given(st.integers(4, 40), st.sampled_from([2, 3, 4]), st.integers(0, 10**6))
def test_ldlq_with_a_scalar_grid_equals_gptq_without_act_order(K, bits, seed):
    H = _random_pd(K, seed)  # damped once, used by both
    W = torch.randn(16, K, generator=torch.Generator().manual_seed(seed + 1))
    ldl = ldlq(W, H, _scalar_quantizer(W, bits))
    grid = AffineGrid(bits, None, scale_dtype=torch.float32)
    codes, s, z, _ = gptq_quantize(W, H, grid, damp=1e-12, act_order=False,
                                scale_dtype=torch.float32)
    gptq = dequantize_rows(codes, s, z, grid, torch.float32)
    assert torch.allclose(ldl, gptq, atol=1e-4 * W.abs().max())


def test_block_ldl_factorizes_h():
    H = _random_pd(16, 5).double()
    for g in (1, 4, 8):
        UI = block_ldl(H, g)
        D = torch.linalg.solve(UI, H) @ torch.linalg.inv(UI).t()
        block = torch.block_diag(*[torch.ones(g, g)] * (16 // g)).bool()
        assert torch.allclose(UI.diagonal(), torch.ones(16, dtype=torch.float64))
        assert torch.allclose(torch.triu(UI, 1)[block], torch.zeros_like(UI[block]), atol=1e-9)
        assert D[~block].abs().max() < 1e-8  # D is block diagonal


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([1, 2, 4, 8]), st.sampled_from([0.3, 1.0]), st.integers(1, 3),
       st.integers(0, 10**6))
def test_refinement_never_raises_the_proxy_loss(g, step, passes, seed):
    H = _random_pd(16, seed)
    W = torch.randn(12, 16, generator=torch.Generator().manual_seed(seed + 1))
    q = _lattice_quantizer(step)
    start = ldlq(W, H, q, g)
    refined = refine(W, start, H, q, g, passes)
    assert proxy_loss(W, refined, H) <= proxy_loss(W, start, H) * (1 + 1e-5) + 1e-6


def test_refinement_moves_to_the_best_continuous_block():
    # with no rounding, one block covering every column lands on W itself, and column-wise
    # passes (Gauss-Seidel on a positive definite quadratic) converge to it
    H = _random_pd(12, 0)
    W, start = torch.randn(5, 12), torch.randn(5, 12)
    same = lambda w, b: w
    assert torch.allclose(refine(W, start, H, same, g=12), W, atol=1e-4)
    loss = [proxy_loss(W, refine(W, start, H, same, g=1, passes=p), H) for p in (0, 1, 20)]
    assert loss[2] < loss[1] < loss[0] and loss[2] < 1e-2 * loss[0]


def test_refinement_improves_blockldlq_at_two_bits():
    H, W = _random_pd(32, 1), torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    q = _lattice_quantizer(0.8)
    start = ldlq(W, H, q, g=8)
    assert proxy_loss(W, ldlq(W, H, q, g=8, passes=3), H) < 0.99 * proxy_loss(W, start, H)


@pytest.mark.parametrize("kw", [{"g": 5}, {"g": 0}, {"passes": -1}])
def test_bad_ldlq_arguments(kw):
    H = _random_pd(8, 0)
    with pytest.raises(ValueError):
        ldlq(torch.randn(2, 8), H, lambda w, b: w, **kw)


def test_indefinite_hessian_is_refused():
    H = torch.eye(4)
    H[0, 1] = H[1, 0] = 2.0
    with pytest.raises(ValueError, match="positive definite"):
        ldlq(torch.randn(2, 4), H, lambda w, b: w)
