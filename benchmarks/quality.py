"""Quality per bit against the peers, in one harness: every discq method at every width it
supports beside torchao (RTN, HQQ), HQQ, llm-compressor's GPTQ, AutoRound and llama.cpp's
quantizers, on SmolLM2-135M and Gemma 3 270M (perplexity, KL and top-1 agreement to the
original on held-out plays) and on the MiniLM encoder (cosine similarity of sentence embeddings).

Each row runs in its own process (`quality_row.py`: its memory peak is its own), in discq's
environment or in the peers' (`benchmarks/.peers`, made by `make bench-peers`: llm-compressor
pins another transformers), from the same fp32 weights and the same calibration tokens written
once to `benchmarks/.work/`. The row returns its weights dequantized; this process evaluates
every row the same way (`discq.eval.compare`, `discq.eval.embedding_similarity`). A row that
fails says why. Results accumulate in `benchmarks/results/quality_<model>.json` (a rerun of a
row replaces it); `benchmarks/report.py` turns them into tables and plots.

    python benchmarks/quality.py [--set full|quick] [--model smollm2|minilm|gemma3|all]
                                 [--only S1,S2] [--draws N]
                                 [--resume]   (--resume: skip rows already measured)

`--draws N` runs every row that reads calibration tokens on N calibration draws (draw 0 is the
set's usual tokens, draw k the same number of sequences drawn with seed k) and records each
draw's scores, their mean (the row's score) and sample standard deviation (`perplexity_sd`,
...): the spread that a difference between two rows must exceed to mean anything. With
`--resume` a row's existing result serves as its draw 0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, describe, machine  # noqa: E402
from quality_row import is_causal, load_model  # noqa: E402
from quality_rows import CALIB, Row, rows, uses_calibration  # noqa: E402

WORK = HERE / ".work"
PEERS_PYTHON = HERE / ".peers" / "bin" / "python"
EVAL = {"smollm2": (8, 512), "minilm": (32, 128), "gemma3": (8, 512)}  # windows x tokens
BUNDLED = {"smollm2": "smollm2-135m", "minilm": "minilm-l6", "gemma3": "gemma3-270m"}


def prepare(model: str, n_calib: int) -> Path:
    """The model's fp32 HF directory, calibration and eval tokens (and, for SmolLM2, the same
    weights as an F32 GGUF for llama.cpp), written once per setting."""
    from discq.data import calibration_batches, eval_windows
    from discq.models import bundled_path, load_model
    d = WORK / model
    stamp = {"n_calib": n_calib, "eval": list(EVAL[model]), "version": 1}
    if (d / "stamp.json").exists() and json.loads((d / "stamp.json").read_text()) == stamp:
        return d
    m, tok = load_model(BUNDLED[model])
    m.save_pretrained(d / "fp32")
    tok.save_pretrained(d / "fp32")
    calib = calibration_batches(tok, "shakespeare", n_samples=n_calib, seq_len=512, seed=0,
                                batch_size=n_calib)
    torch.save(torch.cat(list(calib)), d / "calib.pt")  # [N, 512]
    n, seq = EVAL[model]
    torch.save(torch.cat(list(eval_windows(tok, "shakespeare", n_windows=n, seq_len=seq))),
               d / "eval.pt")
    if bundled_path(BUNDLED[model]).suffix == ".gguf":  # llama.cpp's rows start from it
        import discq
        discq.export.to_gguf(m, d / "f32.gguf", source=bundled_path(BUNDLED[model]),
                             overwrite=True)
    (d / "stamp.json").write_text(json.dumps(stamp))
    return d


def calib_draw(d: Path, k: int) -> str:
    """The file of calibration draw k in the model's work directory (written once): draw 0 is
    `prepare`'s calib.pt, draw k as many sequences of the same plays drawn with seed k."""
    if k == 0:
        return "calib.pt"
    name = f"calib_d{k}.pt"
    if not (d / name).exists():
        from transformers import AutoTokenizer

        from discq.data import calibration_batches
        n, seq = torch.load(d / "calib.pt", weights_only=True).shape
        tok = AutoTokenizer.from_pretrained(d / "fp32")
        calib = calibration_batches(tok, "shakespeare", n_samples=n, seq_len=seq, seed=k,
                                    batch_size=n)
        torch.save(torch.cat(list(calib)), d / f".{name}.tmp")
        os.replace(d / f".{name}.tmp", d / name)
    return name


