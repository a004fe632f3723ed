"""Ctrl-C and SIGTERM mid-run: the command line and the demo exit 130/143 and write nothing, and
the library puts the input model back. Each test signals a real subprocess once it is mid-run."""
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import CALIB_TEXT, HELDOUT_TEXT, TINY_LLAMA

ROOT = Path(__file__).resolve().parents[1]
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def signal_when(cmd: list, marker: str, signum: int, timeout: float = 180) -> tuple[int, str]:
    """Start `cmd`, send `signum` once `marker` appears in its output, return (status, output)."""
    # FORCE_COLOR: rich draws its live bar on a pipe too (else only when the run ends)
    env = {**os.environ, "COLUMNS": "200", "FORCE_COLOR": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=env)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while marker.encode() not in out:
            assert proc.poll() is None, f"ended before {marker!r}:\n{out.decode()[-3000:]}"
            assert time.monotonic() < deadline, f"no {marker!r} in {timeout} s"
            if select.select([proc.stdout], [], [], 1.0)[0]:
                out += os.read(proc.stdout.fileno(), 65536)
        proc.send_signal(signum)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, (out + rest).decode(errors="replace")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_stopped_mid_discquant_exits_non_zero_and_writes_nothing(tmp_path, signum):
    out = tmp_path / "q"
    status, text = signal_when(
        [sys.executable, "-m", "discq", "quantize", TINY_LLAMA, "--method", "disc", "--steps",
         "100000", "--calib", CALIB_TEXT, "--n-calib", "8", "--seq-len", "64", "--out", out],
        "DiscQuant", signum)
    assert status == EXIT[signum], text[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in text and "Traceback" not in text
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-written directory


LIBRARY_RUN = textwrap.dedent("""
    import sys, torch
    from discq import gptq_config, quantize_
    from discq.data import calibration_batches
    from discq.interrupt import Interrupted, signals_raise
    from discq.models import load_model
    model, tok = load_model(sys.argv[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_batches(tok, sys.argv[2], n_samples=1024, seq_len=128, seed=0)
    try:
        with signals_raise():
            quantize_(model, gptq_config(bits=3, group_size=32, calibration=calib))
    except Interrupted as stop:
        after = model.state_dict()
        same = after.keys() == before.keys() and all(
            type(after[k]) is torch.Tensor and torch.equal(after[k], v) for k, v in before.items())
        print("restored" if same else "CHANGED", flush=True)
        sys.exit(stop.exit_code)
    print("finished before the signal", flush=True)
""")


def test_library_run_stopped_after_a_block_puts_every_weight_back(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(LIBRARY_RUN)
    # "1/4": the first decoder block's quantized weights are installed when the signal comes
    status, text = signal_when([sys.executable, script, TINY_LLAMA, CALIB_TEXT], "1/4",
                               signal.SIGTERM)
    assert status == 143 and "restored" in text, text[-3000:]


def test_demo_stopped_exits_143_and_keeps_the_previous_results(tmp_path):
    (tmp_path / "results.md").write_text("previous")
    status, text = signal_when(
        [sys.executable, "examples/demo.py", "--model", TINY_LLAMA, "--calib", CALIB_TEXT,
         "--data", HELDOUT_TEXT, "--n-windows", "1", "--seq-len", "64", "--out", tmp_path,
         "--settings", '{"disc": {"steps": 100000, "calib": [8, 64]}, "gptq": {"calib": [8, 64]}}'],
        "DiscQuant", signal.SIGTERM)
    assert status == 143 and "stopped by SIGTERM" in text, text[-3000:]
    assert (tmp_path / "results.md").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


def test_lightning_fit_stopped_raises_interrupted_not_system_exit():
    """Lightning ends a Ctrl-C with sys.exit(1) and a SIGTERM with a SystemExit of status 0;
    `training.trainer.fit` turns both into `Interrupted` so callers restore and report."""
    import torch
    from discq.interrupt import Interrupted
    from discq.training.trainer import build_trainer, fit
    from lightning import LightningModule
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class Stops(LightningModule):
        def __init__(self, exc):
            super().__init__()
            self.w, self.exc = torch.nn.Parameter(torch.zeros(1)), exc

        def training_step(self, batch, i):
            raise self.exc

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader([torch.zeros(1)] * 4)
    for exc, signum in [(KeyboardInterrupt(), signal.SIGINT), (SIGTERMException(), signal.SIGTERM)]:
        handler = signal.getsignal(signal.SIGINT)
        with pytest.raises(Interrupted) as stop:
            fit(build_trainer(max_steps=2, enable_progress_bar=False), Stops(exc), data)
        assert stop.value.signum == signum and stop.value.exit_code == 128 + signum
        assert signal.getsignal(signal.SIGINT) == handler  # Lightning's SIG_IGN undone
