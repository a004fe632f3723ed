"""Speed of quantized linears and of whole-model decode, side by side in one run.

Per layer shape (SmolLM2-135M's and a 7B-class model's), batch 1 and 16: the median time of
the `torch.compile`d layer for fp32 and bf16 `nn.Linear`, discq's packed affine grid at 4/3/2
bits (groups of 64, RTN), and torchao's int8 and int4 (intx, groups of 64) weight-only
linears. Then greedy decode tokens/s of SmolLM2 (compiled forward) for fp32, discq 4/3/2-bit
and torchao int8 weight-only. Timings of different rows share the machine at the same moment
(interleaved per shape), so their ratios are meaningful even on a noisy shared machine.

Run: python benchmarks/speed.py [--quick] [--no-decode]   (results: benchmarks/results/)
"""
from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch
from _common import RESULTS, machine, write
from torch import nn
from torch.utils.benchmark import Timer

import discq

SHAPES = {"smollm2 q/o (576x576)": (576, 576), "smollm2 k/v (192x576)": (192, 576),
          "smollm2 gate/up (1536x576)": (1536, 576), "smollm2 down (576x1536)": (576, 1536),
          "7B q/k/v/o (4096x4096)": (4096, 4096), "7B gate/up (11008x4096)": (11008, 4096)}
QUICK_SHAPES = {k: v for k, v in SHAPES.items() if k.startswith("smollm2")}


def variants(N: int, K: int) -> dict[str, nn.Module]:
    """Every way of computing the same linear, each its own module."""
    torch.manual_seed(0)
    base = nn.Linear(K, N, bias=False).eval().requires_grad_(False)
    out = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for bits in (4, 3, 2):
        out[f"discq {bits}-bit g64"] = discq.quantize_(copy.deepcopy(base),
                                                       discq.rtn_config(bits, 64))
    out.update(_torchao(base))
    return out


def _torchao(base: nn.Module) -> dict[str, nn.Module]:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    out = {}
    for name, cfg in (("torchao int8-wo", Int8WeightOnlyConfig()),
                      ("torchao int4-wo g64 (intx)",
                       IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)))):
        try:
            m = copy.deepcopy(base)
            quantize_(m, cfg)  # in place
            out[name] = m
        except Exception as e:  # a config this torchao build cannot run here: say so
            warnings.warn(f"{name}: {type(e).__name__}: {e}")
    return out


def time_ms(fn, x: torch.Tensor, min_run_time: float) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)  # compile and warm up
        t = Timer("fn(x)", globals={"fn": fn, "x": x}).blocked_autorange(min_run_time=min_run_time)
    return t.median * 1e3


def layer_rows(shapes: dict, batches: list[int], min_run_time: float) -> list[dict]:
    rows = []
    for label, (N, K) in shapes.items():
        mods = variants(N, K)
        for B in batches:
            for name, mod in mods.items():
                dtype = torch.bfloat16 if name == "bf16" else torch.float32
                x = torch.randn(B, K, dtype=dtype)
                torch._dynamo.reset()
                ms = time_ms(torch.compile(mod), x, min_run_time)
                rows.append({"shape": label, "N": N, "K": K, "batch": B, "variant": name,
                             "ms": ms})
                print(rows[-1], flush=True)
    return rows


def decode_rows(tokens: int) -> list[dict]:
    from discq.models import load_model
    from discq.pipeline import keep_head_filter
    model, tok = load_model("smollm2-135m")
    prompt = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    models = {"fp32": model}
    for bits in (4, 3, 2):
        q = copy.deepcopy(model)
        models[f"discq {bits}-bit g64"] = discq.quantize_(q, discq.rtn_config(bits, 64),
                                                          filter_fn=keep_head_filter(q))
    models.update(_torchao_model(model))
    rows = []
    for name, m in models.items():
        torch._dynamo.reset()
        m.forward = torch.compile(m.forward, dynamic=True)
        with torch.no_grad():
            steady_decode_speed(m, prompt, tokens)  # compiles every graph the timed run needs
            rows.append({"variant": name, "tokens_per_s": steady_decode_speed(m, prompt, tokens),
                         "tokens": tokens})
        print(rows[-1], flush=True)
    return rows


def steady_decode_speed(model: nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    """Greedy tokens/s of a full generation (call twice: the first one compiles)."""
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokens / (time.perf_counter() - t0)


def _torchao_model(model: nn.Module) -> dict[str, nn.Module]:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    q = copy.deepcopy(model)
    head = q.get_output_embeddings()
    quantize_(q, Int8WeightOnlyConfig(),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and m is not head)
    return {"torchao int8-wo": q}


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Speed on CPU ({m['cpu']}, {m['cores']} cores, {m['threads']} threads), torch "
             f"{m['torch']}, {m['date']}", "",
             "Median time of the `torch.compile`d linear (ms); speed-up vs compiled fp32 in "
             "parentheses. RTN weights; groups of 64.", ""]
    names = list(dict.fromkeys(x["variant"] for x in r["layers"]))
    lines += ["| shape | batch | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    keys = list(dict.fromkeys((x["shape"], x["batch"]) for x in r["layers"]))
    for shape, B in keys:
        got = {x["variant"]: x["ms"] for x in r["layers"] if x["shape"] == shape and x["batch"] == B}
        fp = got["fp32"]
        cells = [f"{got[n]:.3f} ({fp / got[n]:.2f}x)" if n in got else "" for n in names]
        lines.append(f"| {shape} | {B} | " + " | ".join(cells) + " |")
    if r.get("decode"):
        fp = next(x for x in r["decode"] if x["variant"] == "fp32")["tokens_per_s"]
        lines += ["", f"Greedy decode of SmolLM2-135M, {r['decode'][0]['tokens']} new tokens, "
                  "compiled forward, head in fp32:", "", "| variant | tokens/s | vs fp32 |",
                  "|---|---|---|"]
        lines += [f"| {x['variant']} | {x['tokens_per_s']:.1f} | {x['tokens_per_s'] / fp:.2f}x |"
                  for x in r["decode"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, short timings")
    ap.add_argument("--no-decode", action="store_true", help="skip whole-model decode")
    ap.add_argument("--decode-only", action="store_true",
                    help="rerun the decode part, keeping the layer rows already in the results")
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    name = "speed_cpu_quick" if a.quick else "speed_cpu"
    if a.decode_only:
        layers = json.loads((RESULTS / f"{name}.json").read_text())["layers"]
    else:
        layers = layer_rows(QUICK_SHAPES if a.quick else SHAPES, [1, 16],
                            0.2 if a.quick else 1.0)
    result = {"machine": machine(), "layers": layers,
              "decode": None if a.no_decode else decode_rows(a.tokens)}
    write(name, result, markdown(result))
