"""The symmetric grid's scale rule, side by side on SmolLM2-135M at llama.cpp's Q4_0 grid (4-bit
codes, blocks of 32, one fp16 scale, no zero point; head in fp32):

- llama.cpp's own Q4_0 rounding (the `gguf` package's reference quantizer) of the same weights;
- discq RTN with the rule before issue 17 (scale = 2·absmax / 15: the positive extreme
  clipped, the far negative level beyond every weight) — reproduced here only;
- discq RTN with the current rule (the signed extreme on the level -8, as llama.cpp does);
- discq GPTQ and DiscQuant on the current rule.

    python benchmarks/symmetric_grid.py [--n-calib 64] [--disc-steps 100]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path
from unittest import mock

import gguf
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write  # noqa: E402

import discq  # noqa: E402
from discq.data import calibration_batches, eval_windows  # noqa: E402
from discq.models import load_model  # noqa: E402
from discq.pipeline import evaluate, keep_head_filter  # noqa: E402
from discq.tensors import grid as grid_module  # noqa: E402

CONFIG = dict(bits=4, group_size=32, symmetric=True)


def old_symmetric_scale(w, grid, dtype):
    """The rule before issue 17, for this comparison only."""
    absmax = w.abs().amax(dim=-1, keepdim=True)
    return grid_module.round_up_to((2 * absmax / grid.qmax).clamp(
        min=grid_module.min_scale(dtype)), dtype)


def llama_cpp_q4_0(model):
    """Every selected linear replaced by gguf's reference Q4_0 round trip (dense fp32)."""
    q = copy.deepcopy(model)
    keep = keep_head_filter(q)
    for _, m in q.named_modules():
        if keep(m, ""):
            W = m.weight.detach().numpy()
            blocks = gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q4_0)
            m.weight = torch.nn.Parameter(torch.from_numpy(
                gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0).copy()),
                requires_grad=False)
    return q


def discq_copy(model, config, old_rule: bool = False):
    q = copy.deepcopy(model)
    patch = mock.patch.object(grid_module, "_symmetric_scale", old_symmetric_scale) \
        if old_rule else contextlib.nullcontext()
    with patch:
        discq.quantize_(q, config, filter_fn=keep_head_filter(q))
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--disc-steps", type=int, default=100)
    a = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    windows = eval_windows(tok, "shakespeare", n_windows=8, seq_len=512)
    calib = calibration_batches(tok, "shakespeare", n_samples=a.n_calib, seq_len=512, seed=0)
    disc_calib = calibration_batches(tok, "shakespeare", n_samples=64, seq_len=128, seed=0)
    runs = {
        "fp32": lambda: model,
        "llama.cpp Q4_0 (gguf reference quantizer)": lambda: llama_cpp_q4_0(model),
        "discq RTN, old rule 2·absmax/15": lambda: discq_copy(
            model, discq.rtn_config(**CONFIG), old_rule=True),
        "discq RTN, extreme on level -8": lambda: discq_copy(model, discq.rtn_config(**CONFIG)),
        f"discq GPTQ ({a.n_calib}x512 tokens), extreme on level -8": lambda: discq_copy(
            model, discq.gptq_config(**CONFIG, calibration=calib)),
        f"discq DiscQuant ({a.disc_steps} steps of 2x128 tokens, from RTN)": lambda: discq_copy(
            model, discq.disc_config(**CONFIG, calibration=disc_calib, steps=a.disc_steps,
                                     batch_size=2, init="rtn", warmup=a.disc_steps // 10)),
    }
    rows = []
    for name, make in runs.items():
        t0 = time.perf_counter()
        q = make()
        seconds = time.perf_counter() - t0
        m = evaluate(q, None if q is model else model, windows)
        rows.append({"method": name, **m, "seconds": round(seconds, 1)})
        print(rows[-1], flush=True)
    info = machine()
    md = ["# Symmetric 4-bit blocks of 32 (llama.cpp's Q4_0 grid), SmolLM2-135M, head fp32",
          "", f"Machine: {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
          f"{info['date']}. Eval: 8x512 tokens of hamlet (held out). Command: "
          f"`python benchmarks/symmetric_grid.py --n-calib {a.n_calib} --disc-steps "
          f"{a.disc_steps}`.", "",
          "| method | perplexity | KL | top-1 | time (s) |", "|---|---|---|---|---|"]
    md += [f"| {r['method']} | {r['perplexity']:.2f} | {r.get('kl', 0):.4f} | "
           f"{r.get('top1', 1):.3f} | {r['seconds']:.0f} |" for r in rows]
    write("symmetric_grid_smollm2", {"machine": info, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
