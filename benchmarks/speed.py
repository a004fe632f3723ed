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

With --device cuda (a GPU): the same in bf16 against a bf16 baseline, discq on its Triton
kernels, each layer row also giving achieved memory bandwidth as a fraction of the device's peak
(PEAK_GBPS); no streamed table (a GPU's caches are far smaller than these weights).

Run: python benchmarks/speed.py [--quick] [--no-decode] [--device cuda]
Results: benchmarks/results/speed_cpu.{json,md} or speed_cuda_<device>.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import functools
import inspect
import json
import re
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
BASELINE = {"cpu": "fp32", "cuda": "bf16"}
# peak memory bandwidth (GB/s) by device name, first match wins (vendor data sheets)
PEAK_GBPS = [("H200", 4800), ("H100 PCIe", 2000), ("H100", 3350), ("A100-SXM4-80GB", 2039),
             ("A100", 1555), ("L40S", 864), ("L4", 300), ("A10G", 600), ("RTX 4090", 1008)]


def variants(N: int, K: int, seed: int = 0, device: str = "cpu") -> dict[str, nn.Module]:
    """Every way of computing the same linear, each its own module. On CPU the baseline is fp32
    (bf16 beside it); on a GPU it is bf16, and every variant takes bf16 activations."""
    torch.manual_seed(seed)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    base = nn.Linear(K, N, bias=False).eval().requires_grad_(False).to(device, dtype)
    out = {BASELINE[device]: base}
    if device == "cpu":
        out["bf16"] = copy.deepcopy(base).to(torch.bfloat16)
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
    """Fresh compiles (static shapes, as in a decode step) and warm inputs for batch B, in each
    variant's own dtype and device."""
    torch._dynamo.reset()
    fns = {name: compiled(mod, name) for name, mod in mods.items()}
    xs = {}
    for name, mod in mods.items():
        w = next(mod.parameters())
        xs[name] = torch.randn(B, K, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        for name, fn in fns.items():
            for _ in range(3):
                fn(xs[name])  # compile and warm up
    return fns, xs


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly quantized, tensor-subclass) weight keeps in memory."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(stored_bytes(getattr(t, n)) for n in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def bytes_moved(mod: nn.Module, B: int, N: int, K: int) -> int:
    """Weights read plus activations read and written by one call."""
    itemsize = next(mod.parameters()).element_size()
    return sum(stored_bytes(p) for p in mod.parameters()) + B * (N + K) * itemsize


def layer_rows(shapes: dict, batches: list[int], rounds: int, device: str) -> list[dict]:
    """Per shape and batch: one layer, called over and over (on CPU its weight stays in cache)."""
    rows = []
    for label, (N, K) in shapes.items():
        mods = variants(N, K, device=device)
        for B in batches:
            best = best_ms(*compiled_variants(mods, B, K), rounds)
            for name, ms in best.items():
                gbps = bytes_moved(mods[name], B, N, K) / (ms * 1e6)
                rows.append({"shape": label, "N": N, "K": K, "batch": B, "variant": name,
                             "ms": ms, "gbps": gbps})
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
        copies = [variants(N, K, seed) for seed in range(L)]  # CPU only: see __main__
        mods = {name: Stack([c[name] for c in copies]) for name in copies[0]}
        best = best_ms(*compiled_variants(mods, 1, K), rounds)
        for name, ms in best.items():
            rows.append({"shape": label, "N": N, "K": K, "batch": 1, "layers": L,
                         "variant": name, "ms": ms / L})
            print(rows[-1], flush=True)
    return rows


def decode_rows(tokens: int, rounds: int, device: str = "cpu") -> list[dict]:
    """Greedy decode tokens/s with a static KV cache and a compiled forward (one graph for the
    prefill, one for every decode step), best of `rounds` round-robin generations."""
    from discq.models import load_model
    from discq.pipeline import keep_head_filter, timed_generation
    model, tok = load_model("smollm2-135m")
    model.to(device, torch.float32 if device == "cpu" else torch.bfloat16)
    prompt = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    prompt = prompt.to(device)
    models = {BASELINE[device]: model}
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


def layer_table(rows: list[dict], first: str, base: str, peak_gbps: float | None) -> list[str]:
    """Markdown rows: ms per variant, speed-up vs the baseline in parentheses, and on a GPU the
    achieved memory bandwidth as a fraction of the device's peak."""
    names = list(dict.fromkeys(x["variant"] for x in rows))
    lines = [f"| shape | {first} | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for shape, B in dict.fromkeys((x["shape"], x["batch"]) for x in rows):
        got = {x["variant"]: x for x in rows if x["shape"] == shape and x["batch"] == B}
        ref = got[base]["ms"]
        cells = []
        for n in names:
            cell = f"{got[n]['ms']:.3f} ({ref / got[n]['ms']:.2f}x)" if n in got else ""
            if n in got and peak_gbps:
                cell += f", {got[n]['gbps'] / peak_gbps:.0%} of peak"
            cells.append(cell)
        lead = B if first == "batch" else got[base]["layers"]
        lines.append(f"| {shape} | {lead} | " + " | ".join(cells) + " |")
    return lines


def title(r: dict) -> str:
    m = r["machine"]
    if r["device"] == "cpu":
        where = f"CPU ({m['cpu']}, {m['cores']} cores, {m['threads']} threads)"
    else:
        peak = f"peak {r['peak_gbps']} GB/s" if r["peak_gbps"] else "peak bandwidth unknown"
        where = f"{r['device_name']} ({peak})"
    return f"# Speed on {where}, torch {m['torch']}, {m['date']}"


def markdown(r: dict) -> str:
    base, cpu = BASELINE[r["device"]], r["device"] == "cpu"
    how = ("Time of the `torch.compile`d linear (ms; each variant's best of round-robin samples "
           f"of ~20 ms); speed-up vs compiled {base} in parentheses. RTN weights; groups of 64. "
           + ("discq runs its fused C++ kernel (up to 64 rows, so both batches here)." if cpu else
              "discq runs its Triton kernels; bandwidth = weight bytes + activations in and out, "
              "per call."))
    hot = ("One layer called over and over (its weight stays in the CPU's caches; each call also "
           "pays the compiled function's fixed cost):" if cpu else "One layer called over and over:")
    lines = [title(r), "", how, "", hot, ""]
    lines += layer_table(r["layers"], "batch", base, r.get("peak_gbps"))
    if r.get("streamed"):
        streamed = ("Per layer, batch 1, in one compiled graph of L distinct layers of the "
                    "shape whose fp32 weights total 64 MiB, so every weight is read from memory "
                    "on every call, as in a decode step of a whole model:")
        lines += ["", streamed, ""]
        lines += layer_table(r["streamed"], "L", base, None)
    if r.get("decode"):
        ref = next(x for x in r["decode"] if x["variant"] == base)["tokens_per_s"]
        decode = (f"Greedy decode of SmolLM2-135M, {r['decode'][0]['tokens']} new tokens, "
                  f"static KV cache, compiled forward, head in {base}, best of round-robin runs:")
        lines += ["", decode, "", f"| variant | tokens/s | vs {base} |", "|---|---|---|"]
        lines += [f"| {x['variant']} | {x['tokens_per_s']:.1f} | {x['tokens_per_s'] / ref:.2f}x |"
                  for x in r["decode"]]
    return "\n".join(lines) + "\n"


def device_info(device: str) -> dict:
    if device == "cpu":
        return {"device": "cpu", "device_name": None, "peak_gbps": None}
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    name = torch.cuda.get_device_name()
    peak = next((gbps for key, gbps in PEAK_GBPS if key in name), None)
    return {"device": "cuda", "device_name": name, "peak_gbps": peak}


def result_name(info: dict, quick: bool) -> str:
    """speed_cpu[_quick] or speed_cuda_<device>[_quick]."""
    name = "speed_cpu" if info["device"] == "cpu" else (
        "speed_cuda_" + re.sub(r"[^a-z0-9]+", "_", info["device_name"].lower()).strip("_"))
    return name + ("_quick" if quick else "")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, short timings")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: bf16 baseline, Triton kernels, bandwidth vs the device's peak")
    ap.add_argument("--no-decode", action="store_true", help="skip whole-model decode")
    ap.add_argument("--decode-only", action="store_true",
                    help="rerun the decode part, keeping the layer rows already in the results")
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    info = device_info(a.device)
    name = result_name(info, a.quick)
    shapes, rounds = (QUICK_SHAPES, 15) if a.quick else (SHAPES, 30)
    if a.decode_only:
        old = json.loads((RESULTS / f"{name}.json").read_text())
        layers, streamed = old["layers"], old.get("streamed")
    else:
        layers = layer_rows(shapes, [1, 16], rounds, a.device)
        # the streamed table answers a CPU question (weights beyond the caches); a GPU's
        # caches are far smaller than these layers' weights already
        streamed = streamed_rows(shapes, rounds) if a.device == "cpu" else None
    result = {"machine": machine(), **info, "layers": layers, "streamed": streamed,
              "decode": None if a.no_decode else decode_rows(a.tokens, 2 if a.quick else 3,
                                                             a.device)}
    write(name, result, markdown(result))
