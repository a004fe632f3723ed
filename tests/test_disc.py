"""DiscQuant: rounding invariants, the RTN limit, learning, resuming, errors."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import discq
from discq.passes import QuantConfig, disc_config
from discq.passes.disc import RelaxedLinear, cosine_with_warmup, forward_kl
from discq.tensors.grid import AffineGrid

from models import tiny_random_llama

FAST = dict(batch_size=2, warmup=4, gradient_checkpointing=False)


def _calib(n=4, S=16, vocab=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, S), generator=g) for _ in range(n)]


def _codes(model):
    return {n: m.weight.codes() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and hasattr(m.weight, "codes")}


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([2, 3, 4]), st.sampled_from([None, 8, 16]), st.booleans(),
       st.sampled_from(["input", "output"]), st.integers(0, 1000))
def test_rounded_weights_sit_on_one_of_their_two_neighbours(bits, g, sym, along, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(24, 10)
    grid = AffineGrid(bits, g, sym, along)
    layer = RelaxedLinear(lin, grid, torch.Generator().manual_seed(seed), "uniform")
    with torch.no_grad():
        layer.x.uniform_()
    down, up, lo, hi = layer.bounds()
    W = lin.weight.detach()
    clipped = down == up  # outside the grid's range (or exactly on a point): one neighbour
    assert (((lo <= W + 1e-5) & (W <= hi + 1e-5)) | clipped).all()  # the two points bracket W
    Wq = layer.rounded().dequantize()
    assert ((Wq - lo).abs() < 1e-5).logical_or((Wq - hi).abs() < 1e-5).all()
    assert ((hi - lo) <= layer._row_params()[0].max() + 1e-6).all()  # neighbours: one step apart


def test_with_zero_kl_weight_the_result_is_rtn():
    model = tiny_random_llama()
    rtn = copy.deepcopy(model)
    discq.quantize_(rtn, discq.rtn_config(3, 32))
    discq.quantize_(model, disc_config(3, 32, calibration=_calib(), steps=40, kl_weight=0,
                                       lr=0.1, **FAST))
    a, b = _codes(rtn), _codes(model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_incoherent_grid_with_zero_kl_weight_is_incoherent_rtn():
    from discq.tensors.incoherent import IncoherentQuantizedTensor
    model = tiny_random_llama()
    rtn = copy.deepcopy(model)
    discq.quantize_(rtn, discq.rtn_config(3, 32, incoherence=True))
    discq.quantize_(model, disc_config(3, 32, calibration=_calib(), steps=40, kl_weight=0,
                                       lr=0.1, incoherence=True, **FAST))
    w = model.model.layers[0].self_attn.o_proj.weight
    assert isinstance(w, IncoherentQuantizedTensor)
    a, b = _codes(rtn), _codes(model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, 320, (1, 8))
    assert torch.allclose(model(x).logits, rtn(x).logits, atol=1e-5)


def test_kl_falls_on_the_trained_fixture(tiny_llama, tiny_calibration):
    model, _ = tiny_llama
    q = copy.deepcopy(model)
    ids = torch.cat(tiny_calibration)[:4, :64]
    with torch.no_grad():
        ref = model(ids).logits
        rtn = copy.deepcopy(model)
        discq.quantize_(rtn, discq.rtn_config(2, 32))
        kl_rtn = forward_kl(ref, rtn(ids).logits).item()
    discq.quantize_(q, disc_config(2, 32, calibration=tiny_calibration, steps=60, lr=0.05,
                                   init="rtn", **FAST))
    with torch.no_grad():
        kl_disc = forward_kl(ref, q(ids).logits).item()
    assert kl_disc < kl_rtn, (kl_disc, kl_rtn)


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    calib = _calib()
    full = tiny_random_llama()
    discq.quantize_(full, disc_config(2, 32, calibration=calib, steps=8, seed=3, **FAST))
    part = tiny_random_llama()
    ckpt = tmp_path / "ckpt"

    class Stop(Exception):
        pass

    from lightning.pytorch.callbacks import Callback

    class KillAt(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                raise Stop

    with pytest.raises(Stop):
        discq.quantize_(part, disc_config(2, 32, calibration=calib, steps=8, seed=3,
                                          checkpoint_dir=str(ckpt),
                                          trainer_kwargs={"callbacks": [KillAt()]}, **FAST))
    assert not _codes(part)  # the interrupted run left the model untouched
    assert (ckpt / "last.ckpt").is_file()
    discq.quantize_(part, disc_config(2, 32, calibration=calib, steps=8, seed=3,
                                      checkpoint_dir=str(ckpt), **FAST))
    a, b = _codes(full), _codes(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cosine_schedule_with_warmup():
    f = [cosine_with_warmup(s, 4, 20) for s in range(20)]
    assert f[0] == 0.25 and f[3] == 1.0 and f[19] < 0.02
    assert all(a >= b for a, b in zip(f[3:], f[4:]))


def test_json_round_trip_leaves_out_data_and_trainer_options():
    cfg = disc_config(3, 64, calibration=_calib(), steps=10, trainer_kwargs={"devices": 1})
    d = cfg.to_dict()
    assert "calibration" not in d and "trainer_kwargs" not in d and d["steps"] == 10
    assert QuantConfig.from_dict(d) == cfg


@pytest.mark.parametrize("kw", [dict(steps=0), dict(lr=0), dict(lr=-1), dict(rho=0),
                                dict(clamp=-1), dict(init="zeros"), dict(batch_size=1.5),
                                dict(trainer_kwargs="ddp"), dict(incoherence="yes")])
def test_bad_disc_arguments(kw):
    with pytest.raises((ValueError, TypeError)):
        disc_config(**kw)


def test_missing_calibration_is_a_clear_error():
    with pytest.raises(ValueError, match="calibration"):
        discq.quantize_(tiny_random_llama(), disc_config(steps=2))
