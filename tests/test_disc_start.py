"""DiscQuant's start from GPTQ (init="gptq") and its keeping of the best rounded point."""
import copy

import pytest
import torch
from discq.passes import disc_config, gptq_config
from discq.passes.gptq_core import gptq_quantize
from discq.tensors.grid import AffineGrid, encode, expand_groups, resolved_group_size, to_rows
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback
from models import tiny_random_llama
from test_disc import FAST, FP32, KillAt, Stop
from test_disc import _calib as calib_batches
from torch import nn

import discq

def _calib():
    return calib_batches(n=8)


def _weights(model):
    return {n: m.weight.dequantize() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and hasattr(m.weight, "codes")}


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([2, 3, 4]), st.sampled_from([None, 8, 16]), st.booleans(),
       st.sampled_from(["input", "output"]), st.booleans(), st.integers(0, 1000))
def test_gptq_codes_are_the_nearest_grid_points_of_the_values_it_rounded(bits, g, sym, along,
                                                                          act_order, seed):
    torch.manual_seed(seed)
    W = torch.randn(12, 32)
    X = torch.randn(64, 32) * torch.rand(32)
    grid = AffineGrid(bits, g, sym, along)
    seen = torch.empty_like(W)
    codes, scale, zero, _ = gptq_quantize(W, X.T @ X, grid, act_order=act_order, seen=seen)
    # the relaxation DiscQuant builds around `seen` starts exactly at GPTQ's codes
    rows, C = to_rows(seen, grid), to_rows(seen, grid).shape[1]
    k = resolved_group_size(grid, C)
    z = None if zero is None else expand_groups(zero, k, C)
    assert torch.equal(encode(rows, expand_groups(scale, k, C), z, grid), to_rows(codes, grid))
    assert not torch.equal(seen, W)  # the error feedback moved the values GPTQ rounded


@pytest.mark.parametrize("init,incoherence", [("gptq", False), ("gptq", True), ("kl", False)])
def test_with_zero_kl_weight_a_gptq_start_ends_at_gptq(init, incoherence):
    """init="kl": GPTQ's codes with KL Hessians (`gptq_config(hessian="kl")`)."""
    calib = _calib()
    gptq = tiny_random_llama()
    hessian = "kl" if init == "kl" else "inputs"
    discq.quantize_(gptq, gptq_config(3, 32, calibration=calib, incoherence=incoherence,
                                      hessian=hessian))
    model = tiny_random_llama()
    discq.quantize_(model, disc_config(3, 32, calibration=calib, steps=12, kl_weight=0,
                                       init=init, incoherence=incoherence, **FAST))
    a, b = _weights(gptq), _weights(model)
    assert len(a) == 15 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # GPTQ's grid and codes, bit for bit


@pytest.mark.parametrize("fail_at", [None, 5])
def test_gptq_starts_leave_the_model_its_own_weights(monkeypatch, fail_at):
    from discq.passes import disc_init
    model = tiny_random_llama()
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and ".layers." in n]
    params = {n: m.weight for n, m in targets}
    before = {n: p.detach().clone() for n, p in params.items()}
    calls, original = [], disc_init._gptq_start

    def start(*args):
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return original(*args)
    monkeypatch.setattr(disc_init, "_gptq_start", start)
    if fail_at:
        with pytest.raises(KeyboardInterrupt):
            disc_init.gptq_starts(model, disc_config(3, 32), targets, _calib())
    else:
        starts = disc_init.gptq_starts(model, disc_config(3, 32), targets, _calib())
        assert starts.keys() == params.keys() and len(calls) == 14
    # GPTQ's rounded weights were only lent: the same parameters, unchanged (the teacher)
    assert all(m.weight is params[n] and torch.equal(m.weight, before[n]) for n, m in targets)


class Codes(Callback):
    """Each relaxed layer's rounding decisions (x ≥ ½) after each step, by global step."""

    def __init__(self):
        self.at = {}

    def _keep(self, trainer, module):
        from discq.passes.disc import Relaxation
        self.at[trainer.global_step] = {n: (m.x >= 0.5).clone() for n, m in
                                        module.model.named_modules() if isinstance(m, Relaxation)}

    def on_train_start(self, trainer, module):
        self._keep(trainer, module)

    def on_train_batch_end(self, trainer, module, *args):
        self._keep(trainer, module)


