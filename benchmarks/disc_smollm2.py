"""DiscQuant on SmolLM2-135M at 3 bits, groups of 64 (head in fp32), against RTN and the GPTQ
result of benchmarks/gptq_smollm2.py (same grid, same held-out windows): perplexity, KL, top-1,
time and the memory DiscQuant adds.

Run: python benchmarks/disc_smollm2.py --steps 150  (2 CPU cores: see the time column)
"""
from __future__ import annotations

import argparse
import json
import time

import discq
from discq.data import calibration_batches, eval_windows
from discq.eval import compare
from discq.models import load_model
from discq.passes import disc_config
from discq.pipeline import keep_head_filter

from _common import RESULTS, machine, peak_rss, write


def run(steps: int, seq_len: int, batch: int, lr: float, init: str, bits: int, g: int) -> dict:
    model, tok = load_model("smollm2-135m")
    reference, _ = load_model("smollm2-135m")
    windows = eval_windows(tok, "shakespeare", n_windows=8, seq_len=512)
    calib = calibration_batches(tok, "shakespeare", n_samples=max(64, steps * batch // 4),
                                seq_len=seq_len, batch_size=batch)
    cfg = disc_config(bits, g, calibration=calib, steps=steps, batch_size=batch, lr=lr,
                      init=init, warmup=min(128, steps // 10))
    with peak_rss() as mem:
        t0 = time.perf_counter()
        discq.quantize_(model, cfg, filter_fn=keep_head_filter(model))
        seconds = time.perf_counter() - t0
    row = {"method": f"disc ({steps} steps, init={init}, lr={lr}, {batch}x{seq_len} tokens)",
           "bits_per_weight": discq.bits_per_weight(model), "seconds": seconds,
           "peak_rss_gib": mem["peak_gib"], "extra_rss_gib": mem["extra_gib"],
           **compare(reference, model, windows, progress=False)}
    print(row, flush=True)
    gptq = json.loads((RESULTS / "gptq_smollm2.json").read_text())
    return {"machine": machine(), "bits": bits, "group_size": g, "rows": gptq["rows"] + [row],
            "note": "fp32/rtn/gptq rows from gptq_smollm2.json (same grid and eval windows)"}


def markdown(r: dict) -> str:
    gptq = next(x for x in r["rows"] if x["method"] == "gptq")["perplexity"]
    fp = next(x for x in r["rows"] if x["method"] == "fp32")["perplexity"]
    lines = [f"# DiscQuant, SmolLM2-135M, {r['bits']}-bit groups of {r['group_size']} "
             f"(head in fp32)", "", f"Machine: {r['machine']['cpu']} ({r['machine']['cores']} "
             f"cores), torch {r['machine']['torch']}, {r['machine']['date']}. {r['note']}. "
             f"Gap closed = (GPTQ − method)/(GPTQ − fp32) in perplexity.", "",
             "| method | bits/weight | perplexity | gap to fp closed vs GPTQ | KL | top-1 | "
             "time (s) | RSS added (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        closed = (gptq - x["perplexity"]) / (gptq - fp)
        lines.append(f"| {x['method']} | {x.get('bits_per_weight', 32):.3f} | "
                     f"{x['perplexity']:.2f} | {closed:.0%} | {x['kl']:.4f} | {x['top1']:.3f} | "
                     f"{x.get('seconds', 0):.0f} | {x.get('extra_rss_gib', 0):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--init", default="rtn")
    a = ap.parse_args()
    result = run(a.steps, a.seq_len, a.batch, a.lr, a.init, 3, 64)
    write("disc_smollm2", result, markdown(result))
