"""The main job end to end, as typed functions the CLI and the demo share: quantize a copy of a
model with a named method, and evaluate it against the original."""
from __future__ import annotations

import copy
import resource
import time

import torch
from torch import nn

from discq.methods import METHODS, build_config
from discq.passes import bits_per_weight, quantize_
from discq.tensors.base import QuantizedTensor


def keep_head_filter(model: nn.Module):
    """Filter that selects every weight matrix except the output head (kept in full precision,
    as in the GPTQ and DiscQuant papers)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return lambda m, fqn: m is not head


def quantize_copy(model: nn.Module, method: str, *, bits: int, group_size: int | None,
                  calibration=None, quantize_head: bool = False, head_bits: int | None = None,
                  budget: float | None = None, candidates: list | None = None,
                  **config_kwargs) -> tuple[nn.Module, dict]:
    """Quantize a deep copy of `model` (the original stays untouched, it is the reference).
    `head_bits` (8 or 4) also rounds the output head, and the token embedding tied to it, to a
    symmetric grid in blocks of 32 (llama.cpp's Q8_0/Q4_0) for inference speed; its quality
    cost shows in the evaluation. With `budget` (bits per weight) each layer gets one of
    `candidates` (configs; mixed widths) instead. Returns (quantized model, summary)."""
    if budget is not None:
        return _quantize_mixed_copy(model, budget, candidates, calibration, quantize_head)
    if head_bits is not None and (head_bits not in (4, 8) or quantize_head):
        raise ValueError(f"head_bits must be 8 or 4 (and not combined with quantize_head), got "
                         f"{head_bits!r}")
    if METHODS.get(method) is not None and METHODS[method].data_driven and calibration is None:
        raise ValueError(f"method {method!r} needs calibration data: pass calibration="
                         f"discq.data.calibration_batches(tokenizer, 'shakespeare')")
    config = build_config(method, bits=bits, group_size=group_size, calibration=calibration,
                          **config_kwargs)
    qmodel = copy.deepcopy(model)
    t0 = time.perf_counter()
    quantize_(qmodel, config, filter_fn=None if quantize_head else keep_head_filter(qmodel))
    if head_bits is not None:
        quantize_head_(qmodel, head_bits)
    seconds = time.perf_counter() - t0
    from discq.passes.quantize import coverage_of
    report = coverage_of(qmodel)
    summary = {"method": method, "bits": bits, "group_size": group_size,
               **({"quantized_share": round(report.share, 4)} if report else {}),
               **({"head_bits": head_bits} if head_bits else {}),
               **({"gguf": config_kwargs["gguf"]} if config_kwargs.get("gguf") else {}),
               "bits_per_weight": round(bits_per_weight(qmodel), 4),
               "quantize_seconds": round(seconds, 1),
               "peak_rss_gib": round(peak_rss_gib(), 2)}
    return qmodel, summary


def _quantize_mixed_copy(model: nn.Module, budget: float, candidates, calibration,
                         quantize_head: bool) -> tuple[nn.Module, dict]:
    from discq.passes import bits as bits_budget
    from discq.passes.quantize import coverage_of, plan_of
    qmodel = copy.deepcopy(model)
    t0 = time.perf_counter()
    quantize_(qmodel, budget=bits_budget(budget, calibration=calibration), candidates=candidates,
              filter_fn=None if quantize_head else keep_head_filter(qmodel))
    seconds = time.perf_counter() - t0
    plan = plan_of(qmodel)
    summary = {"method": "mixed widths", "bits": budget, "candidates": plan.candidates,
               "quantized_share": round(coverage_of(qmodel).share, 4),
               "bits_per_weight": round(bits_per_weight(qmodel), 4),
               "quantize_seconds": round(seconds, 1), "peak_rss_gib": round(peak_rss_gib(), 2),
               "bit_plan": plan.to_dict()}
    return qmodel, summary


def quantize_head_(model: nn.Module, bits: int = 8) -> nn.Module:
    """Round the output head (and the token embedding when tied to it: they stay one tensor) to
    a symmetric `bits`-bit grid in blocks of 32, which the CPU kernel multiplies and the
    embedding looks up row by row."""
    from discq.passes import rtn_config
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no nn.Linear output head to quantize")
    if isinstance(head.weight, QuantizedTensor):
        raise ValueError("the output head is quantized already (quantize_ without a filter, or "
                         "--quantize-head, includes it); quantize the other layers with "
                         "filter_fn=keep_head_filter(model) first")
    emb = model.get_input_embeddings()
    tied = emb is not None and emb.weight is head.weight
    quantize_(model, rtn_config(bits, 32, symmetric=True), filter_fn=lambda m, _: m is head)
    if tied:  # quantize_ replaced the head's weight only
        emb.weight = head.weight
    return model


def evaluate(model: nn.Module, reference: nn.Module | None, windows, *,
             progress: bool = True, cached: list | None = None) -> dict:
    """Perplexity on `windows`; against `reference` also its perplexity on the same windows
    (`reference_perplexity`), KL and top-1 agreement. `cached`: the reference's (without a
    reference, the model's) `discq.eval.reference_logprobs` on `windows`, so that it is not
    run again."""
    from discq import eval as ev
    if reference is None:
        return {"perplexity": ev.perplexity(model, windows, progress=progress, cached=cached)}
    out = ev.compare(reference, model, windows, progress=progress, cached=cached)
    return {k: out[k] for k in ("perplexity", "reference_perplexity", "kl", "top1") if k in out}


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def greedy_decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int,
                        lean: bool = False, int8_activations: bool = False) -> float:
    """Tokens per second of greedy generation of exactly `new_tokens`, after one warm-up run:
    with `lean`, discq.generate (compiled step, static cache; the warm-up compiles; with
    `int8_activations`, quantized linears on 8-bit activations), else transformers' eager
    generate."""
    if int8_activations and not lean:
        raise ValueError("int8_activations needs lean=True (discq.generate's compiled step)")
    if lean:
        from discq.decode import generate

        def run():
            generate(model, prompt, new_tokens, eos_token_id=None,
                     int8_activations=int8_activations)
    else:
        def run():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)
    with torch.no_grad():
        run()
        t0 = time.perf_counter()
        run()
    return new_tokens / (time.perf_counter() - t0)
