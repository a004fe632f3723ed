"""The quality benchmark's harness (benchmarks/quality*.py, runners/, report.py) on the tiny
model: a row in its own process writes the weights the quantized model computes with, the
parent judges them exactly as discq's evaluation judges the quantized model itself, bits are
counted as discq counts them, a failing row says why, and the report's Pareto check is right.
The peers (llm-compressor, AutoRound, HQQ) live in `make bench-peers`' environment and are not
run here; torchao and discq are."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402
import quality_rows  # noqa: E402
import report  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_llama, tiny_calibration, tiny_windows):
    """A work directory as `quality.prepare` lays it out, for the tiny model."""
    model, tok = tiny_llama
    d = tmp_path_factory.mktemp("work") / "tiny"
    model.save_pretrained(d / "fp32")
    tok.save_pretrained(d / "fp32")
    torch.save(torch.cat(list(tiny_calibration))[:8], d / "calib.pt")  # [8, 128]
    torch.save(torch.cat(list(tiny_windows))[:4], d / "eval.pt")  # [4, 256]
    return d


def _row(work: Path, id: str, runner: str, spec: dict):
    row = quality_rows.Row(id, "line", runner, "main", spec, "tiny")
    out = work.parent / "rows" / id
    out.mkdir(parents=True, exist_ok=True)
    (out / "row.json").write_text(json.dumps(row.__dict__))
    proc = subprocess.run([sys.executable, str(BENCH / "quality_row.py"), str(out / "row.json"),
                           str(work.parent), str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return row, out, json.loads((out / "meta.json").read_text())


def test_discq_row_is_judged_as_discq_judges_the_quantized_model(work, tiny_llama,
                                                                  tiny_calibration):
    import discq
    from discq.pipeline import keep_head_filter
    spec = {"method": "gptq", "bits": 3, "group_size": 32}
    row, out, meta = _row(work, "tiny-discq-gptq-3b-g32", "discq_runner", spec)
    assert meta["ok"], meta.get("traceback")
    reference = quality.load_model(work / "fp32")
    judged = quality.evaluate(work, out, reference)
    # the same calibration tokens, quantized in this process: same codes, same scores
    q = quality.load_model(work / "fp32")
    calib = list(torch.load(work / "calib.pt", weights_only=True).split(8))
    discq.quantize_(q, discq.gptq_config(3, 32, calibration=calib), filter_fn=keep_head_filter(q))
    direct = quality.scores(work, reference, q)
    assert judged["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-4)
    assert judged["kl"] == pytest.approx(direct["kl"], rel=1e-3, abs=1e-6)
    assert meta["bits"] / meta["numel"] == pytest.approx(discq.bits_per_weight(q))
    assert judged["perplexity"] > judged["reference_perplexity"]  # it did quantize
    result = quality.result_row(row, meta, judged)
    assert result["bits_per_weight"] == pytest.approx(3 + 24 / 32)


def test_torchao_row_counts_its_bits_and_matches_its_own_model(work):
    spec = {"bits": 4, "group_size": 32, "algorithm": "affine"}
    _, out, meta = _row(work, "tiny-torchao-rtn-4b-g32", "torchao_runner", spec)
    assert meta["ok"], meta.get("traceback")
    assert meta["bits"] / meta["numel"] == pytest.approx(4 + 24 / 32)
    assert meta["config"]["torchao.IntxWeightOnlyConfig"]["granularity"] == "PerGroup(32)"
    from safetensors.torch import load_file
    W = load_file(out / "weights.safetensors")
    q = W["model.layers.0.mlp.down_proj.weight"]  # [N, K]: at most 16 values per group of 32
    assert max(len(torch.unique(g)) for g in q.reshape(-1, 32)) <= 16


def test_a_failing_row_says_why(work):
    _, _, meta = _row(work, "tiny-discq-rtn-9b", "discq_runner",
                      {"method": "rtn", "bits": 9, "group_size": 32})
    assert not meta["ok"] and "bits" in meta["error"]


def test_llamacpp_row_order_undoes_the_converters():
    """The runner's q/k un-permutation inverts the row order discq's GGUF writer uses (the
    converter's)."""
    from discq.export.gguf_tensors import rope_rows as _rope_rows
    from types import SimpleNamespace
    import numpy as np
    pytest.importorskip("gguf")
    from runners.llamacpp_runner import _unpermute
    cfg = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)
    W = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    rows = _rope_rows("model.layers.0.self_attn.q_proj.weight", 32, cfg).numpy()
    assert np.array_equal(_unpermute(W[rows], 4), W)


def _r(id, line, bits, ppl):
    return {"id": id, "line": line, "ok": True, "bits_per_weight": bits, "perplexity": ppl}


