"""discq.eval: perplexity, KL / top-1 agreement and encoder similarity, checked against direct
computations and on the trained fixture."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from models import tiny_random_bert, tiny_random_llama

from discq.eval import compare, embedding_similarity, perplexity, reference_logprobs


def perturbed(model, scale: float, seed: int = 0):
    """A copy with Gaussian noise of relative size `scale` on every weight matrix."""
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.dim() == 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return noisy


def test_trained_fixture_perplexity_is_low(tiny_llama, tiny_windows):
    ppl = perplexity(tiny_llama[0], tiny_windows, progress=False)
    assert 1 < ppl < 20  # trained: far below uniform over 384 ids


def test_perplexity_is_the_token_weighted_mean_nll():
    model = tiny_random_llama()
    windows = [torch.randint(0, 320, (3, 17)), torch.randint(0, 320, (1, 9))]  # 48 + 8 targets
    losses = [model(w, labels=w).loss.item() for w in windows]  # HF: mean over targets
    expected = math.exp((losses[0] * 48 + losses[1] * 8) / 56)
    assert perplexity(model, windows, progress=False) == pytest.approx(expected, rel=1e-5)


def test_compare_against_itself(tiny_llama, tiny_windows):
    model, windows = tiny_llama[0], tiny_windows[:1]
    same = compare(model, model, windows, progress=False)
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["top1"] == 1.0
    assert same["perplexity"] == same["reference_perplexity"]
    assert same["perplexity"] == pytest.approx(perplexity(model, windows, progress=False))


def test_kl_and_top1_degrade_with_the_noise(tiny_llama, tiny_windows):
    model, windows = tiny_llama[0], tiny_windows[:1]  # 4 x 256 bytes keep it fast
    small = compare(model, perturbed(model, 0.05), windows, progress=False)
    large = compare(model, perturbed(model, 0.3), windows, progress=False)
    assert 0 < small["kl"] < large["kl"]
    assert large["top1"] < small["top1"] < 1
    assert large["perplexity"] > large["reference_perplexity"]


def test_cached_reference_gives_the_same_scores(tiny_llama, tiny_windows):
    model, windows = tiny_llama[0], tiny_windows[:2]
    other = perturbed(model, 0.1)
    cached = reference_logprobs(model, windows)
    assert compare(model, other, windows, progress=False, cached=cached) == \
        compare(model, other, windows, progress=False)
    with pytest.raises(ValueError, match="reference_logprobs"):
        compare(model, other, windows, progress=False, cached=cached[:1])


def test_kl_is_forward_kl_of_next_token_distributions():
    ref, model = tiny_random_llama(seed=0), tiny_random_llama(seed=1)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        lp_r = F.log_softmax(ref(ids).logits[:, :-1], -1)  # [2, 11, V]
        lp_m = F.log_softmax(model(ids).logits[:, :-1], -1)
    kl = F.kl_div(lp_m, lp_r, log_target=True, reduction="sum").item() / 22  # KL(ref ‖ model)
    top1 = (lp_r.argmax(-1) == lp_m.argmax(-1)).float().mean().item()
    out = compare(ref, model, [ids], progress=False)
    assert out["kl"] == pytest.approx(kl, rel=1e-4) and out["top1"] == pytest.approx(top1)


def test_bf16_model_is_scored_in_fp32(tiny_llama, tiny_windows):
    model, windows = tiny_llama[0], tiny_windows[:1]
    half = copy.deepcopy(model).to(torch.bfloat16)
    ppl, ppl_half = (perplexity(m, windows, progress=False) for m in (model, half))
    assert ppl_half == pytest.approx(ppl, rel=0.05)
    out = compare(model, half, windows, progress=False)
    assert 0 < out["kl"] < 0.01 and out["top1"] > 0.9


def test_modes_are_restored_and_no_graph_is_built():
    model = tiny_random_llama().train()
    perplexity(model, [torch.randint(0, 320, (1, 8))], progress=False)
    assert model.training
    ref = tiny_random_llama().eval()
    compare(ref, model, [torch.randint(0, 320, (1, 8))], progress=False)
    assert model.training and not ref.training


def test_progress_bar_is_shown_and_can_be_hidden(capsys):
    model, ids = tiny_random_llama(), [torch.randint(0, 320, (1, 8))]
    perplexity(model, ids, progress=False)
    assert "perplexity" not in capsys.readouterr().err
    perplexity(model, ids, progress=True)
    assert "perplexity" in capsys.readouterr().err


@pytest.mark.parametrize("windows, match", [
    ([], "empty"),
    ([torch.full((1, 8), 999)], r"\[0, 320\)"),
    ([torch.zeros(1, 8)], "integer"),
    ([torch.zeros(8, dtype=torch.long)], r"\[batch, seq"),
    ([torch.zeros(2, 1, dtype=torch.long)], "seq >= 2"),
])
def test_bad_windows_are_clear_errors(windows, match):
    with pytest.raises(ValueError, match=match):
        perplexity(tiny_random_llama(), windows, progress=False)


def test_embedding_similarity_of_encoders():
    ref = tiny_random_bert()
    batches = [torch.randint(0, 200, (2, 12))]
    assert embedding_similarity(ref, ref, batches, progress=False) == pytest.approx(1.0)
    noisy = perturbed(ref, 0.5)
    sim = embedding_similarity(ref, noisy, batches, progress=False)
    assert 0.3 < sim < 0.9999


def test_embedding_similarity_ignores_padding():
    ref, noisy = tiny_random_bert(), perturbed(tiny_random_bert(), 0.5)
    ids = torch.randint(1, 200, (1, 10))
    padded = {"input_ids": torch.cat([ids, torch.full((1, 5), 7)], 1),  # junk after the text
              "attention_mask": torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], 1).long()}
    plain = embedding_similarity(ref, noisy, [ids], progress=False)
    assert embedding_similarity(ref, noisy, [padded], progress=False) == pytest.approx(plain,
                                                                                       abs=1e-5)
