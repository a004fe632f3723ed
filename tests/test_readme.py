"""The README's quick-start is run exactly as written: its first Python block, in a fresh
directory, so the order it shows (quantize_, torch.compile, save, load) never breaks again."""
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs_as_written(tmp_path):
    block = re.search(r"```python\n(.*?)```", README.read_text(), flags=re.S).group(1)
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "3.375"
    assert (tmp_path / "out" / "discq.json").is_file()
