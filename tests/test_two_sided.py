"""Rounding with both Kronecker factors (passes/two_sided.py and each method's use of it):
never worse than one-sided LDLQ on the Kronecker proxy with the same quantizer, equal to it
when the output side is the identity, and better where the output side is far from it."""
import discq
import pytest
import torch
from discq.passes.gptq import gptq_layer
from discq.passes.gptvq import gptvq_layer
from discq.passes.ldlq import ldlq
from discq.passes.two_sided import SHRINK, damped, kron_loss, round_two_sided, row_bounds
from hypothesis import given, settings
from hypothesis import strategies as st


def psd(n: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    A = torch.randn(n, rank, generator=gen)
    return A @ A.t() / rank + 0.01 * torch.eye(n)


def integer_ldlq(H_in):
    def round_rows(target, rows):
        What = ldlq(target, H_in + 0.01 * H_in.diagonal().mean() * torch.eye(len(H_in)),
                    lambda x, b: torch.round(x))
        return What, What
    return round_rows


@settings(max_examples=25, deadline=None)
@given(N=st.integers(2, 40), K=st.integers(2, 24), rows=st.integers(1, 40),
       rank_out=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_never_worse_than_one_sided(N, K, rows, rank_out, seed):
    gen = torch.Generator().manual_seed(seed)
    W = 3 * torch.randn(N, K, generator=gen)
    H_in, H_out = psd(K, K + 3, gen), psd(N, rank_out, gen)
    round_rows = integer_ldlq(H_in)
    What = torch.cat(round_two_sided(W, H_in, H_out, round_rows, rows=rows))
    one = round_rows(W, slice(None))[1]
    assert What.shape == W.shape and torch.equal(What, torch.round(What))  # on the grid
    H_proxy = damped(H_out, SHRINK)  # the proxy it rounds for: the sketch shrunk
    assert kron_loss(W, What, H_in, H_proxy) <= kron_loss(W, one, H_in, H_proxy)
    assert torch.equal(torch.cat(round_two_sided(W, H_in, H_out, round_rows, rows=0)), one)


def test_feedback_along_the_output_side_pays_where_it_is_far_from_the_identity():
    gen = torch.Generator().manual_seed(0)
    W = 2 * torch.randn(128, 96, generator=gen)
    H_in, H_out = psd(96, 200, gen), psd(128, 20, gen)
    round_rows = integer_ldlq(H_in)
    one = kron_loss(W, round_rows(W, slice(None))[1], H_in, H_out)
    losses = [kron_loss(W, torch.cat(round_two_sided(W, H_in, H_out, round_rows, rows=r,
                                                     shrink=0.01)), H_in, H_out)
              for r in (64, 16, 4)]
    assert losses[0] < 0.7 * one and losses[2] < losses[1] < losses[0]


def test_row_blocks_are_whole_units():
    assert row_bounds(100, 30, unit=16) == [0, 32, 64, 96, 100]
    assert row_bounds(64, 1, unit=16) == [0, 16, 32, 48, 64]
    assert row_bounds(48, 64) == [0, 48]


GPTQ = {
    "input": dict(bits=3, group_size=16),
    "output": dict(bits=3, group_size=8, group_along="output"),
    "symmetric": dict(bits=4, group_size=16, symmetric=True, act_order=False),
    "gguf": dict(gguf="Q4_0"),
}


@pytest.mark.parametrize("kind", GPTQ)
def test_gptq_with_identity_output_side_is_gptq(kind):
    """H_out = I: no feedback between rows, every row block GPTQ's own rows: the same codes,
    scales and zero points as one-sided GPTQ, however the pieces are cut and joined."""
    gen = torch.Generator().manual_seed(1)
    W, H = torch.randn(40, 64, generator=gen), psd(64, 80, gen)
    cfg = discq.gptq_config(**GPTQ[kind], hessian="kl", kl_rows=8)
    a = gptq_layer(W, H, cfg, "x", H_out=torch.eye(40))
    b = gptq_layer(W, H, cfg, "x")
    assert torch.equal(a.dequantize(), b.dequantize())


def layer_losses(quantize, N: int, K: int, seed: int = 2):
    """Kronecker loss of `quantize(W, H_in, H_out)` and of the one-sided `quantize(W, H_in,
    None)`, on a weight whose output side is far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen)
    H_in, H_out = psd(K, 2 * K, gen), psd(N, max(2, N // 8), gen)
    two = kron_loss(W, quantize(W, H_in, H_out).dequantize(torch.float32), H_in, H_out)
    one = kron_loss(W, quantize(W, H_in, None).dequantize(torch.float32), H_in, H_out)
    return two, one


ROUNDERS = {
    "gptq": (lambda W, H, Ho: gptq_layer(W, H, discq.gptq_config(2, 16, hessian="kl", kl_rows=8), "x", Ho),
             64, 64),
    "gptq-incoherent": (lambda W, H, Ho: gptq_layer(
        W, H, discq.gptq_config(2, 16, incoherence=True, hessian="kl", kl_rows=8), "x", Ho), 64, 64),
    "gptvq": (lambda W, H, Ho: gptvq_layer(
        W, H, discq.gptvq_config(2, 1, group_size=512, kmeans_iters=5, hessian="kl",
                                         kl_rows=8), "x", Ho),
        64, 64),
}


@pytest.mark.parametrize("method", ROUNDERS)
def test_each_format_gains_from_the_output_side(method):
    quantize, N, K = ROUNDERS[method]
    two, one = layer_losses(quantize, N, K)
    assert two < 0.9 * one


@pytest.mark.parametrize("method", ["quip-sharp", "qtip"])
def test_rotated_formats_gain_from_the_output_side(method):
    from discq.passes import qtip, quip_sharp
    if method == "qtip":
        cfg = discq.qtip_config(2, finetune=False, state_bits=8, hessian="kl", kl_rows=16)
        group = qtip.quantize_group
    else:
        cfg = discq.quip_sharp_config(2, finetune=False, refine_passes=0, hessian="kl",
                                       kl_rows=16)
        group = quip_sharp.quantize_group

    def quantize(W, H, Ho):
        return group([("x", W)], H, cfg, Ho)[0]
    two, one = layer_losses(quantize, 64, 64)
    assert two < 0.9 * one


def test_rotated_group_of_several_refuses_two_sided():
    from discq.passes import quip_sharp
    cfg = discq.quip_sharp_config(2, finetune=False)
    W = torch.randn(16, 32)
    with pytest.raises(ValueError, match="one weight"):
        quip_sharp.quantize_group([("a", W), ("b", W)], torch.eye(32), cfg, torch.eye(16))


@pytest.mark.parametrize("bad,match", [({"hessian": "fisher"}, "hessian must be one of"),
                                       ({"hessian": "kl", "kl_rows": -1}, "kl_rows"),
                                       ({"kl_rows": 16}, "set hessian='kl'")])
def test_bad_options(bad, match):
    for make in (discq.gptq_config, discq.gptvq_config, discq.quip_sharp_config,
                 discq.qtip_config):
        with pytest.raises(ValueError, match=match):
            make(**bad)
