"""Resident memory DiscQuant adds on SmolLM2-135M (3-bit g64, head fp32), against what its state
needs: x, its gradient and AdamW's two moments (fp32) plus the uint8 code, the gap flag and the
fp16 pull term = 20 bytes per quantized weight. A short run (default 10 steps, no checkpoints,
so no checkpoint I/O in the peak); the result goes to benchmarks/results/disc_memory.md.

Run: python benchmarks/disc_memory.py [--steps 10]
"""
from __future__ import annotations

import argparse

import torch
from _common import machine, peak_rss, write
from discq.passes import disc_config

import discq
from discq.data import calibration_batches
from discq.models import load_model
from discq.pipeline import keep_head_filter

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    calib = calibration_batches(tok, "shakespeare", n_samples=32, seq_len=128, batch_size=2)
    f = keep_head_filter(model)
    n = sum(m.weight.numel() for fqn, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and f(m, fqn))
    cfg = disc_config(3, 64, calibration=calib, steps=a.steps, batch_size=2, init="rtn",
                      warmup=2)
    with peak_rss() as mem:
        discq.quantize_(model, cfg, filter_fn=f)
    need = 20 * n / 2**30
    r = {"machine": machine(), "steps": a.steps, "quantized_weights": n,
         "state_gib": need, "extra_rss_gib": mem["extra_gib"], "peak_rss_gib": mem["peak_gib"]}
    md = (f"# DiscQuant memory, SmolLM2-135M 3-bit g64 ({r['machine']['date']}, "
          f"{r['machine']['cpu']})\n\n| quantized weights | state needed (20 B/weight) | "
          f"RSS added during quantize_ | peak RSS |\n|---|---|---|---|\n"
          f"| {n / 1e6:.1f} M | {need:.2f} GiB | {mem['extra_gib']:.2f} GiB | "
          f"{mem['peak_gib']:.2f} GiB |\n\n{a.steps} steps of 2x128 tokens, activation "
          f"checkpointing, no checkpoint_dir. The rest of the added memory is activations, "
          f"logits (vocabulary 49152) and the allocator's free lists.\n")
    write("disc_memory", r, md)
