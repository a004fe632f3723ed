"""What each `discq` subcommand does (argparse stays in cli.py; the work is in pipeline.py)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from discq import pipeline
from discq.io import is_quantized_dir, load_quantized, read_metadata, save_quantized


def _load_any(name: str):
    """(model, tokenizer, source name) from a saved discq directory or a model name."""
    from discq.models import load_model
    if is_quantized_dir(name):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(name)
        return load_quantized(name), tok, read_metadata(name).get("source")
    model, tok = load_model(name)
    return model, tok, name


def quantize(args: argparse.Namespace) -> dict:
    from discq.data import calibration_batches
    from discq.methods import METHODS
    from discq.models import load_model
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:  # fail before the long work
        raise FileExistsError(f"{out} is not empty; choose a new --out or pass --overwrite")
    model, tok = load_model(args.model)
    calib = None
    if METHODS[args.method].data_driven:
        calib = calibration_batches(tok, args.calib, n_samples=args.n_calib, seq_len=args.seq_len)
    extra = {} if args.steps is None else {"steps": args.steps}
    if args.group_along != "input":
        extra["group_along"] = args.group_along
    qmodel, summary = pipeline.quantize_copy(
        model, args.method, bits=args.bits, group_size=args.group_size or None,
        calibration=calib, quantize_head=args.quantize_head, symmetric=args.symmetric, **extra)
    evaluation = _card_evaluation(qmodel, model, tok, args)
    metadata = {"source": args.model, **summary,
                "calibration": _calibration_name(args) if calib is not None else None,
                "evaluation": evaluation}
    _save(qmodel, out, tok, args, metadata)
    return {"model": args.model, **summary, **_headline(evaluation), "out": str(out)}


def _card_evaluation(qmodel, model, tok, args: argparse.Namespace) -> dict | None:
    """Perplexity, KL and top-1 of the quantized model against the original, for the card."""
    if args.eval_windows <= 0:
        return None
    from discq.data import eval_windows
    windows = eval_windows(tok, args.eval_data, n_windows=args.eval_windows, seq_len=args.seq_len)
    ours = pipeline.evaluate(qmodel, model, windows)
    reference = pipeline.evaluate(model, None, windows, progress=False)
    return {"data": str(args.eval_data), "windows": args.eval_windows, "seq_len": args.seq_len,
            **{k: round(v, 4) for k, v in ours.items()},
            "reference_perplexity": round(reference["perplexity"], 4)}


def _headline(evaluation: dict | None) -> dict:
    return {} if not evaluation else {k: evaluation[k] for k in ("perplexity", "kl", "top1")}


def _calibration_name(args: argparse.Namespace) -> str:
    return f"{args.n_calib} windows of {args.seq_len} tokens of {args.calib}"


def _save(qmodel, out: Path, tok, args: argparse.Namespace, metadata: dict) -> None:
    """A transformers model directory with a model card; other models: save_quantized."""
    if not hasattr(qmodel, "save_pretrained"):
        save_quantized(qmodel, out, tokenizer=tok, overwrite=args.overwrite, metadata=metadata)
        return
    from discq.card import model_card
    from discq.hf import save_pretrained
    config = next((getattr(m, "discq_config", None) for m in qmodel.modules()
                   if getattr(m, "discq_config", None)), None)
    summary = {"model": args.model, **metadata}
    card = model_card(summary, calibration=metadata["calibration"],
                      evaluation=metadata["evaluation"], config=config)
    save_pretrained(qmodel, out, tokenizer=tok, overwrite=args.overwrite, metadata=metadata,
                    card=card)


def evaluate(args: argparse.Namespace) -> dict:
    from discq.data import eval_windows
    model, tok, source = _load_any(args.model)
    ref_name = args.reference or (source if source != args.model else None)
    reference = _load_any(ref_name)[0] if ref_name else None
    windows = eval_windows(tok, args.data, n_windows=args.n_windows, seq_len=args.seq_len)
    result = pipeline.evaluate(model, reference, windows)
    return {"model": args.model, "reference": ref_name, **{k: round(v, 4) for k, v in result.items()}}


def bench(args: argparse.Namespace) -> dict:
    from discq.passes import bits_per_weight
    model, tok, _ = _load_any(args.model)
    if args.compile:
        model.forward = torch.compile(model.forward)
    prompt = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    t0 = time.perf_counter()
    speed = pipeline.greedy_decode_speed(model, prompt, args.tokens,
                                         static_cache=args.compile)
    try:
        bpw = round(bits_per_weight(model), 3)
    except ValueError:
        bpw = None  # not quantized
    return {"model": args.model, "compiled": args.compile, "bits_per_weight": bpw,
            "tokens_per_s": round(speed, 2), "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_gib": round(pipeline.peak_rss_gib(), 2)}


def print_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for k in keys:
        table.add_column(k)
    for r in rows:
        table.add_row(*[_fmt(r.get(k)) for k in keys])
    Console().print(table)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
