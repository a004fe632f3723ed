"""Speed of quantized linears and of whole-model decode, side by side in one run.

Per layer shape (SmolLM2-135M's and a 7B-class model's), batch 1 and 16: the time of the
`torch.compile`d layer for fp32 and bf16 `nn.Linear`, discq's packed affine grid at 4/3/2 bits
(groups of 64, RTN), and torchao's int8 and int4 (intx, groups of 64) weight-only linears.
Then greedy decode tokens/s of SmolLM2 (static KV cache, compiled forward) for fp32, discq
4/3/2-bit and torchao int8 weight-only. Layers are timed twice: one layer called over and over
(weight in cache) and, at batch 1, a compiled stack of distinct layers whose weights do not fit
in cache (weights streamed from memory, as in decode). Variants are timed round-robin and each
keeps its best sample, so a burst of load from a neighbour on a shared machine spoils one
sample, not one variant's number.

Run: python benchmarks/speed.py [--quick] [--no-decode]   (results: benchmarks/results/)
"""
from __future__ import annotations

import argparse
import copy
import functools
import inspect
import json
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


def variants(N: int, K: int, seed: int = 0) -> dict[str, nn.Module]:
    """Every way of computing the same linear, each its own module."""
    torch.manual_seed(seed)
    base = nn.Linear(K, N, bias=False).eval().requires_grad_(False)
    out = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for bits in (4, 3, 2):
        out[f"discq {bits}-bit g64"] = discq.quantize_(copy.deepcopy(base),
                                                       discq.rtn_config(bits, 64))
    out.update(_torchao(base))
    return out


def _torchao(base: nn.Module) -> dict[str, nn.Module]:
    from torchao.quantization import (
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
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


def compiled(fn, name: str):
    """torch.compile of a call to `fn` through a function with its own code object. Dynamo keeps
    compiled graphs per code object: variants compiled from one shared code object (every
    module's forward) would chain their guards, so later variants would pay for checking
    earlier ones on every call."""
    ns = {"fn": fn}
    exec(compile("def call(*args, **kwargs):\n    return fn(*args, **kwargs)\n",
                 f"<speed: {name}>", "exec"), ns)
    if inspect.ismethod(fn):  # generate() reads forward's signature: keep it visible
        functools.update_wrapper(ns["call"], fn)
    return torch.compile(ns["call"])


def per_call_ms(fn, x: torch.Tensor, number: int) -> float:
    """Mean time of `number` back-to-back calls (one sample)."""
    with torch.no_grad():
        return Timer("fn(x)", globals={"fn": fn, "x": x}).timeit(number).mean * 1e3


def best_ms(fns: dict, xs: dict, rounds: int, sample_s: float = 0.02) -> dict[str, float]:
    """Each variant's best of `rounds` samples of ~`sample_s`, taken round-robin: load from a
    neighbour on a shared machine only ever slows a sample, so the minimum over many short
    interleaved samples is the number least spoiled by it, and no variant is favoured."""
    number = {n: max(1, round(sample_s / (per_call_ms(f, xs[n], 3) / 1e3))) for n, f in fns.items()}
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], per_call_ms(fn, xs[name], number[name]))
    return best


def compiled_variants(mods: dict, B: int, K: int) -> tuple[dict, dict]:
    """Fresh compiles (static shapes, as in a decode step) and warm inputs for batch B."""
    torch._dynamo.reset()
    fns = {name: compiled(mod, name) for name, mod in mods.items()}
    xs = {name: torch.randn(B, K, dtype=torch.bfloat16 if name == "bf16" else torch.float32)
          for name in mods}
    with torch.no_grad():
        for name, fn in fns.items():
            for _ in range(3):
                fn(xs[name])  # compile and warm up
    return fns, xs


def layer_rows(shapes: dict, batches: list[int], rounds: int) -> list[dict]:
    """Per shape and batch: one layer, called over and over (its weight stays in cache)."""
    rows = []
    for label, (N, K) in shapes.items():
        mods = variants(N, K)
        for B in batches:
            best = best_ms(*compiled_variants(mods, B, K), rounds)
            for name, ms in best.items():
                rows.append({"shape": label, "N": N, "K": K, "batch": B, "variant": name,
                             "ms": ms})
                print(rows[-1], flush=True)
    return rows


