"""QuIP# and QTIP at 2 bits on SmolLM2-135M against GPTQ and RTN at 2 bits, groups of 64 (head
kept in fp32 for all): held-out perplexity, KL, top-1, bits per weight, time and resident memory.

Run one method per call (each in a fresh process, so its memory peak is its own); the rows
accumulate in benchmarks/results/quip_smollm2.json, a rerun of a method replaces its row:
    python benchmarks/quip_smollm2.py --method quip          # BlockLDLQ on E8P, no fine-tuning
    python benchmarks/quip_smollm2.py --method quip-ft       # + block and end-to-end tuning
    python benchmarks/quip_smollm2.py --method qtip --decode-tokens 16   # trellis (HYB), no tuning
    python benchmarks/quip_smollm2.py --method qtip --code 1mad
    python benchmarks/quip_smollm2.py --method gptq          # 2-bit g64 baseline
    python benchmarks/quip_smollm2.py --method rtn

Targets: QuIP# perplexity at most half of GPTQ 2-bit g64's, at <= 2.1 bits/weight (issue 6);
QTIP without fine-tuning below QuIP# without fine-tuning at no more bits, in under 30 minutes
(issue 18).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from _common import RESULTS, machine, timed_quantize, write
from discq.passes import gptq_config, qtip_config, quip_sharp_config, rtn_config

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
    if a.method.startswith("qtip"):
        return qtip_config(a.bits, calib, code=a.code, finetune=a.method == "qtip-ft",
                           ft_steps=a.ft_steps)
    return quip_sharp_config(a.bits, calib, finetune=a.method == "quip-ft",
                             refine_passes=a.refine_passes, ft_steps=a.ft_steps)


def run(a: argparse.Namespace) -> dict:
    model, tok = load_model("smollm2-135m")
    windows = eval_windows(tok, "shakespeare", n_windows=8, seq_len=512)
    calib = calibration_batches(tok, "shakespeare", n_samples=a.n_calib, seq_len=512)
    cfg = config_of(a, calib)
    timing = timed_quantize(model, cfg, keep_head_filter(model))
    reference, _ = load_model("smollm2-135m")
    name = f"{a.method} {a.bits}-bit" + {"quip": "", "qtip": f" {a.code}"}.get(a.method[:4],
                                                                               " g64")
    row = {"method": name, "bits_per_weight": discq.bits_per_weight(model), **timing,
           "config": cfg.to_dict(), "date": machine()["date"],
           "command": "python benchmarks/quip_smollm2.py " + " ".join(sys.argv[1:]),
           **compare(reference, model, windows, progress=False)}
    if a.decode_tokens:
        row.update(decode_speed(model, tok, a.decode_tokens))
    if a.method.endswith("-ft"):
        row["finetune"] = getattr(model, "discq_finetune", {}).get("end_to_end")
    fp = {"method": "fp32", **compare(reference, reference, windows, progress=False)}
    print(row, flush=True)
    return merged(row, fp, a)


def decode_speed(model, tok, n: int) -> dict:
    """Greedy decode of n tokens after a short prompt through `discq.generate` (a compiled token
    step over a static cache; Inductor's Python wrapper, to keep the compile short)."""
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    discq.generate(model, ids, 2, eos_token_id=None, cpp_wrapper=False)  # compiles
    t0 = time.perf_counter()
    out = discq.generate(model, ids, n, eos_token_id=None, cpp_wrapper=False)
    seconds = time.perf_counter() - t0
    return {"decode_tokens": int(out.shape[1] - ids.shape[1]), "decode_seconds": seconds,
            "decode_tokens_per_s": (out.shape[1] - ids.shape[1]) / seconds}


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
    lines = ["# QuIP# and QTIP vs GPTQ/RTN, SmolLM2-135M, 2 bits (head in fp32)", "",
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
    decoded = [x for x in r["rows"] if "decode_tokens_per_s" in x]
    if decoded:
        lines += ["", "Greedy decode of the quantized model through `discq.generate` (compiled "
                  "token step, static cache, Inductor's Python wrapper), after a 14-token prompt:",
                  ""]
        lines += [f"- {x['method']}: {x['decode_tokens_per_s']:.2f} tokens/s "
                  f"({x['decode_tokens']} tokens in {x['decode_seconds']:.1f} s)" for x in decoded]
    lines += ["", "Commands (rows without one predate recording it):", ""]
    lines += [f"- {x['method']}: `{x['command']}` ({x['date']})" for x in r["rows"]
              if "command" in x]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("quip", "quip-ft", "qtip", "qtip-ft", "gptq", "rtn"),
                    default="quip")
    ap.add_argument("--code", choices=("hyb", "1mad", "3inst"), default="hyb",
                    help="QTIP's trellis code")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--n-calib", type=int, default=128, help="512-token calibration sequences")
    ap.add_argument("--refine-passes", type=int, default=2)
    ap.add_argument("--ft-steps", type=int, default=100)
    ap.add_argument("--decode-tokens", type=int, default=0,
                    help="also time a compiled greedy decode of this many tokens")
    args = ap.parse_args()
    result = run(args)
    write(NAME, result, markdown(result))
