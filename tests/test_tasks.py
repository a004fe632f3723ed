"""Zero-shot tasks through lm-evaluation-harness (discq/tasks.py), offline: a local
multiple-choice task over a JSON-lines file, run on the tiny fixture and its quantized copy,
from Python and from the command line (scores side by side, and in the model card)."""
import copy
import shutil

import discq
import discq.eval
import pytest
from conftest import CALIB_TEXT, FIXTURES, HELDOUT_TEXT, TINY_LLAMA
from discq.tasks import side_by_side
from test_cli import discq_here

TASK = "discq_shakespeare_mc"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    data = shutil.copy(FIXTURES / "tasks" / "shakespeare_mc.jsonl", d / "mc.jsonl")
    (d / "mc.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return d


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_local_task_scores_the_model_and_its_quantized_copy(tiny_llama, task_dir):
    model, tok = tiny_llama
    original = discq.eval.tasks(model, tok, TASK, include_path=task_dir)
    assert set(original) == {TASK} and set(original[TASK]) == {"acc", "acc_stderr"}
    assert original[TASK]["acc"] >= 6 / 8  # trained on the plays: it knows most lines
    q = copy.deepcopy(model)
    discq.quantize_(q, discq.rtn_config(2, 32))
    ours = discq.eval.tasks(q, tok, [TASK], include_path=task_dir, limit=4)
    rows = side_by_side(ours, original)
    assert rows == [{"task": TASK, "metric": "acc", "this": round(ours[TASK]["acc"], 4),
                     "stderr": round(ours[TASK]["acc_stderr"], 4),
                     "original": round(original[TASK]["acc"], 4)}]


def test_bad_tasks_are_clear_errors(tiny_llama, task_dir, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="unknown task.*no_such_task"):
        discq.eval.tasks(model, tok, "no_such_task", include_path=task_dir)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        discq.eval.tasks(model, tok, TASK, include_path=tmp_path / "missing")
    with pytest.raises(ValueError, match="task names"):
        discq.eval.tasks(model, tok, [])


def test_tasks_from_the_command_line_and_in_the_model_card(tmp_path, task_dir, capsys):
    out = tmp_path / "q"
    q = discq_here(capsys, "quantize", TINY_LLAMA, "--method", "rtn", "--bits", "4",
                   "--calib", CALIB_TEXT, "--eval-data", HELDOUT_TEXT, "--eval-windows", "1",
                   "--tasks", TASK, "--tasks-dir", task_dir, "--out", out)
    (row,) = q["tasks"]
    assert row["task"] == TASK and 0 <= row["this"] <= 1 and 0 <= row["original"] <= 1
    card = (out / "README.md").read_text()
    assert "## Zero-shot tasks (lm-evaluation-harness)" in card and f"| {TASK} | acc |" in card
    e = discq_here(capsys, "eval", out, "--data", HELDOUT_TEXT, "--n-windows", "1",
                   "--seq-len", "128", "--tasks", TASK, "--tasks-dir", task_dir,
                   "--tasks-limit", "4")
    assert e["reference"] == str(TINY_LLAMA) and [r["task"] for r in e["tasks"]] == [TASK]
    from discq.cli import main  # without --json: the tasks' own table after the scores
    assert main(["eval", str(out), "--data", str(HELDOUT_TEXT), "--n-windows", "1",
                 "--seq-len", "128", "--tasks", TASK, "--tasks-dir", str(task_dir),
                 "--tasks-limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot tasks" in printed and TASK in printed
