"""DiscQuant: rounding invariants, the RTN limit, learning, resuming, DDP, errors."""
import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from discq.passes import QuantConfig, disc_config
from discq.passes.disc import RelaxedLinear, cosine_with_warmup
from discq.passes.kl import forward_kl
from discq.tensors.grid import AffineGrid, from_rows, step_size
from discq.training.data import step_indices
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback
from models import tiny_random_llama
from torch import nn

import discq

FAST = dict(batch_size=2, warmup=4, gradient_checkpointing=False)
FP32 = {"precision": "32-true"}  # bitwise comparisons between runs: no bf16 matmul blocking


def _calib(n=4, S=16, vocab=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, S), generator=g) for _ in range(n)]


def _codes(model):
    return {n: m.weight.codes() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and hasattr(m.weight, "codes")}


class Stop(Exception):
    """What KillAt raises: a run interrupted mid-way."""


class KillAt(Callback):
    """Interrupts the fit once the trainer has finished `step` optimizer steps."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Stop


class KLLog(Callback):
    def __init__(self):
        self.kl = []

    def on_train_batch_end(self, trainer, *args):
        self.kl.append(float(trainer.callback_metrics["kl"]))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 3, 4, 8]), st.sampled_from([None, 7, 8, 16]), st.booleans(),
       st.sampled_from(["input", "output"]), st.integers(0, 1000))
def test_rounded_weights_sit_on_one_of_their_two_neighbours(bits, g, sym, along, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(24, 10)
    layer = RelaxedLinear(lin, AffineGrid(bits, g, sym, along), "uniform",
                          torch.Generator().manual_seed(seed))
    lo, hi = layer.neighbour_values()  # the values of the codes below and above
    W = lin.weight.detach()
    clipped = lo == hi  # on a grid point or outside the grid's range: one neighbour
    a, b = torch.minimum(lo, hi), torch.maximum(lo, hi)  # a symmetric scale may be negative
    assert (((a <= W + 1e-5) & (W <= b + 1e-5)) | clipped).all()  # they bracket W
    grid = layer.grid
    step = from_rows(step_size(layer.scale, grid, layer.x.shape[1]), grid)
    assert (torch.isclose(hi - lo, step) | clipped).all()  # adjacent grid points
    Wq = layer.rounded().dequantize()
    assert (((Wq - lo).abs() < 1e-5) | ((Wq - hi).abs() < 1e-5)).all()
    with torch.no_grad():  # Ŵ(x) is the relaxation of exactly those two points
        assert torch.allclose(layer.weight_hat(), lo + (hi - lo) * _x(layer), atol=1e-5)
        layer.x.copy_((layer.x >= 0.5).float())
        assert torch.allclose(layer.weight_hat(), Wq, atol=1e-5)  # round(x) is what is stored


def _x(layer):
    return layer.x if layer.grid.group_along == "input" else layer.x.t()


def test_with_zero_kl_weight_the_result_is_rtn():
    model = tiny_random_llama()
    rtn = copy.deepcopy(model)
    discq.quantize_(rtn, discq.rtn_config(3, 32))
    discq.quantize_(model, disc_config(3, 32, calibration=_calib(), steps=40, kl_weight=0,
                                       lr=0.1, **FAST))
    a, b = _codes(rtn), _codes(model)
    assert len(a) == 15 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_incoherent_grid_with_zero_kl_weight_is_incoherent_rtn():
    from discq.tensors.incoherent import IncoherentQuantizedTensor
    model = tiny_random_llama()
    rtn = copy.deepcopy(model)
    discq.quantize_(rtn, discq.rtn_config(3, 32, incoherence=True))
    discq.quantize_(model, disc_config(3, 32, calibration=_calib(), steps=30, kl_weight=0,
                                       lr=0.1, incoherence=True, init="rtn", **FAST))
    assert isinstance(model.model.layers[0].self_attn.o_proj.weight, IncoherentQuantizedTensor)
    a, b = _codes(rtn), _codes(model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, 320, (1, 8))
    assert torch.allclose(model(x).logits, rtn(x).logits, atol=1e-5)


def test_kl_falls_and_beats_rtn_on_the_trained_fixture(tiny_llama, tiny_calibration):
    model, _ = tiny_llama
    ids = torch.cat(tiny_calibration)[:4, :64]
    rtn = copy.deepcopy(model)
    discq.quantize_(rtn, discq.rtn_config(2, 32))
    q, log = copy.deepcopy(model), KLLog()
    discq.quantize_(q, disc_config(2, 32, calibration=tiny_calibration, steps=40, lr=0.05,
                                   trainer_kwargs={"callbacks": [log]}, **FAST))
    assert sum(log.kl[-5:]) < 0.5 * sum(log.kl[:5]), log.kl  # from random rounding down
    with torch.no_grad():
        ref = model(ids).logits
        kl_rtn, kl_disc = forward_kl(ref, rtn(ids).logits), forward_kl(ref, q(ids).logits)
    assert kl_disc < kl_rtn, (kl_disc, kl_rtn)


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    calib, cfg = _calib(), dict(steps=8, seed=3, **FAST)
    full = tiny_random_llama()
    discq.quantize_(full, disc_config(2, 32, calibration=calib, trainer_kwargs=FP32, **cfg))

    part, ckpt = tiny_random_llama(), str(tmp_path / "ckpt")
    before = copy.deepcopy(part.state_dict())
    with pytest.raises(Stop):
        discq.quantize_(part, disc_config(2, 32, calibration=calib, checkpoint_dir=ckpt,
                                          trainer_kwargs={"callbacks": [KillAt(5)], **FP32},
                                          **cfg))
    # the interrupted run left the model as it was: weights, flags, mode, forward
    assert not _codes(part) and (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert all(torch.equal(v, part.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in part.parameters()) and not part.training
    discq.quantize_(part, disc_config(2, 32, calibration=calib, checkpoint_dir=ckpt,
                                      trainer_kwargs=FP32, **cfg))
    a, b = _codes(full), _codes(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_recomputes_blocks_and_changes_nothing(monkeypatch):
    calls, results = [], []
    weight_hat = RelaxedLinear.weight_hat
    monkeypatch.setattr(RelaxedLinear, "weight_hat",
                        lambda self: calls.append(1) or weight_hat(self))
    for ckpt in (False, True):
        calls.clear()
        model = tiny_random_llama()
        discq.quantize_(model, disc_config(2, 32, calibration=_calib(), steps=3,
                                           trainer_kwargs=FP32, keep_best=False,
                                           **dict(FAST, gradient_checkpointing=ckpt)))
        # 3 steps x (14 linears in the 2 decoder blocks, recomputed in backward when
        # checkpointing, + the head outside them); no scoring forwards (keep_best=False)
        assert len(calls) == 3 * (14 * (2 if ckpt else 1) + 1)
        results.append(_codes(model))
        block = model.model.layers[1]
        assert "forward" not in vars(block)  # the wrapper is gone
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_ddp_on_two_cpu_processes_equals_one_process_with_twice_the_batch(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from models import tiny_random_llama
        import discq
        g = torch.Generator().manual_seed(0)
        calib = [torch.randint(0, 320, (2, 16), generator=g) for _ in range(8)]
        model = tiny_random_llama()
        kw = dict(strategy="ddp", devices=2, accelerator="cpu", precision="32-true")
        discq.quantize_(model, discq.disc_config(2, 32, calibration=calib, steps=6, batch_size=2,
                                                 warmup=2, trainer_kwargs=kw))
        codes = {{n: m.weight.codes() for n, m in model.named_modules()
                 if hasattr(getattr(m, "weight", None), "codes")}}
        torch.save(codes, sys.argv[1] + f".rank{{os.environ.get('LOCAL_RANK', 0)}}.pt")
    """))
    out = str(tmp_path / "codes")
    subprocess.run([sys.executable, str(script), out], check=True, timeout=300,
                   capture_output=True)
    ranks = [torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in (0, 1)]
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 320, (2, 16), generator=g) for _ in range(8)]
    single = tiny_random_llama()
    # the last step's point on all the sequences: several processes keep no best point and
    # hold no sequence out for it, nor keep the teacher (every logit, as they compute it)
    discq.quantize_(single, disc_config(2, 32, calibration=calib, steps=6, batch_size=4,
                                        warmup=2, keep_best=False, teacher_topk=0,
                                        trainer_kwargs=dict(accelerator="cpu", **FP32)))
    one = _codes(single)
    assert len(one) == 15
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in one)  # ranks stay in lockstep
    assert all(torch.equal(ranks[0][k], one[k]) for k in one)