class Stack(nn.Module):
    """L layers of one shape applied to the same input, outputs returned as they are."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers)


def streamed_rows(shapes: dict, rounds: int, stream_bytes: int = 2**26) -> list[dict]:
    """Per shape, batch 1: time per layer in one compiled graph of L distinct layers whose fp32
    weights total `stream_bytes` (64 MiB, beyond this CPU's caches): every call reads each
    weight from memory, as a decode step of a whole model does. Shapes whose fp32 weight alone
    is that large are left out (their single-layer rows already stream)."""
    rows = []
    for label, (N, K) in shapes.items():
        L = -(-stream_bytes // (4 * N * K))
        if L == 1:
            continue
        copies = [variants(N, K, seed) for seed in range(L)]
        mods = {name: Stack([c[name] for c in copies]) for name in copies[0]}
        best = best_ms(*compiled_variants(mods, 1, K), rounds)
        for name, ms in best.items():
            rows.append({"shape": label, "N": N, "K": K, "batch": 1, "layers": L,
                         "variant": name, "ms": ms / L})
            print(rows[-1], flush=True)
    return rows


def decode_rows(tokens: int, rounds: int) -> list[dict]:
    """Greedy decode tokens/s with a static KV cache and a compiled forward (one graph for the
    prefill, one for every decode step), best of `rounds` round-robin generations."""
    from discq.models import load_model
    from discq.pipeline import keep_head_filter, timed_generation
    model, tok = load_model("smollm2-135m")
    prompt = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    models = {"fp32": model}
    for bits in (4, 3, 2):
        q = copy.deepcopy(model)
        models[f"discq {bits}-bit g64"] = discq.quantize_(q, discq.rtn_config(bits, 64),
                                                          filter_fn=keep_head_filter(q))
    models.update(_torchao_model(model))
    torch._dynamo.reset()
    with torch.no_grad():
        for name, m in models.items():
            m.forward = compiled(m.forward, name)
            for _ in range(2):  # compiles the prefill and the decode step, then warms up
                timed_generation(m, prompt, tokens, static_cache=True)
        best = {name: 0.0 for name in models}
        for _ in range(rounds):
            for name, m in models.items():
                best[name] = max(best[name],
                                 timed_generation(m, prompt, tokens, static_cache=True))
    rows = [{"variant": name, "tokens_per_s": v, "tokens": tokens} for name, v in best.items()]
    for r in rows:
        print(r, flush=True)
    return rows


def _torchao_model(model: nn.Module) -> dict[str, nn.Module]:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    q = copy.deepcopy(model)
    head = q.get_output_embeddings()
    quantize_(q, Int8WeightOnlyConfig(),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and m is not head)
    return {"torchao int8-wo": q}


def layer_table(rows: list[dict], first: str) -> list[str]:
    """Markdown rows: ms per variant, speed-up vs fp32 in parentheses."""
    names = list(dict.fromkeys(x["variant"] for x in rows))
    lines = [f"| shape | {first} | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for shape, B in dict.fromkeys((x["shape"], x["batch"]) for x in rows):
        got = {x["variant"]: x for x in rows if x["shape"] == shape and x["batch"] == B}
        fp = got["fp32"]["ms"]
        cells = [f"{got[n]['ms']:.3f} ({fp / got[n]['ms']:.2f}x)" if n in got else ""
                 for n in names]
        lead = B if first == "batch" else got["fp32"]["layers"]
        lines.append(f"| {shape} | {lead} | " + " | ".join(cells) + " |")
    return lines


def markdown(r: dict) -> str:
    m = r["machine"]
    title = (f"# Speed on CPU ({m['cpu']}, {m['cores']} cores, {m['threads']} threads), torch "
             f"{m['torch']}, {m['date']}")
    how = ("Time of the `torch.compile`d linear (ms; each variant's best of round-robin samples "
           "of ~20 ms); speed-up vs compiled fp32 in parentheses. RTN weights; groups of 64. "
           "discq runs its fused C++ kernel (up to 64 rows, so both batches here).")
    hot = ("One layer called over and over (its weight stays in the CPU's caches; each call also "
           "pays the compiled function's fixed cost):")
    lines = [title, "", how, "", hot, ""]
    lines += layer_table(r["layers"], "batch")
    if r.get("streamed"):
        streamed = ("Per layer, batch 1, in one compiled graph of L distinct layers of the "
                    "shape whose fp32 weights total 64 MiB, so every weight is read from memory "
                    "on every call, as in a decode step of a whole model:")
        lines += ["", streamed, ""]
        lines += layer_table(r["streamed"], "L")
    if r.get("decode"):
        fp = next(x for x in r["decode"] if x["variant"] == "fp32")["tokens_per_s"]
        lines += ["", f"Greedy decode of SmolLM2-135M, {r['decode'][0]['tokens']} new tokens, "
                  "static KV cache, compiled forward, head in fp32, best of round-robin runs:",
                  "", "| variant | tokens/s | vs fp32 |", "|---|---|---|"]
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
    shapes, rounds = (QUICK_SHAPES, 15) if a.quick else (SHAPES, 30)
    if a.decode_only:
        old = json.loads((RESULTS / f"{name}.json").read_text())
        layers, streamed = old["layers"], old.get("streamed")
    else:
        layers, streamed = layer_rows(shapes, [1, 16], rounds), streamed_rows(shapes, rounds)
    result = {"machine": machine(), "layers": layers, "streamed": streamed,
              "decode": None if a.no_decode else decode_rows(a.tokens, 2 if a.quick else 3)}
    write(name, result, markdown(result))
