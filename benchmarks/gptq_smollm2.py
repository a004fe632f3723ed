"""GPTQ vs RTN on SmolLM2-135M at 3 bits, groups of 64 (head kept in fp32): held-out
perplexity, KL and top-1 against the original, quantization time and peak resident memory.

Run: python benchmarks/gptq_smollm2.py [--n-calib 128]  (about 10 minutes on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import copy
import time

import discq
from discq.data import calibration_batches, eval_windows
from discq.eval import compare
from discq.models import load_model
from discq.passes import gptq_config, rtn_config
from discq.pipeline import keep_head_filter

from _common import machine, peak_rss, write


def run(n_calib: int, bits: int, group_size: int) -> dict:
    model, tok = load_model("smollm2-135m")
    fp32_gib = sum(p.numel() * 4 for p in model.parameters()) / 2**30
    windows = eval_windows(tok, "shakespeare", n_windows=8, seq_len=512)
    calib = calibration_batches(tok, "shakespeare", n_samples=n_calib, seq_len=512)
    rows = [{"method": "fp32", **compare(model, model, windows, progress=False)}]
    for name, cfg in [("rtn", rtn_config(bits, group_size)),
                      ("gptq", gptq_config(bits, group_size, calibration=calib))]:
        q = copy.deepcopy(model) if name == "rtn" else model  # GPTQ in place: memory is measured
        with peak_rss() as mem:
            t0 = time.perf_counter()
            discq.quantize_(q, cfg, filter_fn=keep_head_filter(q))
            seconds = time.perf_counter() - t0
        rows.append({"method": name, "bits_per_weight": discq.bits_per_weight(q),
                     "seconds": seconds, "peak_rss_gib": mem["peak_gib"],
                     "extra_rss_gib": mem["extra_gib"],
                     **compare(model if name == "rtn" else _reference(), q, windows,
                               progress=False)})
        print(rows[-1], flush=True)
    return {"machine": machine(), "model": "smollm2-135m", "bits": bits,
            "group_size": group_size, "n_calib": n_calib, "seq_len": 512,
            "fp32_model_gib": fp32_gib, "rows": rows}


def _reference():
    return load_model("smollm2-135m")[0]


def markdown(r: dict) -> str:
    rtn = next(x for x in r["rows"] if x["method"] == "rtn")["perplexity"]
    lines = [f"# GPTQ vs RTN, SmolLM2-135M, {r['bits']}-bit groups of {r['group_size']}",
             "", f"Machine: {r['machine']['cpu']} ({r['machine']['cores']} cores), torch "
             f"{r['machine']['torch']}, {r['machine']['date']}. Calibration: {r['n_calib']}x512 "
             f"tokens of the calibration plays; eval: 8x512 tokens of hamlet (held out). Head in "
             f"fp32. fp32 model: {r['fp32_model_gib']:.2f} GiB.", "",
             "| method | bits/weight | perplexity | vs RTN | KL | top-1 | time (s) | peak RSS "
             "(GiB) | RSS added while quantizing (GiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['method']} | {x.get('bits_per_weight', 32):.3f} | "
                     f"{x['perplexity']:.2f} | {x['perplexity'] / rtn:.0%} | {x['kl']:.4f} | "
                     f"{x['top1']:.3f} | {x.get('seconds', 0):.0f} | "
                     f"{x.get('peak_rss_gib', 0):.2f} | {x.get('extra_rss_gib', 0):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args()
    result = run(a.n_calib, a.bits, a.group_size)
    write("gptq_smollm2", result, markdown(result))