FSDP_RUN = """
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from models import tiny_random_llama
    import discq
    from discq.training import ShardBytes
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 320, (2, 16), generator=g) for _ in range(8)]
    model, bytes_ = tiny_random_llama(), ShardBytes()
    kw = dict(strategy="fsdp", devices=2, accelerator="cpu", precision="32-true",
              callbacks=[bytes_])
    if len(sys.argv) > 3:
        kw["max_steps"] = int(sys.argv[3])  # a run cut short after that many steps
    discq.quantize_(model, discq.disc_config(2, 32, calibration=calib, steps=6, batch_size=2,
                                             warmup=2, trainer_kwargs=kw, keep_best=False,
                                             checkpoint_dir=sys.argv[2]))
    torch.save(dict(codes={{n: m.weight.codes() for n, m in model.named_modules()
                            if hasattr(getattr(m, "weight", None), "codes")}},
                    bytes=bytes_.out, classes=sorted({{type(m).__name__ for m in model.modules()}}),
                    plain=not any(hasattr(p, "to_local") for p in model.parameters())),
               sys.argv[1] + f".rank{{os.environ.get('LOCAL_RANK', 0)}}.pt")
"""


def test_fsdp_on_two_cpu_processes_equals_one_process_halves_memory_and_resumes(tmp_path):
    script = tmp_path / "fsdp_run.py"
    script.write_text(textwrap.dedent(FSDP_RUN.format(tests=str(Path(__file__).parent))))

    def run(out: str, *extra: str) -> list[dict]:
        subprocess.run([sys.executable, str(script), str(tmp_path / out), str(tmp_path / "ck"),
                        *extra], check=True, timeout=300, capture_output=True)
        return [torch.load(tmp_path / f"{out}.rank{r}.pt", weights_only=True) for r in (0, 1)]
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 320, (2, 16), generator=g) for _ in range(8)]
    from discq.training import ShardBytes
    single, bytes_ = tiny_random_llama(), ShardBytes()
    discq.quantize_(single, disc_config(2, 32, calibration=calib, steps=6, batch_size=4,
                                        warmup=2, keep_best=False, teacher_topk=0,
                                        trainer_kwargs=dict(accelerator="cpu",
                                                            callbacks=[bytes_], **FP32)))
    one = _codes(single)
    assert len(one) == 15
    cut = run("cut", "3")  # two processes stopped after 3 of 6 steps (a checkpoint a step)...
    assert not all(torch.equal(cut[0]["codes"][k], v) for k, v in one.items())
    for rank in run("resumed"):  # ...and the same call again continues from there
        assert all(torch.equal(rank["codes"][k], v) for k, v in one.items())
        assert rank["plain"] and not any(c.startswith("FSDP") for c in rank["classes"])
        # each process held half of the parameters (teacher weights, x) and of AdamW's moments
        assert rank["bytes"]["params"] * 2 == bytes_.out["params"]
        assert rank["bytes"]["optimizer"] * 2 == bytes_.out["optimizer"]


