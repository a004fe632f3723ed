"""The README's Python blocks are run exactly as written, in a fresh directory: the quick-start
(its first block), so the order it shows (quantize_, torch.compile, save, load) never breaks
again, and (slow: SmolLM2) the GGUF export, the fast decode and streaming from disk."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs_as_written(tmp_path):
    block = re.search(r"```python\n(.*?)```", README.read_text(), flags=re.S).group(1)
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "3.375"
    assert (tmp_path / "out" / "discq.json").is_file()


def run_block(marker: str, cwd: Path, timeout: float) -> str:
    """Run the README's Python block containing `marker` in a fresh process; its stdout."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
                 if marker in b)
    done = subprocess.run([sys.executable, "-c", block], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_readme_gguf_export_runs_as_written(tmp_path):
    import gguf
    run_block("to_gguf", tmp_path, timeout=1200)
    reader = gguf.GGUFReader(str(tmp_path / "smollm2-Q4_K_M.gguf"))
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "Q5_0", "Q4_K", "Q6_K", "Q8_0"}


@pytest.mark.slow
def test_readme_fast_decode_runs_as_written(tmp_path):
    out = run_block("discq.generate", tmp_path, timeout=1800)
    assert out.startswith("To be, or not to be") and len(out.split()) > 10


@pytest.mark.slow
def test_readme_streaming_runs_as_written(tmp_path):
    out = run_block("quantize_pretrained", tmp_path, timeout=1800)
    assert float(out.strip().splitlines()[-1]) == pytest.approx(3.375, abs=0.01)
    assert (tmp_path / "smollm2-q3" / "model.safetensors.index.json").is_file()


def test_readme_mixture_of_experts_block_runs_as_written(tmp_path):
    out = run_block("qwen3_moe", tmp_path, timeout=600).splitlines()
    assert out[0] == "ExpertsQuantizedTensor"
    assert "87.2% of the model's matrix parameters" in out[1] and "routers" in out[3]
    assert (tmp_path / "qwen3-moe-q" / "config.json").is_file()


@pytest.mark.slow
def test_readme_mixed_widths_block_runs_as_written(tmp_path):
    out = run_block("discq.bits(", tmp_path, timeout=1800).strip().splitlines()
    assert out[0].startswith("mixed widths: ")
    assert float(out[-1]) <= 3.6
