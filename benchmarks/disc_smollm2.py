"""DiscQuant on SmolLM2-135M at 3 bits, groups of 64 (head in fp32), against fp32, RTN and the
GPTQ result of benchmarks/gptq_smollm2.py (same grid, same 8x512 held-out hamlet windows):
perplexity, KL, top-1, time and the resident memory DiscQuant adds.

Run (one DiscQuant setting per call, each in a fresh process so its memory peak is its own; the
rows accumulate in benchmarks/results/disc_smollm2.json):
    python benchmarks/disc_smollm2.py --steps 150 --init rtn
    python benchmarks/disc_smollm2.py --steps 150 --init uniform
The machine is shared: CPU seconds and the load average (runnable processes per 2 cores) are
recorded beside the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from _common import RESULTS, machine, peak_rss, write
from discq.passes import disc_config

import discq
from discq.data import calibration_batches, eval_windows
from discq.eval import compare
from discq.models import load_model
from discq.pipeline import keep_head_filter

NAME = "disc_smollm2"


def run(a: argparse.Namespace) -> dict:
    model, tok = load_model("smollm2-135m")
    reference, _ = load_model("smollm2-135m")
    windows = eval_windows(tok, "shakespeare", n_windows=8, seq_len=512)
    calib = calibration_batches(tok, "shakespeare", n_samples=a.n_calib, seq_len=a.seq_len,
                                batch_size=a.batch)
    cfg = disc_config(3, 64, calibration=calib, steps=a.steps, batch_size=a.batch, lr=a.lr,
                      clamp=a.clamp, init=a.init, warmup=min(128, a.steps // 10),
                      gradient_checkpointing=not a.no_checkpointing,
                      checkpoint_dir=a.checkpoint_dir)
    load = os.getloadavg()[0]
    with peak_rss() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        discq.quantize_(model, cfg, filter_fn=keep_head_filter(model))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    row = {"method": f"disc {a.steps} steps, init={a.init}, lr={a.lr}, clamp={a.clamp}, "
                     f"{a.batch}x{a.seq_len} tokens/step, {a.n_calib} sequences"
                     f"{'' if a.no_checkpointing else ', act. ckpt'}",
           "bits_per_weight": discq.bits_per_weight(model), "seconds": seconds,
           "cpu_seconds": cpu, "threads": torch.get_num_threads(), "load_before": load, "load_after": os.getloadavg()[0],
           "peak_rss_gib": mem["peak_gib"], "extra_rss_gib": mem["extra_gib"],
           "config": cfg.to_dict(), **compare(reference, model, windows, progress=False)}
    print(row, flush=True)
    return row


def merged(row: dict) -> dict:
    """fp32/rtn/gptq rows of gptq_smollm2.json, then every DiscQuant row so far (a rerun of
    the same setting replaces its row)."""
    gptq = json.loads((RESULTS / "gptq_smollm2.json").read_text())
    path = RESULTS / f"{NAME}.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    disc = [r for r in old if "config" in r and r["method"] != row["method"]]
    return {"machine": machine(), "bits": 3, "group_size": 64,
            "rows": [r for r in gptq["rows"]] + disc + [row],
            "note": "fp32/rtn/gptq rows from gptq_smollm2.json (same grid and eval windows)"}


def markdown(r: dict) -> str:
    gptq = next(x for x in r["rows"] if x["method"] == "gptq")["perplexity"]
    fp = next(x for x in r["rows"] if x["method"] == "fp32")["perplexity"]
    m = r["machine"]
    lines = [f"# DiscQuant, SmolLM2-135M, {r['bits']}-bit groups of {r['group_size']} "
             f"(head in fp32)", "", f"Machine: {m['cpu']} ({m['cores']} cores, shared), torch "
             f"{m['torch']}, {m['date']}. {r['note']}. Eval: 8x512 tokens of hamlet (held out). "
             f"Gap closed = (GPTQ − method)/(GPTQ − fp32) in perplexity. Load = runnable "
             f"processes on the 2 cores at start/end (above 2, other work shared the cores).", "",
             "| method | bits/weight | perplexity | gap closed vs GPTQ | KL | top-1 | time (s) "
             "| CPU (s) | threads | load | peak RSS (GiB) | RSS added (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        closed = (gptq - x["perplexity"]) / (gptq - fp)
        load = f"{x['load_before']:.1f}/{x['load_after']:.1f}" if "load_before" in x else ""
        cpu = f"{x['cpu_seconds']:.0f}" if "cpu_seconds" in x else ""
        lines.append(f"| {x['method']} | {x.get('bits_per_weight', 32):.3f} | "
                     f"{x['perplexity']:.2f} | {closed:.0%} | {x['kl']:.4f} | {x['top1']:.3f} | "
                     f"{x.get('seconds', 0):.0f} | {cpu} | {x.get('threads', '')} | {load} | "
                     f"{x.get('peak_rss_gib', 0):.2f} | {x.get('extra_rss_gib', 0):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--clamp", type=float, default=1.0)
    ap.add_argument("--init", choices=("rtn", "uniform"), default="rtn")
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="keep activations instead of recomputing them (faster, more memory)")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="Lightning checkpoints here; rerunning the same command resumes")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default). On a loaded shared machine 1 "
                         "thread is faster than 2: the second one spins waiting for a core")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = merged(run(args))
    write(NAME, result, markdown(result))