def test_ranks_see_disjoint_batches_whose_union_is_the_single_process_batch():
    one = step_indices(5, 10, 4, seed=1)
    two = [step_indices(5, 10, 2, seed=1, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat(two), one)
    seen = torch.cat([step_indices(t, 10, 2, seed=1) for t in range(5)])  # one pass
    assert sorted(seen.tolist()) == list(range(10))


def test_cosine_schedule_with_warmup():
    f = [cosine_with_warmup(s, 4, 20) for s in range(20)]
    assert f[0] == 0.25 and f[3] == 1.0 and f[19] < 0.02
    assert all(a >= b for a, b in zip(f[3:], f[4:]))


def test_json_round_trip_leaves_out_data_and_trainer_options():
    cfg = disc_config(3, 64, calibration=_calib(), steps=10, init="rtn", clamp=0.05,
                      trainer_kwargs={"devices": 1}, checkpoint_dir=Path("/tmp/x"))
    d = cfg.to_dict()
    assert "calibration" not in d and "trainer_kwargs" not in d and d["steps"] == 10
    assert d["checkpoint_dir"] == "/tmp/x" and d["method"] == "disc"
    back = QuantConfig.from_json(cfg.to_json())
    assert back == cfg and back.calibration is None and back.trainer_kwargs is None


@pytest.mark.parametrize("kw", [dict(steps=0), dict(steps=2.5), dict(lr=0), dict(lr=-1),
                                dict(lr=float("nan")), dict(rho=0), dict(clamp=-1),
                                dict(warmup=-1), dict(seed=-1), dict(kl_weight=-1),
                                dict(ce_weight=float("inf")), dict(init="zeros"),
                                dict(batch_size=1.5), dict(trainer_kwargs="ddp"),
                                dict(incoherence="yes"), dict(gradient_checkpointing=1),
                                dict(checkpoint_dir=3), dict(bits=5), dict(group_size=0),
                                dict(group_along="rows"), dict(scale_dtype="int8")])
def test_bad_disc_arguments(kw):
    with pytest.raises((ValueError, TypeError)):
        disc_config(**kw)


def test_missing_calibration_is_a_clear_error():
    with pytest.raises(ValueError, match="calibration"):
        discq.quantize_(tiny_random_llama(), disc_config(steps=2))


# ---- the E8P lattice (codebook="e8p") ------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(st.sampled_from([2, 3, 4]), st.integers(0, 1000))
def test_lattice_rounding_picks_one_of_the_two_candidate_points(bits, seed):
    from discq.passes.disc_lattice import RelaxedLatticeLinear
    from discq.tensors import e8p_residual
    torch.manual_seed(seed)
    lin = nn.Linear(32, 12)
    layer = RelaxedLatticeLinear(lin, bits, seed, "uniform", torch.Generator().manual_seed(seed))
    down = e8p_residual.decode(layer.codes_down.long(), bits)
    up = e8p_residual.decode(layer.codes_up.long(), bits)
    got = layer.rounded().codes()  # [N, K/8, stages]
    is_down = (got == layer.codes_down.long()).all(-1)
    is_up = (got == layer.codes_up.long()).all(-1)
    assert (is_down | is_up).all()
    assert torch.equal(is_up & ~is_down, (layer.x >= 0.5) & ~is_down)
    with torch.no_grad():  # Ŵ(x) is the segment between the two candidates, in the rotated basis
        seg = (down + layer.x.unsqueeze(-1) * (up - down)).flatten(1) * layer.scale
        assert torch.allclose(layer.weight_hat(), seg, atol=1e-5)
        # at 2 bits down is the exact nearest point, so the pull never prefers up (t <= 1/2);
        # the 3/4-bit residual codes are greedy, and up may be the nearer one
        if bits == 2:
            assert (layer.pull >= -1e-3).all()


def test_lattice_with_zero_kl_weight_is_nearest_point_coding():
    from discq.tensors.hadamard import layer_seed
    from discq.tensors.lattice import LatticeQuantizedTensor
    model = tiny_random_llama()
    ref = copy.deepcopy(model)
    discq.quantize_(model, disc_config(2, calibration=_calib(), steps=30, kl_weight=0, lr=0.1,
                                       codebook="e8p", init="uniform", **FAST))
    for name, m in ref.named_modules():
        if isinstance(m, nn.Linear):
            near = LatticeQuantizedTensor.from_hp(m.weight.detach(), 2, seed=layer_seed(name, 0))
            got = model.get_submodule(name).weight
            assert isinstance(got, LatticeQuantizedTensor), name
            assert torch.equal(got.codes(), near.codes()), name


def test_lattice_discquant_lowers_the_kl_of_nearest_point_coding(tiny_llama, tiny_calibration):
    model, _ = tiny_llama
    ids = torch.cat(tiny_calibration)[:4, :64]
    near, q = copy.deepcopy(model), copy.deepcopy(model)
    base = dict(calibration=tiny_calibration, codebook="e8p", init="rtn", **FAST)
    discq.quantize_(near, disc_config(2, steps=1, kl_weight=0, **base))
    discq.quantize_(q, disc_config(2, steps=40, lr=0.05, **base))
    with torch.no_grad():
        t = model(ids).logits
        assert forward_kl(t, q(ids).logits) < forward_kl(t, near(ids).logits)


def test_lattice_codebook_arguments_are_checked():
    with pytest.raises(ValueError, match="codebook"):
        disc_config(2, codebook="e9")
    with pytest.raises(ValueError, match="2, 3 or 4"):
        disc_config(8, codebook="e8p")


def test_intermediate_layer_term_alone_lowers_the_hidden_state_error(tiny_llama,
                                                                     tiny_calibration):
    from discq.passes.disc import hidden_mse
    model, _ = tiny_llama
    ids = torch.cat(tiny_calibration)[:4, :64]
    rtn, q = copy.deepcopy(model), copy.deepcopy(model)
    discq.quantize_(rtn, discq.rtn_config(2, 32))
    discq.quantize_(q, disc_config(2, 32, calibration=tiny_calibration, steps=30, lr=0.05,
                                   kl_weight=0, hidden_weight=1.0, init="rtn", **FAST))
    with torch.no_grad():
        t = model(ids, output_hidden_states=True).hidden_states
        err = {name: float(hidden_mse(t, m(ids, output_hidden_states=True).hidden_states))
               for name, m in (("rtn", rtn), ("disc", q))}
    assert err["disc"] < err["rtn"], err


def test_the_kl_of_a_large_vocabulary_is_formed_a_slice_of_positions_at_a_time():
    """The chunked KL (teacher and student run as one model with a switch) equals the KL of
    the whole logits, gradients included; Gemma's soft-capping is applied to each slice."""
    from discq.passes.kl import chunked_forward_kl
    from families import tiny_family
    model = tiny_family("gemma2")  # tied head, final logit soft-capping
    emb = model.get_input_embeddings()
    W_t = emb.weight.detach().clone()
    W_s = torch.nn.Parameter(W_t + 0.01 * torch.randn_like(W_t))

    def set_teacher(flag):  # the switch DiscQuant's relaxed layers have
        model.lm_head.weight = emb.weight = torch.nn.Parameter(W_t) if flag else W_s

    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    set_teacher(True)
    with torch.no_grad():
        teacher = model(ids).logits
    set_teacher(False)
    whole = forward_kl(teacher, model(ids).logits)
    whole.backward()
    g_whole, W_s.grad = W_s.grad.clone(), None
    sliced = chunked_forward_kl(model, ids, set_teacher, max_elements=2 * 5 * 320)
    sliced.backward()
    assert torch.allclose(sliced, whole, rtol=1e-5) and whole > 0
    assert torch.allclose(W_s.grad, g_whole, rtol=1e-4, atol=1e-8)
    assert chunked_forward_kl(model, ids, set_teacher, max_elements=10**9) is None  # fits


def test_discquant_with_sliced_logits_ends_where_it_does_with_whole_logits(monkeypatch):
    from discq.training import disc_module
    from families import calibration, tiny_family
    config = discq.disc_config(4, 32, calibration=calibration(), steps=3, warmup=1,
                               batch_size=2)
    whole = tiny_family("gemma3")
    discq.quantize_(whole, config)
    monkeypatch.setattr(disc_module, "LOGIT_ELEMENTS", 2 * 7 * 320)
    sliced = tiny_family("gemma3")
    discq.quantize_(sliced, config)
    codes = [(a.weight.qdata, b.weight.qdata) for a, b in
             zip(whole.modules(), sliced.modules()) if hasattr(getattr(a, "weight", None),
                                                                "qdata")]
    assert codes and sum(torch.equal(a, b) for a, b in codes) >= len(codes) - 1


def test_the_teacher_runs_once_per_sequence_when_sequences_repeat(monkeypatch):
    from discq.training import disc_module
    forwards = []
    original = disc_module.DiscQuantModule._forward
    monkeypatch.setattr(disc_module.DiscQuantModule, "_forward", lambda self, ids, teacher: (
        forwards.append((teacher, len(ids))) or original(self, ids, teacher)))
    results = {}
    for budget in (2**31, 0):  # cached, then (no room) the teacher at every step
        monkeypatch.setattr(disc_module, "TEACHER_CACHE_BYTES", budget)
        forwards.clear()
        model = tiny_random_llama()
        discq.quantize_(model, disc_config(2, 32, calibration=_calib(), steps=10,
                                           trainer_kwargs=FP32, teacher_topk=0, **FAST))
        # 8 sequences of 16 tokens, one held out for scoring, 10 steps of 2: each of the 7
        # others 2-3 times
        teacher = sum(n for t, n in forwards if t)
        assert teacher == (7 if budget else 20)
        assert sum(1 for t, _ in forwards if not t) == 10
        results[budget] = _codes(model)
    a, b = results.values()
    same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
    assert same > 0.999  # the same teacher logits, batched differently: float rounding only


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**16), st.floats(0.1, 6.0))
def test_top_k_kl_never_exceeds_the_kl_and_equals_it_with_every_token(k, seed, spread):
    from discq.passes.kl import top_k_kl
    g = torch.Generator().manual_seed(seed)
    t, s = (torch.randn(2, 3, 40, generator=g) * spread for _ in range(2))
    logp = torch.log_softmax(t, -1)
    full = float(forward_kl(t, s))
    top, index = logp.topk(k, -1)
    assert float(top_k_kl(top, index, s)) <= full + 1e-5
    every = logp.topk(40, -1)
    assert float(top_k_kl(*every, s)) == pytest.approx(full, rel=1e-4, abs=1e-5)
    assert float(top_k_kl(logp, None, s)) == pytest.approx(full, rel=1e-6, abs=1e-7)


