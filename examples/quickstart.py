"""Quantize the tiny test model three ways, compare, save, reload, compile and export.
Runs in about a minute on a laptop CPU: python examples/quickstart.py"""
import copy
import tempfile
from pathlib import Path

import torch

import discq
from discq.data import calibration_batches, eval_windows
from discq.eval import compare
from discq.models import load_model

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
model, tok = load_model(str(ROOT / "tiny_llama"))
calib = calibration_batches(tok, str(ROOT / "calib_plays.txt"), n_samples=16, seq_len=128)
windows = eval_windows(tok, str(ROOT / "heldout_hamlet.txt"), n_windows=8, seq_len=256)

for name, config in [("rtn", discq.rtn_config(bits=3, group_size=32)),
                     ("gptq", discq.gptq_config(bits=3, group_size=32, calibration=calib)),
                     ("disc", discq.disc_config(bits=3, group_size=32, calibration=calib,
                                                steps=60, batch_size=4, init="rtn"))]:
    q = copy.deepcopy(model)
    discq.quantize_(q, config)
    r = compare(model, q, windows, progress=False)
    print(f"{name:5s} {discq.bits_per_weight(q):.3f} bits/weight  perplexity {r['perplexity']:.3f}"
          f" (fp {r['reference_perplexity']:.3f})  KL {r['kl']:.4f}  top-1 {r['top1']:.3f}")

with tempfile.TemporaryDirectory() as d:
    discq.save_quantized(q, Path(d) / "q", tokenizer=tok)
    q = discq.load_quantized(Path(d) / "q")
x = windows[0][:1, :64]
compiled = torch.compile(q, fullgraph=True)
with torch.no_grad():
    print("compiled == eager:", torch.allclose(compiled(x).logits, q(x).logits, atol=1e-4))
ep = torch.export.export(q, (x,), kwargs={"use_cache": False})
print("exported nodes using the quantized op:",
      sum(n.target == torch.ops.discq.affine_linear.default for n in ep.graph.nodes))