def test_pareto_check_compares_each_peer_point_with_discqs_best_at_no_more_bits():
    rows = [_r("fp32", "fp32", 32, 40), _r("a", "discq X", 3.1, 50), _r("b", "discq Y", 4.1, 44),
            _r("c", "peer P", 3.2, 49), _r("d", "peer P", 4.2, 45), _r("e", "peer Q", 2.1, 60)]
    table = "\n".join(report.pareto(rows, "perplexity"))
    assert "| peer P | 3.200 | 49 | discq X (3.100) | 50 | **no** |" in table
    assert "| peer P | 4.200 | 45 | discq Y (4.100) | 44 | yes |" in table
    assert "peer Q" not in table  # below 3 bits: not judged


def test_rows_are_unique_and_every_runner_exists():
    for model in ("smollm2", "minilm"):
        full = quality_rows.rows(model, "full")
        assert len({r.id for r in full}) == len(full)
        assert {r.id for r in quality_rows.rows(model, "quick")} <= {r.id for r in full}
        for r in full:
            assert (BENCH / "runners" / f"{r.runner}.py").exists()
            assert r.env in ("main", "peers")


def test_set_time_sums_the_rows_wall_times_and_says_which_lack_one():
    rows = [{"id": "fp32"}, {"id": "a", "wall_seconds": 90.0}, {"id": "b", "wall_seconds": 30.0}]
    assert "The set took 2 minutes" in report._set_time(rows)
    assert "the other 1, measured before" in report._set_time(rows + [{"id": "c"}])
    assert report._set_time([{"id": "fp32"}, {"id": "c"}]) == ""


def test_set_time_of_a_whole_run_names_the_rows_rerun_after_it():
    run = {"seconds": 6600.0, "started": "2026-12-04T10:00:00", "finished": "2026-12-04T11:50:00",
           "rows": 2, "command": "python benchmarks/quality.py --set full"}
    rows = [{"id": "a", "finished": "2026-12-04T10:30:00"},
            {"id": "b", "finished": "2026-12-04T11:40:00"}]
    text = report._set_time(rows, run)
    assert "in one process in 110 minutes (2 rows" in text and "rerun" not in text
    rows[0]["finished"] = "2026-12-05T09:00:00"
    assert report._set_time(rows, run).endswith("rerun after it: a.")


def test_a_whole_run_records_its_time_and_a_partial_one_keeps_it(monkeypatch, tmp_path):
    rows = [quality_rows.Row(i, "line", "discq_runner", "main", {}, "smollm2") for i in "ab"]
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    monkeypatch.setattr(quality, "prepare", lambda model, n: tmp_path)
    monkeypatch.setattr(quality, "load_model", lambda d: None)
    monkeypatch.setattr(quality, "scores", lambda d, ref, m: {"perplexity": 1.0})
    monkeypatch.setattr(quality, "rows", lambda model, which: rows)
    monkeypatch.setattr(quality, "run_row", lambda row, timeout: {"ok": False, "error": "no"})
    path = quality.run("smollm2", "full", None, 10)
    run = json.loads(path.read_text())["run"]
    assert run["rows"] == 2 and run["seconds"] > 0
    quality.run("smollm2", "full", "a", 10)  # one row again: the whole run's record stays
    assert json.loads(path.read_text())["run"] == run


def test_a_row_on_several_calibration_draws_records_each_and_its_spread(work, monkeypatch):
    monkeypatch.setattr(quality, "WORK", work.parent)
    row = quality_rows.Row("tiny-discq-gptq-3b-g32", "line", "discq_runner", "main",
                           {"method": "gptq", "bits": 3, "group_size": 32}, "tiny")
    assert quality_rows.uses_calibration(row)
    assert not quality_rows.uses_calibration(quality_rows.Row(
        "r", "l", "discq_runner", "main", {"method": "rtn"}))
    reference = quality.load_model(work / "fp32")
    meta = quality.run_row(row, 600)
    first = quality.result_row(row, meta, quality.evaluate(work, Path(meta["out"]), reference))
    result = quality._more_draws(row, first, 3, work, reference, 600)
    draw1 = torch.load(work / "calib_d1.pt", weights_only=True)
    assert draw1.shape == (8, 128) and not torch.equal(
        draw1, torch.load(work / "calib.pt", weights_only=True))
    ppl = [d["perplexity"] for d in result["draws"]]
    assert [d["draw"] for d in result["draws"]] == [0, 1, 2] and ppl[0] == first["perplexity"]
    assert len(set(ppl)) == 3  # other tokens, other codes
    assert result["perplexity"] == pytest.approx(sum(ppl) / 3)
    assert result["perplexity_sd"] > 0 and result["kl_sd"] > 0
    # the report shows the spread and calls a difference within it level
    assert " ± " in report.value(result, "perplexity", ".2f")
    peer = {**first, "perplexity": result["perplexity"] + 1.5 * result["perplexity_sd"]}
    assert report.within_spread(result, peer, "perplexity")  # its unmeasured spread: the same
    peer["perplexity"] = result["perplexity"] + 2.5 * result["perplexity_sd"]
    assert not report.within_spread(result, peer, "perplexity")
    assert report.within_spread(first, peer, "perplexity") is None
