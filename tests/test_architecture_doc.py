"""docs/architecture.md's "Adding a format" example is real: copy discq's sources, add the
three files the document shows (a tensors module, a passes module, a conformance subclass) and
nothing else, then run that test class and use the new method as a user would."""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"discq": "discq", "tensors": "discq/tensors", "passes": "discq/passes",
            "training": "discq/training"}


def _example_files() -> dict[str, str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    blocks = re.findall(r"```python\n(# (\S+\.py)\n.*?)```", text, flags=re.S)
    return {path: code for code, path in blocks}


def _tree_with_example(tmp: Path) -> tuple[Path, Path]:
    src, tests = tmp / "src", tmp / "tests"
    for folder, target in PACKAGES.items():
        shutil.copytree(ROOT / folder, src / target,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    tests.mkdir()
    for support in ("conformance.py", "conftest.py", "other_process.py"):  # the suite, helpers
        shutil.copy(ROOT / "tests" / support, tests)
    for path, code in _example_files().items():
        folder, name = path.split("/")
        dest = tests / name if folder == "tests" else src / PACKAGES[folder] / name
        dest.write_text(code)
    return src, tests


def test_the_documented_format_is_three_new_files():
    assert sorted(_example_files()) == ["passes/int8_row.py", "tensors/int8_row.py",
                                        "tests/test_int8_row.py"]


def test_adding_the_documented_format_passes_the_conformance_suite(tmp_path):
    src, tests = _tree_with_example(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(src)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-m", "not slow", "-W", "ignore::pytest.PytestUnknownMarkWarning",
                          str(tests / "test_int8_row.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert re.search(r"\b1[0-9] passed", run.stdout), run.stdout[-500:]
    use = textwrap.dedent("""
        import torch, discq
        from discq.methods import available_methods, config_constructor
        assert discq.__file__.startswith(%r), discq.__file__
        assert "int8-row" in available_methods()
        m = torch.nn.Sequential(torch.nn.Linear(64, 32))
        discq.quantize_(m, config_constructor("int8-row")())
        assert type(m[0].weight).__name__ == "Int8RowTensor"
        assert abs(discq.bits_per_weight(m) - (8 + 32 / 64)) < 1e-9
    """ % str(src))
    done = subprocess.run([sys.executable, "-c", use], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