def test_the_best_scored_point_is_what_discquant_returns(monkeypatch):
    from discq.passes.disc import RelaxedLinear
    from discq.training import disc_module
    scores = iter([0.5, 0.2, 0.3, 0.9, 0.9])  # start, steps 2, 4, 6, 8: the best after 2
    monkeypatch.setattr(disc_module, "rounded_kl", lambda *a: next(scores))
    seen, config = Codes(), dict(calibration=_calib(), steps=8, lr=0.5, **FAST)
    model = tiny_random_llama()
    discq.quantize_(model, disc_config(2, 32, trainer_kwargs={"callbacks": [seen], **FP32},
                                       **config))
    assert next(scores, None) is None  # scored at the start, every quarter and the end
    at2, at8 = seen.at[2], seen.at[8]
    assert len(at2) == 15 and any(not torch.equal(at2[n], at8[n]) for n in at2)  # they moved
    fresh = tiny_random_llama()  # the same weights: the same grid, fitted again
    for name, up in at2.items():
        layer = RelaxedLinear(fresh.get_submodule(name), disc_config(2, 32).grid(fqn=name),
                              "rtn", torch.Generator())
        with torch.no_grad():
            layer.x.copy_(up.float())
        assert torch.equal(model.get_submodule(name).weight.dequantize(),
                           layer.rounded().dequantize()), name


def test_a_gptq_start_never_ends_worse_on_held_out_sequences(tiny_llama, tiny_calibration):
    from discq.training.disc_best import held_out_count
    model, _ = tiny_llama
    seqs = torch.cat(tiny_calibration)
    held = seqs[len(seqs) - held_out_count(len(seqs)):]  # what DiscQuant scores on

    def kl(q):
        with torch.no_grad():
            ref = torch.log_softmax(model(held).logits, -1)
            out = torch.log_softmax(q(held).logits, -1)
        return float((ref.exp() * (ref - out)).sum(-1).mean())

    def run(config):
        q = copy.deepcopy(model)
        discq.quantize_(q, config(calibration=tiny_calibration))
        return kl(q)
    gptq = run(lambda **c: gptq_config(2, 32, **c))
    # a learning rate far too large: the last step's point is worse than GPTQ's ...
    bad = dict(steps=8, lr=5.0, rho=1e4, init="gptq", **FAST)
    assert run(lambda **c: disc_config(2, 32, keep_best=False, **bad, **c)) > gptq
    # ... and what DiscQuant returns is not
    assert run(lambda **c: disc_config(2, 32, **bad, **c)) <= gptq + 1e-6


def test_gptq_start_is_refused_where_gptq_has_no_codes():
    with pytest.raises(ValueError, match="init='gptq'"):
        disc_config(init="gptq", codebook="e8p")
    with pytest.raises(ValueError, match="init='gptq'"):
        disc_config(init="gptq", gguf="Q4_K")
    with pytest.raises(ValueError, match="init='kl'"):
        disc_config(init="kl", codebook="gptvq")


def test_a_resumed_run_keeps_the_best_point_the_uninterrupted_run_keeps(monkeypatch, tmp_path):
    from discq.training import disc_module
    scores = iter([0.5, 0.4, 0.1, 0.9, 0.9,   # uninterrupted: start, steps 2, 4, 6, 8
                   0.5, 0.4, 0.1,             # killed after step 5 (checkpoints every 2 steps)
                   0.9, 0.9])                 # resumed from step 4's checkpoint: steps 6, 8
    monkeypatch.setattr(disc_module, "rounded_kl", lambda *a: next(scores))
    config = dict(calibration=_calib(), steps=8, seed=3, lr=0.5, **FAST)
    full = tiny_random_llama()
    discq.quantize_(full, disc_config(2, 32, trainer_kwargs=FP32, **config))
    part, ckpt = tiny_random_llama(), str(tmp_path / "ckpt")
    with pytest.raises(Stop):
        discq.quantize_(part, disc_config(2, 32, checkpoint_dir=ckpt, trainer_kwargs={
            "callbacks": [KillAt(5)], **FP32}, **config))
    discq.quantize_(part, disc_config(2, 32, checkpoint_dir=ckpt, trainer_kwargs=FP32,
                                      **config))
    assert next(scores, None) is None
    a, b = _weights(full), _weights(part)  # both returned step 4's point
    assert len(a) == 15 and all(torch.equal(a[k], b[k]) for k in a)