def run_row(row: Row, timeout: int, calib_file: str = "calib.pt") -> dict:
    """The row in its own process; its meta.json (or why it has none)."""
    out = WORK / "rows" / (row.id + ("" if calib_file == "calib.pt" else f"-{calib_file[6:-3]}"))
    out.mkdir(parents=True, exist_ok=True)
    for f in ("meta.json", "weights.safetensors"):
        (out / f).unlink(missing_ok=True)
    (out / "row.json").write_text(json.dumps({**row.__dict__, "calib_file": calib_file}))
    python = sys.executable if row.env == "main" else str(PEERS_PYTHON)
    if row.env == "peers" and not PEERS_PYTHON.exists():
        return {"ok": False, "error": "the peers' environment is missing: run `make bench-peers`"}
    cmd = [python, str(HERE / "quality_row.py"), str(out / "row.json"), str(WORK), str(out)]
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"did not finish in {timeout} s"}
    if not (out / "meta.json").exists():
        return {"ok": False, "error": f"the row's process exited {proc.returncode}: "
                                      f"{proc.stderr.strip()[-1500:]}"}
    return {**json.loads((out / "meta.json").read_text()), "out": str(out)}


def evaluate(d: Path, out: Path, reference) -> dict:
    """The row's weights in a copy of the fp32 model, judged against it."""
    import copy

    from safetensors.torch import load_file

    q = copy.deepcopy(reference)
    weights = load_file(out / "weights.safetensors")
    unknown = sorted(set(weights) - set(q.state_dict()))
    if unknown:
        raise KeyError(f"the row wrote tensors the model does not have: {unknown[:3]}")
    q.load_state_dict(weights, strict=False)
    return scores(d, reference, q)


METRICS = ("perplexity", "kl", "top1", "cosine")


def with_draws(result: dict, draws: list[dict]) -> dict:
    """The row's result over its calibration draws: each draw's scores kept, the row's score
    their mean, `<metric>_sd` their sample standard deviation."""
    result = {**result, "draws": draws}
    for m in METRICS:
        values = [dr[m] for dr in draws if m in dr]
        if len(values) == len(draws) > 1:
            result[m] = statistics.fmean(values)
            result[f"{m}_sd"] = statistics.stdev(values)
    return result


def _draw_scores(k: int, result: dict) -> dict:
    return {"draw": k, **{m: result[m] for m in (*METRICS, "seconds") if m in result}}


_CACHE: dict = {}


def scores(d: Path, reference, model) -> dict:
    """Causal LMs: perplexity, KL, top-1 (`discq.eval.compare`, the reference's log-probs
    computed once); encoders: the mean cosine of sentence embeddings
    (`discq.eval.embedding_similarity`)."""
    from discq.eval import compare, embedding_similarity, reference_logprobs
    ids = torch.load(d / "eval.pt", weights_only=True)  # [n, seq]
    if is_causal(d / "fp32"):
        windows = list(ids.split(1))
        key = (id(reference), str(d))
        if key not in _CACHE:  # the reference runs once per model, not once per row
            _CACHE.clear()
            _CACHE[key] = reference_logprobs(reference, windows)
        return compare(reference, model, windows, progress=False, cached=_CACHE[key])
    return {"cosine": embedding_similarity(reference, model, list(ids.split(8)),
                                           progress=False)}


def result_row(row: Row, meta: dict, judged: dict) -> dict:
    out = {"id": row.id, "line": row.line, "model": row.model, "env": row.env,
           "spec": row.spec, "ok": meta.get("ok", False), "date": time.strftime("%Y-%m-%d"),
           "machine": describe(machine()),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": _command()}
    for k in ("seconds", "peak_rss_gib", "rss_before_gib", "config", "versions", "error"):
        if k in meta:
            out[k] = meta[k]
    if meta.get("ok"):
        out["bits_per_weight"] = meta["bits"] / meta["numel"]
        out.update(judged)
    return out


def _command() -> str:
    return "python benchmarks/quality.py " + " ".join(sys.argv[1:])


def save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)  # a run stopped midway leaves the previous file whole


