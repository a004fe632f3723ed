"""DiscQuant on SmolLM2-135M sharded across 2 CPU processes (FSDP2, `strategy="fsdp"`) beside one
process: the same codes, and each process's parameters (teacher weights, the variables x) and
AdamW state, in bytes, plus each process's peak resident memory. 3-bit g64, head fp32, a short
run (default 8 steps of 4 sequences of 256 tokens; two processes take 2 each).

Run: python benchmarks/disc_fsdp.py [--steps 8]   (a few minutes on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


def child(world: int, steps: int, out: str) -> None:
    """One run (Lightning starts the second rank by running this file again)."""
    import discq
    from discq.data import calibration_batches
    from discq.models import load_model
    from discq.pipeline import keep_head_filter
    from discq.training import ShardBytes
    from _common import status_gib  # this process's own peak (not its parent's)

    model, tok = load_model("smollm2-135m")
    calib = calibration_batches(tok, "shakespeare", n_samples=32, seq_len=256, batch_size=4)
    kw = dict(devices=world, accelerator="cpu", precision="32-true", callbacks=[ShardBytes()],
              enable_progress_bar=False)
    if world > 1:
        kw["strategy"] = "fsdp"
    cfg = discq.disc_config(3, 64, calibration=calib, steps=steps, batch_size=4 // world,
                            warmup=2, init="rtn", trainer_kwargs=kw)
    discq.quantize_(model, cfg, filter_fn=keep_head_filter(model))
    codes = {n: m.weight.codes() for n, m in model.named_modules()
             if hasattr(getattr(m, "weight", None), "codes")}
    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.save({"codes": codes, "bytes": kw["callbacks"][0].out,
                "peak_rss_gib": status_gib("VmHWM")},
               f"{out}.w{world}.rank{rank}.pt")


def main() -> None:
    from _common import machine, write
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--child", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child, a.out)
        return
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "codes")
        for world in (1, 2):
            subprocess.run([sys.executable, str(HERE), "--child", str(world), str(a.steps),
                            "--out", out], check=True)
            rows[world] = [torch.load(f"{out}.w{world}.rank{r}.pt", weights_only=True)
                           for r in range(world)]
    one = rows[1][0]["codes"]
    same = all(torch.equal(r["codes"][k], v) for r in rows[2] for k, v in one.items())
    r = {"machine": machine(), "steps": a.steps, "command": "python benchmarks/disc_fsdp.py "
         + " ".join(sys.argv[1:]), "same_codes": same, "layers": len(one),
         "runs": {w: [{"bytes": x["bytes"], "peak_rss_gib": x["peak_rss_gib"]} for x in v]
                  for w, v in rows.items()}}
    write("disc_fsdp", r, markdown(r))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# DiscQuant sharded across processes (FSDP2 on CPU), SmolLM2-135M 3-bit g64", "",
             f"Machine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}, {m['date']}. "
             f"Command: `{r['command']}`. {r['steps']} steps of 4 sequences x 256 tokens (two "
             f"processes: 2 each, the gradients reduced), init at RTN, head fp32. Bytes are each "
             f"process's own: its shards of the parameters (the teacher weights, embeddings, "
             f"norms and the variables x) and of AdamW's two moments. Peak RSS (VmHWM) includes "
             f"the interpreter, the libraries and the buffers every process keeps whole (codes, "
             f"scales, pull: 4 bytes a weight).", "",
             "| processes | rank | parameters (MiB) | optimizer state (MiB) | peak RSS (GiB) |",
             "|---|---|---|---|---|"]
    for world, runs in r["runs"].items():
        for rank, x in enumerate(runs):
            lines.append(f"| {world} | {rank} | {x['bytes']['params'] / 2**20:.1f} | "
                         f"{x['bytes']['optimizer'] / 2**20:.1f} | {x['peak_rss_gib']:.2f} |")
    lines += ["", f"Codes of all {r['layers']} layers identical between one process and each "
              f"of the two: {r['same_codes']}.", "",
              "The parameters and optimizer state halve; peak RSS does not (it is higher with "
              "two processes): every process loads the whole model and builds its relaxed "
              "layers (x, codes, pull) whole before Lightning shards them, holds FSDP's "
              "gather buffers while a block runs, and gathers every parameter whole again "
              "after the fit (the model is handed back whole); the teacher's and student's "
              "logits (batch x 256 x 49152 vocabulary) dominate what a step adds. Building the "
              "relaxation on the meta device and filling each process's shard only is the "
              "next step."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
