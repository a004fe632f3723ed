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
                                 [--only S1,S2]
                                 [--resume]   (--resume: skip rows already measured)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, machine  # noqa: E402
from quality_row import is_causal, load_model  # noqa: E402
from quality_rows import CALIB, Row, rows  # noqa: E402

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


def run_row(row: Row, timeout: int) -> dict:
    """The row in its own process; its meta.json (or why it has none)."""
    out = WORK / "rows" / row.id
    out.mkdir(parents=True, exist_ok=True)
    for f in ("meta.json", "weights.safetensors"):
        (out / f).unlink(missing_ok=True)
    (out / "row.json").write_text(json.dumps(row.__dict__))
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
    return json.loads((out / "meta.json").read_text())


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
        resume: bool = False) -> Path:
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
        todo = [r for r in todo if not (done.get(r.id, {}).get("ok")
                                        and done[r.id].get("spec") == r.spec)]
    for i, row in enumerate(todo, 1):
        t0 = time.perf_counter()
        meta = run_row(row, timeout)
        judged = evaluate(d, WORK / "rows" / row.id, reference) if meta.get("ok") else {}
        done[row.id] = result_row(row, meta, judged)
        done[row.id]["wall_seconds"] = time.perf_counter() - t0  # process + judging
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


def _summary(r: dict) -> str:
    if not r["ok"]:
        return f"{r['id']}: FAILED {r.get('error', '')[:300]}"
    score = (f"ppl {r['perplexity']:.2f} KL {r['kl']:.4f} top-1 {r['top1']:.3f}"
             if "perplexity" in r else f"cosine {r['cosine']:.5f}")
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
    a = ap.parse_args()
    for model in (["smollm2", "minilm"] if a.model == "all" else [a.model]):
        run(model, a.which, a.only, a.timeout, a.resume)


if __name__ == "__main__":
    main()
