"""QuIP# at 2 bits on SmolLM2-135M against GPTQ and RTN at 2 bits, groups of 64 (head kept in
fp32 for all): held-out perplexity, KL, top-1, bits per weight, time and resident memory.

Run one method per call (each in a fresh process, so its memory peak is its own); the rows
accumulate in benchmarks/results/quip_smollm2.json, a rerun of a method replaces its row:
    python benchmarks/quip_smollm2.py --method quip          # BlockLDLQ on E8P, no fine-tuning
    python benchmarks/quip_smollm2.py --method quip-ft       # + block and end-to-end tuning
    python benchmarks/quip_smollm2.py --method gptq          # 2-bit g64 baseline
    python benchmarks/quip_smollm2.py --method rtn

Target (issue 6): QuIP# perplexity at most half of GPTQ 2-bit g64's, at <= 2.1 bits/weight.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from _common import RESULTS, machine, peak_rss, write
from discq.passes import gptq_config, quip_sharp_config, rtn_config

import discq
from discq.data import calibration_batches, eval_windows
from discq.eval import compare
from discq.models import load_model
from discq.pipeline import keep_head_filter

NAME = "quip_smollm2"


def config_of(a: argparse.Namespace, calib):
    if a.method == "rtn":
        return rtn_config(a.bits, 64)
    if a.method == "gptq":
        return gptq_config(a.bits, 64, calibration=calib)
    return quip_sharp_config(a.bits, calib, finetune=a.method == "quip-ft",
                             refine_passes=a.refine_passes, ft_steps=a.ft_steps)


def run(a: argparse.Namespace) -> dict:
    model, tok = load_model("smollm2-135m")
    windows = eval_windows(tok, "shakespeare", n_windows=8, seq_len=512)
    calib = calibration_batches(tok, "shakespeare", n_samples=a.n_calib, seq_len=512)
    cfg = config_of(a, calib)
    load = os.getloadavg()[0]
    with peak_rss() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        discq.quantize_(model, cfg, filter_fn=keep_head_filter(model))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    reference, _ = load_model("smollm2-135m")
    name = f"{a.method} {a.bits}-bit" + ("" if a.method.startswith("quip") else " g64")
    row = {"method": name, "bits_per_weight": discq.bits_per_weight(model), "seconds": seconds,
           "cpu_seconds": cpu, "load_before": load, "load_after": os.getloadavg()[0],
           "peak_rss_gib": mem["peak_gib"], "extra_rss_gib": mem["extra_gib"],
           "config": cfg.to_dict(), **compare(reference, model, windows, progress=False)}
    if a.method == "quip-ft":
        row["finetune"] = getattr(model, "discq_finetune", {}).get("end_to_end")
    fp = {"method": "fp32", **compare(reference, reference, windows, progress=False)}
    print(row, flush=True)
    return merged(row, fp, a)


def merged(row: dict, fp: dict, a) -> dict:
    path = RESULTS / f"{NAME}.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows = [fp] + [r for r in old if r["method"] not in ("fp32", row["method"])] + [row]
    return {"machine": machine(), "n_calib": a.n_calib, "seq_len": 512, "n_eval": 8,
            "rows": rows}


def markdown(r: dict) -> str:
    rows = {x["method"]: x for x in r["rows"]}
    gptq = rows.get("gptq 2-bit g64", {}).get("perplexity")
    m = r["machine"]
    lines = ["# QuIP# vs GPTQ/RTN, SmolLM2-135M, 2 bits (head in fp32)", "",
             f"Machine: {m['cpu']} ({m['cores']} cores, shared), torch {m['torch']}, "
             f"{m['date']}. Calibration: {r['n_calib']}x512 tokens of the calibration plays; "
             f"eval: 8x512 tokens of hamlet (held out). Load = runnable processes on the 2 "
             f"cores at start/end (above 2, other work shared the cores).", "",
             "| method | bits/weight | perplexity | vs GPTQ 2-bit g64 | KL | top-1 | time (s) "
             "| CPU (s) | load | peak RSS (GiB) | RSS added (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        vs = f"{x['perplexity'] / gptq:.1%}" if gptq else ""
        load = f"{x['load_before']:.1f}/{x['load_after']:.1f}" if "load_before" in x else ""
        lines.append(f"| {x['method']} | {x.get('bits_per_weight', 32):.3f} | "
                     f"{x['perplexity']:.2f} | {vs} | {x['kl']:.4f} | {x['top1']:.3f} | "
                     f"{x.get('seconds', 0):.0f} | {x.get('cpu_seconds', 0):.0f} | {load} | "
                     f"{x.get('peak_rss_gib', 0):.2f} | {x.get('extra_rss_gib', 0):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("quip", "quip-ft", "gptq", "rtn"), default="quip")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--n-calib", type=int, default=128, help="512-token calibration sequences")
    ap.add_argument("--refine-passes", type=int, default=2)
    ap.add_argument("--ft-steps", type=int, default=100)
    args = ap.parse_args()
    result = run(args)
    write(NAME, result, markdown(result))
