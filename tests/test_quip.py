"""QuIP#: BlockLDLQ on the lattice beats nearest-point coding, the tiny fixture at 2 bits,
fine-tuning keeps the codes, `finetune=True` after GPTQ, config checks."""
import copy

import pytest
import torch
from discq.passes import gptq_config, quip_sharp_config
from discq.passes.gptq import proxy_loss
from discq.passes.quip_sharp import quantize_group
from discq.tensors import e8p_residual
from discq.tensors.lattice import LatticeQuantizedTensor

import discq
from discq.pipeline import keep_head_filter


def _random_pd(K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * K, K, generator=g) @ torch.randn(K, K, generator=g)  # correlated inputs
    return X.t() @ X / len(X)


def test_blockldlq_beats_nearest_point_coding_on_the_proxy_loss():
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    H = _random_pd(64, 1)
    cfg = quip_sharp_config(2, finetune=False)
    (ldlq,) = quantize_group([("layer", W)], H, cfg)
    codes = ldlq.codes()
    assert codes.shape == (32, 8, 1) and codes.min() >= 0 and codes.max() < 2**16
    # nearest-point coding of the same rotated weight, with the same scale and rotations
    _, near_codes = e8p_residual.quantize((_rotated(W, ldlq) / ldlq.scale).reshape(32, 8, 8), 2)
    near = LatticeQuantizedTensor.from_codes(near_codes, ldlq.scale, ldlq.s_in, ldlq.s_out,
                                             ldlq.q_in, ldlq.q_out, 2, W.dtype)
    assert proxy_loss(W, ldlq.dequantize(), H) < 0.8 * proxy_loss(W, near.dequantize(), H)


def _rotated(W, q: LatticeQuantizedTensor) -> torch.Tensor:
    from discq.tensors.hadamard import rotate_weight
    return rotate_weight(W, q.s_out.float(), q.s_in.float(), q.q_out, q.q_in)


@pytest.fixture(scope="module")
def quip_tiny(tiny_llama, tiny_calibration):
    model = copy.deepcopy(tiny_llama[0])  # the head too, and the embedding tied to it
    discq.quantize_(model, quip_sharp_config(2, tiny_calibration, finetune=False))
    return model


def test_two_bit_quip_sharp_on_the_trained_fixture(tiny_llama, tiny_calibration, tiny_windows):
    from discq.eval import perplexity
    fp = perplexity(tiny_llama[0], tiny_windows, progress=False)
    rtn, quip = copy.deepcopy(tiny_llama[0]), copy.deepcopy(tiny_llama[0])
    discq.quantize_(rtn, discq.rtn_config(2, 64), filter_fn=keep_head_filter(rtn))
    discq.quantize_(quip, quip_sharp_config(2, tiny_calibration, finetune=False),
                    filter_fn=keep_head_filter(quip))  # the head (and tied embedding) fp32
    p_rtn = perplexity(rtn, tiny_windows, progress=False)
    p_quip = perplexity(quip, tiny_windows, progress=False)
    assert p_quip < fp + 0.4 * (p_rtn - fp), (fp, p_quip, p_rtn)
    lattice = [m.weight for m in quip.modules() if isinstance(m, torch.nn.Linear)
               and isinstance(m.weight, LatticeQuantizedTensor)]
    assert lattice and all(w.bits == 2 for w in lattice)
    # 2 bits of codes plus the fp16 sign vectors (16 bits per row and column)
    assert discq.bits_per_weight(quip) < 2.3


def test_finetuning_changes_signs_and_norms_but_never_codes(tiny_llama, tiny_calibration,
                                                            quip_tiny):
    from discq.training import finetune_
    model = copy.deepcopy(quip_tiny)
    before = {n: m.weight.qdata.clone() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and isinstance(m.weight, LatticeQuantizedTensor)}
    signs = {n: m.weight.s_in.clone() for n, m in model.named_modules() if n in before}
    report = finetune_(model, tiny_llama[0], tiny_calibration, steps=6, val_every=3,
                       batch_size=2, valid_fraction=0.25, lr=1e-3, sign_lr=1e-2)
    after = dict(model.named_modules())
    assert all(torch.equal(after[n].weight.qdata, q) for n, q in before.items())
    assert any(not torch.equal(after[n].weight.s_in, s) for n, s in signs.items())
    # held-out KL to the original: measured 0.138 -> 0.058 (the start is a candidate for the
    # best state, so only a real improvement passes this bound)
    assert report["kl_after"] < 0.7 * report["kl_before"]


def test_finetune_true_after_gptq_tunes_norms_keeps_codes(tiny_llama, tiny_calibration):
    model = copy.deepcopy(tiny_llama[0])
    discq.quantize_(model, gptq_config(2, 64, calibration=tiny_calibration))
    tuned = copy.deepcopy(tiny_llama[0])
    discq.quantize_(tuned, gptq_config(2, 64, calibration=tiny_calibration, finetune=True,
                                       finetune_steps=6))
    for (n, a), (_, b) in zip(model.named_modules(), tuned.named_modules()):
        if isinstance(a, torch.nn.Linear) and hasattr(a.weight, "qdata"):
            assert torch.equal(a.weight.qdata, b.weight.qdata), n
    report = tuned.discq_finetune["end_to_end"]
    # 6 steps at the default lr 1e-5 improve little (measured 0.016401 -> 0.016395), but they
    # must improve: a state equal to the start would mean nothing was tuned
    assert report["kl_after"] < report["kl_before"]
    norms = [(a, b) for (n, a), (_, b) in zip(model.named_parameters(),
                                              tuned.named_parameters()) if "norm" in n]
    assert any(not torch.equal(a, b) for a, b in norms)


