"""Shared fixtures: the tiny trained Llama (byte-level) and small committed Shakespeare samples.

The model is trained by scripts/train_tiny.py (see tests/fixtures/tiny_llama/README.md); the
text samples are excerpts of the calibration plays and of hamlet (held out), so no test reaches
the network. Session-scoped objects are shared: deep-copy a model before modifying it.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_LLAMA = FIXTURES / "tiny_llama"             # LlamaForCausalLM dir, ByT5 tokenizer, vocab 384
CALIB_TEXT = FIXTURES / "calib_plays.txt"        # 40 kB of comedies and histories
HELDOUT_TEXT = FIXTURES / "heldout_hamlet.txt"   # the first 24 kB of hamlet


def run_python(body: str, timeout: float = 600) -> str:
    """Run `body` (dedented) in a fresh Python process; its stdout, or fail with its stderr."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="session")
def tiny_llama():
    """(model, tokenizer) of the trained fixture, fp32, eval mode, frozen."""
    from discq.models import load_model
    return load_model(str(TINY_LLAMA))


@pytest.fixture(scope="session")
def tiny_calibration(tiny_llama):
    """2 batches [8, 128] of random windows of CALIB_TEXT (seed 0)."""
    from discq.data import calibration_batches
    return calibration_batches(tiny_llama[1], str(CALIB_TEXT), n_samples=16, seq_len=128,
                               batch_size=8, seed=0)


@pytest.fixture(scope="session")
def tiny_windows(tiny_llama):
    """2 batches [4, 256]: the first 8x256 bytes of hamlet, held out from training."""
    from discq.data import eval_windows
    return eval_windows(tiny_llama[1], str(HELDOUT_TEXT), n_windows=8, seq_len=256, batch_size=4)
