"""Shared fixtures: the tiny trained Llama (byte-level) and small committed Shakespeare samples.

The model is trained by scripts/train_tiny.py; the text samples are excerpts of the calibration
plays and of hamlet (held out), so no test reaches the network.
"""
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_LLAMA = FIXTURES / "tiny_llama"
CALIB_TEXT = FIXTURES / "calib_plays.txt"
HELDOUT_TEXT = FIXTURES / "heldout_hamlet.txt"


@pytest.fixture(scope="session")
def tiny_llama():
    """(model, tokenizer) of the trained fixture; copy it before modifying."""
    from discq.models import load_model
    return load_model(str(TINY_LLAMA))


@pytest.fixture(scope="session")
def tiny_calibration(tiny_llama):
    from discq.data import calibration_batches
    return calibration_batches(tiny_llama[1], str(CALIB_TEXT), n_samples=16, seq_len=128,
                               batch_size=8, seed=0)


@pytest.fixture(scope="session")
def tiny_windows(tiny_llama):
    from discq.data import eval_windows
    return eval_windows(tiny_llama[1], str(HELDOUT_TEXT), n_windows=8, seq_len=256, batch_size=4)
