"""Speed of quantized linears and of whole-model decode, side by side in one run.

Per layer shape (SmolLM2-135M's and a 7B-class model's), batch 1 and 16: the time of the
`torch.compile`d layer for fp32 and bf16 `nn.Linear`, discq's packed affine grid at 4/3/2 bits
(groups of 64, RTN) and GPTVQ's 2-bit 2-D codebooks, and torchao's int8 and int4 (intx, groups
of 64) weight-only linears.
Then greedy decode tokens/s of SmolLM2 through `discq.generate` (one compiled token step over a
static KV cache) for fp32 and discq 4-bit in blocks of 32 (head fp32, head 8-bit, and head 8-bit
on 8-bit activations), beside
llama.cpp (llama-cpp-python, `make install-llamacpp`) on its own Q4_0 quantization of the same
model, with the weight bytes each reads per token and the share of this machine's measured
memory bandwidth that reaches. Layers are timed twice: one layer called over and over
(weight in cache) and, at batch 1, a compiled stack of distinct layers whose weights do not fit
in cache (weights streamed from memory, as in decode). Variants are timed round-robin and each
keeps its best sample, so a burst of load from a neighbour on a shared machine spoils one
sample, not one variant's number.

With --device cuda (a GPU): the same in bf16 against a bf16 baseline, discq on its Triton
kernels, each layer row also giving achieved memory bandwidth as a fraction of the device's peak
(PEAK_GBPS); no streamed table (a GPU's caches are far smaller than these weights).

With --low-bit (decode only): QTIP 2-bit (HYB code, discq's AVX2 trellis kernel) and QuIP# 2-bit
(E8P, its fused CPU linear) with the 8-bit head, beside llama.cpp's IQ2_XS (made by
`llama-quantize` with an importance matrix: `make llama-tools`) and Q4_0, fp32 and discq's
fastest 4-bit row.

Run: python benchmarks/speed.py [--quick] [--no-decode] [--device cuda] [--low-bit]
Run: python benchmarks/speed.py --decode-only  (decode and prefill only: speed_cpu_decode_<machine>)
Results: benchmarks/results/speed_cpu[_lowbit].{json,md}, speed_cpu_decode_<machine>.{json,md}
or speed_cuda_<device>.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch
from _common import RESULTS, describe, machine, write
from torch import nn
from torch.utils.benchmark import Timer

import discq
from discq.decode import compile_apart

SHAPES = {"smollm2 q/o (576x576)": (576, 576), "smollm2 k/v (192x576)": (192, 576),
          "smollm2 gate/up (1536x576)": (1536, 576), "smollm2 down (576x1536)": (576, 1536),
          "7B q/k/v/o (4096x4096)": (4096, 4096), "7B gate/up (11008x4096)": (11008, 4096)}
LLAMA_ROW = "llama.cpp Q4_0 (its own quantizer)"
LLAMA_IQ2_ROW = "llama.cpp IQ2_XS (its own quantizer, imatrix)"
QTIP_ROW = "discq QTIP 2-bit HYB (random codes), head 8-bit"
QUIP_ROW = "discq QuIP# 2-bit E8P (random codes), head 8-bit"
PREFILL = (16, 128)  # prompt lengths of the prefill columns
INT8 = ", 8-bit activations"  # rows decoded with discq.generate(..., int8_activations=True)
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
    out["discq gptvq 2-bit 2-D"] = _gptvq(base)
    out.update(_torchao(base))
    return out


def _gptvq(base: nn.Module) -> nn.Module:
    """GPTVQ's format at 2 bits, 2-D codebooks of 2048 weights (2.13 bits a weight); the
    codebooks from a few k-means iterations (speed does not depend on them)."""
    m = copy.deepcopy(base)
    W = base.weight.detach().float().cpu()
    q = discq.VectorQuantizedTensor.from_hp(W, 2, 2, kmeans_iters=3)
    m.weight = nn.Parameter(q.to(base.weight.device).to(base.weight.dtype), requires_grad=False)
    return m


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
    fns = {name: compile_apart(mod, name) for name, mod in mods.items()}
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


def decode_models(device: str, low_bit: bool = False) -> tuple[dict, object]:
    """The decode variants of SmolLM2-135M: fp32 and discq's 4-bit grid in blocks of 32
    (symmetric: llama.cpp's Q4_0 values), head in fp32 and head (tied to the embedding) 8-bit,
    the latter on 8-bit activations, and the 3-bit grid with the 8-bit head on 8-bit activations
    (RTN weights: speed does not depend on the rounding method). `low_bit`: fp32, the fastest
    4-bit row, QTIP 2-bit (HYB code) and QuIP# 2-bit (E8P) with the 8-bit head instead."""
    from discq.models import load_model
    from discq.pipeline import keep_head_filter
    model, tok = load_model("smollm2-135m")
    model.to(device, torch.float32 if device == "cpu" else torch.bfloat16)
    models = {BASELINE[device]: model}
    q = copy.deepcopy(model)
    discq.quantize_(q, discq.rtn_config(4, 32, symmetric=True), filter_fn=keep_head_filter(q))
    if not low_bit:
        models["discq 4-bit g32, head fp32"] = q
    models["discq 4-bit g32, head 8-bit"] = discq.quantize_head_(copy.deepcopy(q), 8)
    # the same weights decoded on 8-bit activations: a shallow copy, so each row keeps its own
    # compiled decoder (discq.generate keeps one on the model)
    models["discq 4-bit g32, head 8-bit" + INT8] = copy.copy(models["discq 4-bit g32, head 8-bit"])
    if low_bit:
        del models["discq 4-bit g32, head 8-bit"]
        for row, fmt in ((QTIP_ROW, "qtip"), (QUIP_ROW, "quip")):
            models[row] = discq.quantize_head_(random_codes(copy.deepcopy(model), fmt), 8)
        return models, tok
    q3 = copy.deepcopy(model)
    discq.quantize_(q3, discq.rtn_config(3, 32, symmetric=True), filter_fn=keep_head_filter(q3))
    models["discq 3-bit g32, head 8-bit" + INT8] = discq.quantize_head_(q3, 8)
    return models, tok


def random_codes(model: nn.Module, fmt: str) -> nn.Module:
    """Every linear but the head as QTIP's 2-bit format (HYB code, `fmt="qtip"`) or QuIP#'s
    2-bit E8P (`fmt="quip"`) with random codes (any bitstream is a walk of the trellis and any
    16 bits an E8P point, and the decode's cost does not depend on which: quantizing 106M
    weights is what the quality tables measure), each layer's own seeded rotation and a scale
    of its weight's RMS."""
    from discq.tensors.hadamard import layer_rotation
    from discq.tensors.lattice import LatticeQuantizedTensor
    from discq.tensors.qtip import TrellisQuantizedTensor
    from discq.tensors.trellis import words
    g = torch.Generator().manual_seed(0)
    head = model.get_output_embeddings()
    for seed, m in enumerate(m for m in model.modules() if isinstance(m, nn.Linear)
                             and m is not head):
        (N, K), rms = m.weight.shape, m.weight.detach().pow(2).mean().sqrt()
        s_in, s_out, q_in, q_out = layer_rotation(N, K, seed)
        if fmt == "qtip":
            qdata = torch.randint(-2**31, 2**31, (N // 16, K // 16, words(2)), generator=g,
                                  dtype=torch.int64).to(torch.int32)
            w = TrellisQuantizedTensor(qdata, rms, s_in.half(), s_out.half(), q_in, q_out, 2,
                                       "hyb", 16, m.weight.shape, m.weight.dtype)
        else:
            qdata = torch.randint(0, 256, (N, K // 4), generator=g, dtype=torch.uint8)
            w = LatticeQuantizedTensor(qdata, rms, s_in.half(), s_out.half(), q_in, q_out, 2,
                                       m.weight.shape, m.weight.dtype)
        m.weight = nn.Parameter(w, requires_grad=False)
    return model


def llama_cpp_peers(tmp: str, low_bit: bool = False) -> tuple[dict, str]:
    """{row: (llama.cpp model, its file)} — llama.cpp (llama-cpp-python, this machine's threads)
    on its own Q4_0 quantization of the bundled SmolLM2 GGUF and, with `low_bit`, its IQ2_XS
    (`llama-quantize` with an importance matrix of 8×512 calibration tokens: it refuses IQ2_XS
    without one; `make llama-tools`) — and the bindings' version; no rows when they are not
    installed."""
    try:
        import llama_cpp
    except ImportError:
        warnings.warn("llama-cpp-python is not installed (make install-llamacpp): no llama.cpp row")
        return {}, ""
    from discq.llamacpp import llama_quantize_path, quantize
    from discq.models import bundled_path
    source = bundled_path("smollm2-135m")
    files = {LLAMA_ROW: quantize(source, f"{tmp}/smollm2-Q4_0.gguf", "Q4_0")}
    if low_bit:
        try:
            llama_quantize_path()
            files[LLAMA_IQ2_ROW] = quantize(source, f"{tmp}/smollm2-IQ2_XS.gguf", "IQ2_XS",
                                            imatrix=_imatrix(f"{tmp}/smollm2.imatrix.gguf"))
        except FileNotFoundError as e:
            warnings.warn(f"no llama.cpp IQ2_XS row: {e}")
    return {name: (llama_cpp.Llama(model_path=str(path), n_ctx=256,
                                   n_threads=torch.get_num_threads(), verbose=False), Path(path))
            for name, path in files.items()}, llama_cpp.__version__


def _imatrix(path: str) -> str:
    """llama.cpp's importance matrix of SmolLM2 on 8×512 calibration tokens."""
    from discq.data import calibration_batches
    from discq.models import load_model
    model, tok = load_model("smollm2-135m")
    calib = calibration_batches(tok, "shakespeare", n_samples=8, seq_len=512, seed=0)
    return str(discq.export.to_imatrix(model, calib, path))


def llama_cpp_isa() -> str:
    """The vector extensions llama.cpp was built with here ("AVX2/FMA/F16C")."""
    import llama_cpp
    info = llama_cpp.llama_print_system_info().decode()
    on = {k.strip() for k, _, v in (p.partition("=") for p in info.split("|")) if v.strip() == "1"}
    return "/".join(f for f in ("AVX2", "FMA", "F16C", "AVX512", "AVX512_VNNI", "AVX_VNNI",
                                "AMX_INT8") if f in on)


def llama_cpp_tokens_per_s(llm, prompt: list[int], tokens: int) -> float:
    """Greedy decode in llama.cpp: the prompt in one batch, then one token at a time."""
    import numpy as np
    t0 = time.perf_counter()
    llm.reset()
    llm.eval(prompt)
    for _ in range(tokens - 1):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    int(np.argmax(llm.scores[llm.n_tokens - 1]))  # the last token is chosen too, as in discq's
    return tokens / (time.perf_counter() - t0)


def decode_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every matrix but the token embedding, which is
    looked up row by row (a head tied to it is read whole, as the head)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return sum(stored_bytes(p) for p in model.parameters() if p is not emb or p is head)


def bandwidth_gbps(seconds: float = 1.0) -> float:
    """This machine's memory read bandwidth: the best sum over a 512 MiB fp32 tensor."""
    x = torch.ones(2**27)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def decode_rows(tokens: int, rounds: int, device: str = "cpu", low_bit: bool = False
                ) -> list[dict]:
    """Greedy decode tokens/s, best of `rounds` round-robin generations of exactly `tokens`
    tokens after a 16-token prompt: discq.generate (compiled token step, static cache) for each
    model, llama.cpp on its files beside them."""
    import tempfile
    models, tok = decode_models(device, low_bit)
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
    prompt = tok(text, return_tensors="pt").input_ids[:, :16].to(device)
    runs = {name: functools.partial(_discq_tokens_per_s, m, prompt, tokens, name.endswith(INT8))
            for name, m in models.items()}
    moved = {name: decode_bytes(m) for name, m in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        peers, version = llama_cpp_peers(tmp, low_bit) if device == "cpu" else ({}, "")
        for name, (llm, path) in peers.items():
            runs[name] = functools.partial(llama_cpp_tokens_per_s, llm, prompt[0].tolist(),
                                           tokens)
            moved[name] = path.stat().st_size
        for name, run in runs.items():
            print(f"warming up {name}", flush=True)
            run(), run()  # compiles discq's programs
        best = {name: 0.0 for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                best[name] = max(best[name], run())
        prefill = prefill_ms(models, peers, tok, rounds)
        ppl = perplexities({k: m for k, m in models.items() if k not in (QTIP_ROW, QUIP_ROW)},
                           {name: path for name, (_, path) in peers.items()}, tok, device)
        for llm, _ in peers.values():
            llm.close()
    gbps = bandwidth_gbps() if device == "cpu" else None
    rows = [{"variant": name, "tokens_per_s": v, "tokens": tokens, "prompt": prompt.shape[1],
             "bytes_per_token": moved[name], "machine_gbps": gbps, "perplexity": ppl.get(name),
             "prefill_ms": prefill.get(name)}
            for name, v in best.items()]
    for r in rows:
        if r["variant"] in peers:
            r["llama_cpp_python"] = version
            r["llama_cpp_isa"] = llama_cpp_isa()
    for r in rows:
        print(r, flush=True)
    return rows


def prefill_ms(models: dict, peers: dict, tok, rounds: int) -> dict[str, dict[str, float]]:
    """{row: {prompt length: ms}}: the time to the first token of a greedy generation after a
    prompt of PREFILL lengths (the first held-out window's tokens), best of `rounds` round-robin
    runs. discq: `discq.generate(..., 1)` (its compiled prefill over the whole prompt, the last
    position's logits, the pick), each length on a shallow copy of the model (each copy keeps
    its own decoder, sized for its prompt; the decode rows' decoder stays as timed); llama.cpp:
    `eval` of the prompt in one batch and the pick."""
    from discq.data import eval_windows
    from discq.decode import _ATTR  # where discq.generate keeps a model's decoder
    ids = eval_windows(tok, "shakespeare", n_windows=1)[0][:1]  # [1, 512]
    runs = {}
    for S in PREFILL:
        prompt = ids[:, :S]
        for name, m in models.items():
            m = copy.copy(m)
            vars(m).pop(_ATTR, None)
            runs[(name, S)] = functools.partial(_discq_first_token, m, prompt.to(
                next(m.parameters()).device), name.endswith(INT8))
        for name, (llm, _) in peers.items():
            runs[(name, S)] = functools.partial(llama_cpp_first_token, llm, prompt[0].tolist())
    for key, run in runs.items():
        print(f"warming up the prefill of {key[0]} ({key[1]} tokens)", flush=True)
        run(), run()
    best = {key: float("inf") for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            best[key] = min(best[key], run())
    out: dict[str, dict[str, float]] = {}
    for (name, S), seconds in best.items():
        out.setdefault(name, {})[str(S)] = seconds * 1e3
    return out


def _discq_first_token(model: nn.Module, prompt: torch.Tensor, int8_activations: bool) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        discq.generate(model, prompt, 1, eos_token_id=None, int8_activations=int8_activations)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def llama_cpp_first_token(llm, prompt: list[int]) -> float:
    import numpy as np
    t0 = time.perf_counter()
    llm.reset()
    llm.eval(prompt)
    int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return time.perf_counter() - t0


def perplexities(models: dict, ggufs: dict, tok, device: str, windows: int = 4
                 ) -> dict[str, float]:
    """Held-out perplexity (discq eval's: 4 windows of 512 tokens of the eval plays) of every
    decoded model and of llama.cpp's files {row: path} (run by llama.cpp)."""
    from discq.data import eval_windows
    from discq.eval import perplexity
    from discq.inference import plain_linears
    data = [w.to(device) for w in eval_windows(tok, "shakespeare", n_windows=windows)]
    out = {name: perplexity(plain_linears(m, int8_activations=True) if name.endswith(INT8) else m,
                            data, progress=False) for name, m in models.items()}
    from discq.llamacpp import LlamaCppModel
    for name, path in ggufs.items():
        with LlamaCppModel(path, n_ctx=512) as peer:
            out[name] = perplexity(peer, data, progress=False)
    return out


def _discq_tokens_per_s(model: nn.Module, prompt: torch.Tensor, tokens: int,
                        int8_activations: bool = False) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        discq.generate(model, prompt, tokens, eos_token_id=None,
                       int8_activations=int8_activations)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0)


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
        where = f"CPU ({describe(m)}, {m['threads']} threads)"
    else:
        peak = f"peak {r['peak_gbps']} GB/s" if r["peak_gbps"] else "peak bandwidth unknown"
        where = f"{r['device_name']} ({peak})"
    return f"# Speed on {where}, torch {m['torch']}, {m['date']}"


def kernels_used(r: dict) -> str:
    if r["device"] != "cpu":
        return ("discq runs its Triton kernels; bandwidth = weight bytes + activations in and "
                "out, per call.")
    if not any("gptvq" in x["variant"] for x in r["layers"]):  # layer tables from before GPTVQ
        return "discq runs its fused C++ kernel (up to 64 rows, so both batches here)."
    return ("discq runs its fused C++ kernels (affine: up to 64 rows, so both batches here; "
            "GPTVQ: up to 16 rows, codeword tables at batch 1, decoded rows at 16).")


def markdown(r: dict) -> str:
    base, cpu = BASELINE[r["device"]], r["device"] == "cpu"
    how = ("Time of the `torch.compile`d linear (ms; each variant's best of round-robin samples "
           f"of ~20 ms); speed-up vs compiled {base} in parentheses. RTN weights; groups of 64. "
           + kernels_used(r)) if r.get("layers") else ""
    hot = ("One layer called over and over (its weight stays in the CPU's caches; each call also "
           "pays the compiled function's fixed cost):" if cpu else "One layer called over and over:")
    lines = [title(r), ""]
    if r.get("command"):
        env = f" (DISCQ_CPU_KERNEL={r['kernel_env']})" if r.get("kernel_env") else ""
        lines += [f"Command: `{r['command']}`{env}", ""]
    if r.get("kernel_build"):
        lines += [f"discq's CPU kernels built for {r['kernel_build']}.", ""]
    if r.get("layers"):
        lines += [how, "", hot, ""]
        lines += layer_table(r["layers"], "batch", base, r.get("peak_gbps"))
    if r.get("streamed"):
        streamed = ("Per layer, batch 1, in one compiled graph of L distinct layers of the "
                    "shape whose fp32 weights total 64 MiB, so every weight is read from memory "
                    "on every call, as in a decode step of a whole model:")
        lines += ["", streamed, ""]
        lines += layer_table(r["streamed"], "L", base, None)
    if r.get("decode"):
        lines += ([""] if lines[-1] else []) + decode_table(r["decode"], base)
    return "\n".join(lines) + "\n"


def decode_table(rows: list[dict], base: str) -> list[str]:
    """Markdown: tokens/s, speed vs the baseline, weight bytes read per token and the share of
    the machine's measured bandwidth that reaches."""
    ref = next(x for x in rows if x["variant"] == base)["tokens_per_s"]
    gbps = rows[0].get("machine_gbps")
    peer = next((x["llama_cpp_python"] for x in rows if x.get("llama_cpp_python")), "")
    isa = next((x["llama_cpp_isa"] for x in rows if x.get("llama_cpp_isa")), "")
    head = (f"Greedy decode of SmolLM2-135M: {rows[0]['tokens']} new tokens after a "
            f"{rows[0].get('prompt', 16)}-token prompt, prefill included, best of round-robin "
            "runs; discq through `discq.generate` (one compiled token step, static KV cache), "
            f"llama.cpp through llama-cpp-python {peer} (built by `make install-llamacpp`"
            + (f", for {isa}" if isa else "") + ") "
            "with the same threads"
            + (f"; memory bandwidth measured here: {gbps:.1f} GB/s" if gbps else "") + ":")
    lengths = sorted({int(S) for x in rows for S in (x.get("prefill_ms") or {})})
    out = [head, "", f"| variant | tokens/s | vs {base} | MB read per token | share of bandwidth "
           "| held-out perplexity |" + "".join(f" prefill {S} tokens (ms) |" for S in lengths),
           "|---|---|---|---|---|---|" + "---|" * len(lengths)]
    for x in rows:
        mb, ppl = x.get("bytes_per_token"), x.get("perplexity")
        share = f"{mb * x['tokens_per_s'] / 1e9 / gbps:.0%}" if mb and gbps else ""
        pre = x.get("prefill_ms") or {}
        out.append(f"| {x['variant']} | {x['tokens_per_s']:.1f} | {x['tokens_per_s'] / ref:.2f}x "
                   f"| {f'{mb / 1e6:.0f}' if mb else ''} | {share} "
                   f"| {f'{ppl:.2f}' if ppl else ''} |"
                   + "".join(f" {pre[str(S)]:.1f} |" if str(S) in pre else " |" for S in lengths))
    if lengths:
        out += ["", "Prefill: the time to the first token after a prompt of that many tokens "
                "(the first held-out window's), best of round-robin runs: "
                "`discq.generate(..., 1)` (its compiled prefill, the last position's logits) and "
                "llama.cpp's `eval` of the prompt in one batch."]
    out += ["", "Perplexity: discq eval's (4 windows of 512 tokens of the held-out plays), the "
            "llama.cpp row computed by llama.cpp on its file. discq.generate decodes with the "
            "same weights and fp32 activations as discq eval (its one-row kernel and eval's "
            "dequantize-then-GEMM differ only in summation order), so this is the decoded "
            "model's perplexity; the 8-bit-activation rows are `discq.generate(..., "
            "int8_activations=True)` and their perplexity `discq eval --int8-activations`'s "
            "(each linear's input rounded per block of 32 in both). discq's weights are RTN's "
            "(speed does not depend on the rounding method; the quality tables compare methods "
            "at each width)."]
    if any(x["variant"] in (QTIP_ROW, QUIP_ROW) for x in rows):
        out += ["", "The QTIP and QuIP# rows' codes are random (every bitstream is a walk of the "
                "trellis, every 16 bits an E8P point, and the decode costs the same whichever "
                "they are; rounding 106M weights is what the quality benchmarks run), so they "
                "have no perplexity here: QTIP's and QuIP#'s 2-bit are in `quality_smollm2.md`. "
                "llama.cpp's IQ2_XS of SmolLM2 is mostly 4-bit: its rows of 576 are not whole 256-blocks, so llama.cpp stores "
                "them as IQ4_NL/Q4_0 (the tensor column of `gguf_llamacpp_smollm2_iq23.md`)."]
    return out


def device_info(device: str) -> dict:
    if device == "cpu":
        return {"device": "cpu", "device_name": None, "peak_gbps": None}
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    name = torch.cuda.get_device_name()
    peak = next((gbps for key, gbps in PEAK_GBPS if key in name), None)
    return {"device": "cuda", "device_name": name, "peak_gbps": peak}


def kernel_build() -> str | None:
    """The instruction sets discq's CPU kernels were built for here ("AVX2/FMA/F16C/AVX512VNNI")."""
    from discq.tensors.kernels import affine_cpu
    if not affine_cpu.load():
        return None
    isa = [f[2:].upper() for f in affine_cpu._flags() if f.startswith("-m")]
    return "/".join(isa) or "portable (no SIMD intrinsics)"


def result_name(info: dict, quick: bool, decode_only: bool = False) -> str:
    """speed_cpu[_quick], speed_cuda_<device>[_quick], or for a decode-only CPU run
    speed_cpu_decode_<machine> (one file per machine, so that the slow and the fast machines'
    decode tables stand side by side)."""
    if info["device"] == "cpu" and decode_only:
        build = os.environ.get("DISCQ_CPU_KERNEL", "")
        return ("speed_cpu_decode_" + machine_slug(machine())
                + (f"_kernel_{build}" if build in ("avx2", "portable") else "")
                + ("_quick" if quick else ""))
    name = "speed_cpu" if info["device"] == "cpu" else (
        "speed_cuda_" + _slug(info["device_name"]))
    return name + ("_quick" if quick else "")


def machine_slug(m: dict) -> str:
    """"amd_epyc_l3_32m_avx512": the CPU's name, its L3 and whether it has AVX-512."""
    l3 = (m.get("caches") or {}).get("L3", "")
    l3 = f"_l3_{int(l3[:-1]) // 1024}m" if l3.endswith("K") and l3[:-1].isdigit() else ""
    return _slug(m["cpu"]) + l3 + ("_avx512" if "avx512f" in (m.get("isa") or []) else "")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", re.sub(r"\(r\)|\(tm\)", "", name.lower())).strip("_")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, short timings")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: bf16 baseline, Triton kernels, bandwidth vs the device's peak")
    ap.add_argument("--no-decode", action="store_true", help="skip whole-model decode")
    ap.add_argument("--decode-only", action="store_true",
                    help="the decode and prefill table alone, in a file named after this "
                         "machine (speed_cpu_decode_<cpu>_l3_<size>[_avx512])")
    ap.add_argument("--low-bit", action="store_true",
                    help="decode only, 2-bit rows: QTIP and QuIP# 2-bit beside llama.cpp's IQ2_XS "
                         "(and the fastest 4-bit rows); results in speed_cpu_lowbit")
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    info = device_info(a.device)
    name = result_name(info, a.quick, a.decode_only) + ("_lowbit" if a.low_bit else "")
    shapes, rounds = (QUICK_SHAPES, 15) if a.quick else (SHAPES, 30)
    if a.low_bit or a.decode_only:
        layers, streamed = None, None
    else:
        layers = layer_rows(shapes, [1, 16], rounds, a.device)
        # the streamed table answers a CPU question (weights beyond the caches); a GPU's
        # caches are far smaller than these layers' weights already
        streamed = streamed_rows(shapes, rounds) if a.device == "cpu" else None
    result = {"machine": machine(), **info, "layers": layers, "streamed": streamed,
              "command": " ".join(["python", *sys.argv]), "kernel_build": kernel_build(),
              "kernel_env": os.environ.get("DISCQ_CPU_KERNEL"),
              "decode": None if a.no_decode else decode_rows(a.tokens, 2 if a.quick else 5,
                                                             a.device, a.low_bit)}
    write(name, result, markdown(result))