def test_the_teacher_kept_on_disk_is_the_teacher_kept_in_memory(monkeypatch):
    from discq.training import disc_module, teacher
    caches = []
    init = teacher.TeacherCache.__init__
    monkeypatch.setattr(teacher.TeacherCache, "__init__", lambda self, *a: (
        init(self, *a), caches.append(self))[0])
    results = {}
    for room in (2**31, 1):  # in memory, then a memory-mapped file
        monkeypatch.setattr(disc_module, "TEACHER_CACHE_BYTES", room)
        model = tiny_random_llama()
        discq.quantize_(model, disc_config(2, 32, calibration=_calib(), steps=10,
                                           trainer_kwargs=FP32, teacher_topk=16, **FAST))
        results[room] = _codes(model)
    assert [c.on_disk for c in caches] == [False, True] and caches[0].k == 16
    a, b = results.values()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_compiled_step_rounds_as_the_eager_one():
    """compile_step=True: every decoder block through torch.compile, forward and backward; the
    tiny model's 176-wide MLP rows are not whole groups of 32 (a ragged last group)."""
    results = []
    for compile_step in (False, True):
        model = tiny_random_llama()
        discq.quantize_(model, disc_config(2, 32, calibration=_calib(), steps=6,
                                           trainer_kwargs=FP32, keep_best=False,
                                           compile_step=compile_step, **FAST))
        results.append(_codes(model))
        assert all(m._compiled_call_impl is None for m in model.modules())  # undone after
    a, b = results
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_by_default_where_activations_are_large():
    from discq.training.disc_handler import _checkpointing
    model = tiny_random_llama()
    assert not _checkpointing(model, disc_config(2, 32, batch_size=8), 512)
    model.config.num_hidden_layers = 30
    model.config.hidden_size, model.config.intermediate_size = 576, 1536  # SmolLM2-135M
    assert _checkpointing(model, disc_config(2, 32, batch_size=8), 512)   # 7.5 GB
    assert not _checkpointing(model, disc_config(2, 32, batch_size=2), 128)  # 0.5 GB
    assert _checkpointing(model, disc_config(2, 32, batch_size=2, gradient_checkpointing=True),
                          128)
    assert _checkpointing(torch.nn.Sequential(torch.nn.Linear(4, 4)), disc_config(2, 32), 16)
