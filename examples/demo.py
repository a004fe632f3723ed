"""`make demo`: quantize SmolLM2-135M at 3.25 bits per weight (3-bit codes, groups of 64 with
fp16 scales) with every method this version has, evaluate each against the original model on the
held-out plays, and print + save a table and a bar chart under demo_results/.

Budgeted for under 20 minutes on 2 CPU cores: calibration and step counts are smaller than the
papers' (which run on GPUs for hours); the benchmarks in benchmarks/ use the full settings.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from discq.data import calibration_batches, eval_windows
from discq.methods import available_methods
from discq.models import load_model
from discq.pipeline import evaluate, quantize_copy

# per-method settings that fit the time budget on 2 cores
DEMO_SETTINGS = {
    "rtn": {},
    "gptq": {"calib": (64, 512)},
    "disc": {"calib": (64, 128), "steps": 100, "batch_size": 2, "init": "rtn", "warmup": 10},
    "quip-sharp": {"calib": (64, 512)},
}


def run(model_name: str, bits: int, group_size: int, n_windows: int, out: Path) -> list[dict]:
    torch.manual_seed(0)
    model, tok = load_model(model_name)
    windows = eval_windows(tok, "shakespeare", n_windows=n_windows, seq_len=512)
    rows = [{"method": "fp32", "bits_per_weight": 32.0, **evaluate(model, model, windows),
             "seconds": 0.0}]
    _print_row(rows[-1])
    for method in available_methods():
        rows.append(_one_method(model, tok, method, bits, group_size, windows))
        _print_row(rows[-1])
    return rows


def _one_method(model, tok, method, bits, group_size, windows) -> dict:
    settings = dict(DEMO_SETTINGS.get(method, {}))
    calib = None
    if "calib" in settings:
        n, seq = settings.pop("calib")
        calib = calibration_batches(tok, "shakespeare", n_samples=n, seq_len=seq, batch_size=8,
                                    seed=0)
    t0 = time.perf_counter()
    qmodel, summary = quantize_copy(model, method, bits=bits, group_size=group_size,
                                    calibration=calib, **settings)
    seconds = time.perf_counter() - t0
    metrics = evaluate(qmodel, model, windows)
    return {"method": method, "bits_per_weight": summary["bits_per_weight"], **metrics,
            "seconds": round(seconds, 1)}


def _print_row(r: dict) -> None:
    print(f"  {r['method']:<11} {r['bits_per_weight']:>6.3f} bpw  ppl {r['perplexity']:>9.2f}  "
          f"KL {r.get('kl', 0):.4f}  top1 {r.get('top1', 1):.3f}  {r['seconds']:.0f}s", flush=True)


def write_results(rows: list[dict], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# {title}", "", "| method | bits/weight | perplexity | KL | top-1 | time (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.2f} | "
              f"{r.get('kl', 0):.4f} | {r.get('top1', 1):.3f} | {r['seconds']:.0f} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, out / "results.png", title)


def _plot(rows: list[dict], file: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["method"] for r in rows]
    a.bar(names, [r["perplexity"] for r in rows], color="tab:blue")
    a.set_yscale("log")
    a.set_title("held-out perplexity (lower is better)")
    b.bar(names, [r.get("kl", 0) for r in rows], color="tab:orange")
    b.set_title("KL to the original model (lower is better)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-windows", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("demo_results"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    rows = run(a.model, a.bits, a.group_size, a.n_windows, a.out)
    title = (f"{a.model}, {a.bits}-bit groups of {a.group_size}, held-out Shakespeare "
             f"({a.n_windows}x512 tokens), total {time.perf_counter() - t0:.0f}s")
    write_results(rows, a.out, title)


if __name__ == "__main__":
    main()