def run(model: str, which: str, only: str | None, timeout: int,
        resume: bool = False, draws: int = 1) -> Path:
    """Run the set's rows (or those `only` names) for `model`; a run of the whole set records
    its own wall time (preparation, the reference and every row) as the payload's "run"."""
    started, t_start = time.strftime("%Y-%m-%dT%H:%M:%S"), time.perf_counter()
    d = prepare(model, CALIB[which])
    reference = load_model(d / "fp32")
    name = f"quality_{model}" + ("_quick" if which == "quick" else "")
    path = RESULTS / f"{name}.json"
    payload = json.loads(path.read_text()) if path.exists() else {"rows": []}
    payload.update(machine=machine(), model=BUNDLED[model], n_calib=CALIB[which],
                   eval=EVAL[model])
    table = rows(model, which)
    done = {r["id"]: r for r in payload["rows"]}
    done = {k: v for k, v in done.items() if k in {r.id for r in table}}  # removed rows go
    done["fp32"] = {"id": "fp32", "line": "fp32", "ok": True, "bits_per_weight": 32.0,
                    **scores(d, reference, reference)}
    todo = [r for r in table if only is None or any(o in r.id for o in only.split(","))]
    if resume:  # rows already measured with the same settings are kept, not rerun
        todo = [r for r in todo if not _measured(done.get(r.id, {}), r, draws)]
    for i, row in enumerate(todo, 1):
        t0 = time.perf_counter()
        old = done.get(row.id, {})
        if resume and old.get("ok") and old.get("spec") == row.spec:
            result = old  # its draw 0
        else:
            meta = run_row(row, timeout)
            judged = evaluate(d, Path(meta["out"]), reference) if meta.get("ok") else {}
            result = result_row(row, meta, judged)
            result["wall_seconds"] = time.perf_counter() - t0  # process + judging
        if draws > 1 and result["ok"] and uses_calibration(row):
            result = _more_draws(row, result, draws, d, reference, timeout)
        done[row.id] = result
        payload["rows"] = list(done.values())
        save(path, payload)
        print(f"[{i}/{len(todo)}] {_summary(done[row.id])}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    if only is None and not resume:  # every row ran, one after the other, in this process
        payload["run"] = {"seconds": time.perf_counter() - t_start, "started": started,
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": len(todo),
                          "command": _command()}
        save(path, payload)
        print(f"{model}: the whole set took {payload['run']['seconds'] / 60:.1f} minutes",
              flush=True)
    return path


def _measured(result: dict, row: Row, draws: int) -> bool:
    """Already measured with these settings (and on `draws` draws where the row has any)."""
    ok = result.get("ok") and result.get("spec") == row.spec
    return bool(ok) and (draws == 1 or not uses_calibration(row)
                         or len(result.get("draws", ())) >= draws)


def _more_draws(row: Row, result: dict, draws: int, d: Path, reference, timeout: int) -> dict:
    """Draws 1..draws-1 of the row beside its draw 0 (`result`); a failed draw is recorded
    (`draws_error`) and leaves the row's measured draws as they were."""
    scores_ = [dr for dr in result.get("draws", []) if dr["draw"] < draws] or \
        [_draw_scores(0, {k: v for k, v in result.items() if k != "draws"})]
    for k in range(len(scores_), draws):
        meta = run_row(row, timeout, calib_draw(d, k))
        if not meta.get("ok"):
            return {**result, "draws_error": f"draw {k}: {meta.get('error')}"}
        scores_.append({**_draw_scores(k, {**meta, **evaluate(d, Path(meta["out"]), reference)}),
                        "machine": describe(machine()), "date": time.strftime("%Y-%m-%d")})
    return with_draws(result, scores_)


def _summary(r: dict) -> str:
    if not r["ok"]:
        return f"{r['id']}: FAILED {r.get('error', '')[:300]}"
    score = (f"ppl {r['perplexity']:.2f} KL {r['kl']:.4f} top-1 {r['top1']:.3f}"
             if "perplexity" in r else f"cosine {r['cosine']:.5f}")
    if "perplexity_sd" in r:
        score += f" (mean of {len(r['draws'])} draws, sd {r['perplexity_sd']:.2f})"
    return (f"{r['id']}: {r['bits_per_weight']:.3f} bits, {score}, {r['seconds']:.0f} s, "
            f"peak {r['peak_rss_gib']:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", dest="which", choices=["full", "quick"], default="full")
    ap.add_argument("--model", choices=[*BUNDLED, "all"], default="all",
                    help="all: SmolLM2 and MiniLM (Gemma 3 270M, an hour more: --model gemma3)")
    ap.add_argument("--only", help="run only the rows whose id contains one of these "
                                   "(comma-separated)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per row")
    ap.add_argument("--resume", action="store_true",
                    help="skip rows already in the results with the same settings")
    ap.add_argument("--draws", type=int, default=1,
                    help="calibration draws per data-driven row (mean and spread recorded)")
    a = ap.parse_args()
    if a.draws < 1:
        ap.error("--draws must be at least 1")
    for model in (["smollm2", "minilm"] if a.model == "all" else [a.model]):
        run(model, a.which, a.only, a.timeout, a.resume, a.draws)


if __name__ == "__main__":
    main()