def test_config_json_round_trip_and_bad_arguments():
    from discq.passes.config import QuantConfig
    cfg = quip_sharp_config(3, calibration=[torch.zeros(1, 4, dtype=torch.long)], finetune=False)
    again = QuantConfig.from_json(cfg.to_json())
    assert again.bits == 3 and again.finetune is False and again.calibration is None
    for kw in ({"bits": 5}, {"bits": 1}, {"refine_passes": -1}, {"finetune": "yes"},
               {"ft_valid_fraction": 1.5}, {"sigma_reg": 0}):
        with pytest.raises((ValueError, TypeError)):
            quip_sharp_config(**kw)
    with pytest.raises((ValueError, TypeError)):
        gptq_config(finetune_steps=-1)
    with pytest.warns(UserWarning, match="no scale groups"):
        quip_sharp_config(2, group_size=64)


def test_interrupted_quip_sharp_leaves_the_model_untouched(tiny_llama, tiny_calibration,
                                                           monkeypatch):
    import discq.passes.quip_sharp as qs
    model = copy.deepcopy(tiny_llama[0])
    before = {n: p for n, p in model.named_parameters()}
    calls = {"n": 0}
    real = qs.quantize_group

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(qs, "quantize_group", failing)
    with pytest.raises(KeyboardInterrupt):
        discq.quantize_(model, quip_sharp_config(2, tiny_calibration, finetune=False))
    assert all(p is before[n] for n, p in model.named_parameters())


def test_finetuning_resumes_from_its_checkpoint_to_the_uninterrupted_result(
        tiny_llama, tiny_calibration, quip_tiny, tmp_path):
    from lightning.pytorch.callbacks import Callback

    from discq.training import finetune_

    class Stop(Exception):
        pass

    class KillAt(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 4:
                raise Stop

    kw = dict(steps=6, val_every=2, batch_size=2, valid_fraction=0.25, lr=1e-3, sign_lr=1e-2)
    full = copy.deepcopy(quip_tiny)
    finetune_(full, tiny_llama[0], tiny_calibration, **kw)
    part, ckpt = copy.deepcopy(quip_tiny), str(tmp_path / "ft")
    with pytest.raises(Stop):
        finetune_(part, tiny_llama[0], tiny_calibration, checkpoint_dir=ckpt,
                  trainer_kwargs={"callbacks": [KillAt()]}, **kw)
    assert (tmp_path / "ft" / "last.ckpt").is_file()
    finetune_(part, tiny_llama[0], tiny_calibration, checkpoint_dir=ckpt, **kw)
    for (n, a), (_, b) in zip(full.named_modules(), part.named_modules()):
        if isinstance(a, torch.nn.Linear) and isinstance(a.weight, LatticeQuantizedTensor):
            assert torch.equal(a.weight.s_in, b.weight.s_in), n
    norms = [(a, b) for (n, a), (_, b) in zip(full.named_parameters(), part.named_parameters())
             if "norm" in n]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in norms)


def test_blockwise_sign_tuning_is_kept(tiny_llama, tiny_calibration):
    """Stage 1 tunes each block's sign vectors right after rounding it; they must survive to the
    final model (an earlier driver re-installed the untuned lattice weights after the block's
    output pass, losing every stage-1 sign update: 0 of 28 weights kept them)."""
    model = copy.deepcopy(tiny_llama[0])
    discq.quantize_(model, quip_sharp_config(2, calibration=tiny_calibration, finetune=True,
                                             steps=0, ft_block_epochs=1),
                    filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "head" not in fqn)
    weights = [w for _, w in discq.quantized_weights(model)]
    tuned = [w for w in weights if not torch.all(w.s_in.abs() == 1)]
    assert weights and len(tuned) == len(weights)


def test_fine_tuning_a_large_vocabulary_slices_its_logits(monkeypatch, tiny_llama,
                                                          tiny_calibration):
    """The loss from logits a slice of positions at a time equals the whole one."""
    from discq.training import finetune
    from discq.training.finetune import FinetuneConfig, FinetuneModule
    from discq.training.tunable import FrozenReference, Tunables
    model = copy.deepcopy(tiny_llama[0])
    discq.quantize_(model, discq.rtn_config(2, 64), filter_fn=keep_head_filter(model))
    teacher = FrozenReference(tiny_llama[0], share=list(tiny_llama[0].parameters()))
    ids = tiny_calibration[0][:2, :40]
    with Tunables(model) as tunables:
        module = FinetuneModule(model, teacher, tunables, FinetuneConfig())
        whole = module._loss(ids)
        monkeypatch.setattr(finetune, "LOGIT_ELEMENTS", 2 * 9 * 384)
        sliced = module._loss(ids)
    assert all(torch.allclose(a, b, rtol=1e-5) for a, b in zip(whole, sliced))
