"""Zero-shot tasks as the papers report them, through lm-evaluation-harness (`lm-eval`).

`tasks(model, tokenizer, ["arc_easy", "hellaswag"])` runs the model as it is in memory (a
quantized model on discq's formats, no conversion) through lm-eval's `HFLM` wrapper and returns
each task's metrics. Hub tasks need their datasets (the network, or `HF_DATASETS_OFFLINE` with a
filled cache); a task of your own is a directory of lm-eval YAML files (`include_path`), e.g.
a multiple-choice task over a local JSON-lines file:

    task: my_mc
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_mc.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list: [{metric: acc}]
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from discq.quiet import quiet_dependencies, quiet_loggers

Scores = dict[str, dict[str, float]]  # task -> metric ("acc", "acc_stderr", ...) -> value


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(f"task evaluation runs lm-evaluation-harness: pip install lm-eval "
                          f"({e})") from None
    return lm_eval, HFLM, TaskManager


def task_names(tasks: str | list[str]) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"tasks must be task names (a list, or a comma-separated string such "
                         f"as 'arc_easy,hellaswag'), got {tasks!r}")
    return names


def tasks(model: nn.Module, tokenizer, tasks: str | list[str], *,
          include_path: str | Path | None = None, limit: int | None = None,
          num_fewshot: int | None = None, batch_size: int = 8) -> Scores:
    """{task: {metric: value}} of `model` on lm-eval's `tasks` (`include_path`: a directory of
    your own task YAML files; `limit`: at most this many documents a task)."""
    names = task_names(tasks)
    lm_eval, HFLM, TaskManager = _lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"include_path {include_path} is not a directory of task YAML "
                                f"files")
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: lm-eval knows {len(manager.all_tasks)} "
                         f"tasks (`lm_eval ls tasks`); a task of your own needs include_path")
    device = str(next(model.parameters()).device)
    with quiet_loggers(["lm-eval", "lm_eval"]), quiet_dependencies():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False,
                                      bootstrap_iters=100, verbosity="ERROR")
    return {task: _metrics(res) for task, res in out["results"].items() if task in names}


def _metrics(res: dict) -> dict[str, float]:
    """lm-eval's "acc,none" / "acc_stderr,none" keys as "acc" / "acc_stderr"."""
    return {key.split(",")[0]: float(v) for key, v in res.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and key != "sample_len"}


def side_by_side(quantized: Scores, original: Scores | None) -> list[dict]:
    """One row a task and metric: the quantized model's score beside the original's."""
    rows = []
    for task, metrics in quantized.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            row = {"task": task, "metric": metric, "this": round(value, 4),
                   "stderr": round(metrics.get(f"{metric}_stderr", float("nan")), 4)}
            if original is not None:
                row["original"] = round(original[task][metric], 4)
            rows.append(row)
    return rows
