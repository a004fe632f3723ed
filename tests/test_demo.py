"""`make demo`'s script, on the tiny fixture with small budgets: every registered method gets a
row, the table, JSON and plot are written, and nothing from our dependencies is printed."""
import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import CALIB_TEXT, HELDOUT_TEXT, TINY_LLAMA

from discq.machine import describe
from discq.methods import available_methods

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"gptq": {"calib": [8, 64]}, "disc": {"calib": [8, 64], "steps": 2},
         "quip-sharp": {"calib": [8, 64]}}
# what a dependency's warning or log line looks like: Python warnings, torch's glog-style
# "W1202 05:09:43" lines, Lightning's "[rank: 0]" / "GPU available" info
NOISE = re.compile(r"Warning|warn\(|^[WE]\d{4} |\[rank: \d\]|GPU available|LeafSpec", re.M)


def test_demo_runs_every_method_and_writes_table_and_plot(tmp_path):
    settings = {m: SMALL.get(m, {"calib": [8, 64]}) for m in available_methods() if m != "rtn"}
    done = subprocess.run(
        [sys.executable, "examples/demo.py", "--model", TINY_LLAMA, "--calib", CALIB_TEXT,
         "--data", HELDOUT_TEXT, "--n-windows", "1", "--seq-len", "64", "--out", tmp_path,
         "--settings", json.dumps(settings)], cwd=ROOT, capture_output=True, text=True,
        timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp32", *available_methods()]
    for r in rows[1:]:
        assert 2 <= r["bits_per_weight"] < 4 and r["kl"] > 0 and r["perplexity"] > 1
        assert "calibration tokens" in r["settings"] or r["method"] == "rtn"
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {m} |" in table for m in available_methods())
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert done.stdout.count("| method |") == 1  # one table, printed as it goes
    assert "benchmarks/results" in done.stdout
    # where the time went, on which machine (the README states the slowest machine's times)
    assert re.search(r"\d+ s: model and text \d+ s, quantization \d+ s, evaluation \d+ s",
                     done.stdout)
    assert describe() in done.stdout and describe() in table
    assert all(r["eval_seconds"] >= 0 for r in rows)
    assert not NOISE.search(done.stdout + done.stderr), NOISE.findall(done.stdout + done.stderr)
