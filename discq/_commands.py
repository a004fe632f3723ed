"""What each `discq` subcommand does (argparse stays in cli.py; the work is in pipeline.py)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from discq import pipeline
from discq.io import is_quantized_dir, load_quantized, read_metadata, save_quantized
from discq.widths import candidate_configs, check_widths


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
    check_widths(args)
    _check_format(args)
    if args.stream:
        return _quantize_streaming(args, out)
    model, tok = load_model(args.model)
    calib = None
    if METHODS[args.method].data_driven or args.target_bpw is not None:  # (sensitivities)
        calib = calibration_batches(tok, args.calib, n_samples=args.n_calib, seq_len=args.seq_len)
    extra = _config_extras(args) if args.target_bpw is None else \
        {"budget": args.target_bpw, "candidates": candidate_configs(args, calib, _config_extras)}
    qmodel, summary = pipeline.quantize_copy(
        model, args.method, bits=args.bits, group_size=args.group_size or None,
        calibration=calib, quantize_head=args.quantize_head, head_bits=args.head_bits,
        symmetric=args.symmetric, **extra)
    from discq.passes.quantize import coverage_of, plan_of
    if coverage_of(qmodel) is not None:  # what it quantized, and what it left and why
        print(coverage_of(qmodel).describe(names=5))  # (stderr with --json)
    if plan_of(qmodel) is not None:  # mixed widths: what each matrix got
        print(plan_of(qmodel).describe())
    evaluation = _card_evaluation(qmodel, model, tok, args)
    task_rows = task_scores(qmodel, model, tok, args)
    if task_rows:
        evaluation = {**(evaluation or {}), "tasks": task_rows}
    metadata = {"source": args.model, **summary,
                "calibration": _calibration_name(args) if calib is not None else None,
                "evaluation": evaluation}
    _save(qmodel, out, tok, args, metadata)
    summary.pop("bit_plan", None)  # in the manifest and the card, printed above
    return {"model": args.model, **summary, **_headline(evaluation), "out": str(out),
            **({"tasks": task_rows} if task_rows else {})}


def _config_extras(args: argparse.Namespace) -> dict:
    """The config keywords the command line's options set beyond bits and group size."""
    import inspect

    from discq.methods import config_constructor
    extra = {} if args.steps is None else {"steps": args.steps}
    if args.group_along != "input":
        extra["group_along"] = args.group_along
    if getattr(args, "hessian", "inputs") != "inputs":
        if "hessian" not in inspect.signature(config_constructor(args.method)).parameters:
            raise ValueError(f"--hessian {args.hessian}: {args.method} takes no Hessian; use "
                             f"it with gptq, gptvq, quip-sharp or qtip")
        extra["hessian"] = args.hessian
    if getattr(args, "format", "hf").startswith("gguf:"):  # the mixture decides the grids
        extra["gguf"] = args.format.split(":", 1)[1]
    if getattr(args, "checkpoint_dir", None):
        if "checkpoint_dir" not in inspect.signature(config_constructor(args.method)).parameters:
            raise ValueError(f"--checkpoint-dir: {args.method} finishes in one pass and keeps no "
                             f"checkpoints; drop the option")
        extra["checkpoint_dir"] = args.checkpoint_dir
    return extra


def _quantize_streaming(args: argparse.Namespace, out: Path) -> dict:
    """--stream: `quantize_pretrained` from the model directory's shards."""
    from discq.data import calibration_batches
    from discq.methods import METHODS, build_config
    from discq.stream import quantize_pretrained
    if not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--stream reads a transformers model directory (config.json and "
                         f"safetensors shards); {args.model!r} is not one")
    if args.format != "hf" or args.head_bits or args.checkpoint_dir:
        raise ValueError("--stream writes the transformers layout (--format hf), has no "
                         "--head-bits and resumes from <out>.partial by itself (no "
                         "--checkpoint-dir); drop those options")
    calib = None
    if METHODS[args.method].data_driven:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.model)
        calib = calibration_batches(tok, args.calib, n_samples=args.n_calib, seq_len=args.seq_len)
    config = build_config(args.method, bits=args.bits, group_size=args.group_size or None,
                          calibration=calib, symmetric=args.symmetric, **_config_extras(args))
    t0 = time.perf_counter()
    quantize_pretrained(args.model, config, out, quantize_head=args.quantize_head,
                        dtype=getattr(torch, args.dtype) if args.dtype else None,
                        overwrite=args.overwrite, metadata={"source": args.model})
    return {"model": args.model, "method": args.method, "bits": args.bits, "streamed": True,
            "quantize_seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_gib": round(pipeline.peak_rss_gib(), 2), "out": str(out)}


def plan(args: argparse.Namespace) -> dict:
    """`discq plan`: the estimate `quantize_` and `quantize_pretrained` check before running."""
    from discq.methods import build_config
    from discq.passes.memory_plan import GiB, available_bytes, plan_run
    from discq.passes.prepare import planning_targets
    from discq.passes.quantize import planned_coverage
    from discq.pipeline import keep_head_filter
    if (Path(args.model) / "config.json").is_file():
        from discq.stream import skeleton
        model = skeleton(Path(args.model))
    else:
        from discq.models import load_model
        model = load_model(args.model)[0]
    config = build_config(args.method, bits=args.bits, group_size=args.group_size or None,
                          symmetric=args.symmetric, **_config_extras(args))
    chosen = None if args.quantize_head else keep_head_filter(model)
    matrices, report = planned_coverage(model, chosen)
    result = plan_run(model, config, planning_targets(matrices),
                      tokens=args.n_calib * args.seq_len, stream=args.stream,
                      dtype=getattr(torch, args.dtype) if args.dtype else None)
    free = available_bytes()
    summary = {"model": args.model, "method": args.method, "stream": args.stream,
               **result.to_dict(), "available_gib": round(free / GiB, 2),
               "fits": result.peak <= free, "coverage": report.to_dict()}
    if not args.json:  # the parts and the coverage as lines, the rest as the table
        print(result.describe())
        print(report.describe(names=5, verb="would quantize"))
        del summary["parts_gib"], summary["coverage"]
        summary["quantized_share"] = round(report.share, 4)
    return summary


def _card_evaluation(qmodel, model, tok, args: argparse.Namespace) -> dict | None:
    """Perplexity, KL and top-1 of the quantized model against the original, for the card."""
    if args.eval_windows <= 0:
        return None
    from discq.data import eval_windows
    windows = eval_windows(tok, args.eval_data, n_windows=args.eval_windows, seq_len=args.seq_len)
    ours = pipeline.evaluate(qmodel, model, windows)  # reference_perplexity included
    return {"data": str(args.eval_data), "windows": args.eval_windows, "seq_len": args.seq_len,
            **{k: round(v, 4) for k, v in ours.items()}}


def task_scores(model, reference, tok, args: argparse.Namespace) -> list[dict] | None:
    """--tasks: lm-eval's scores of `model` beside `reference`'s (None: no reference)."""
    if not getattr(args, "tasks", None):
        return None
    from discq.tasks import side_by_side, tasks, task_names
    names = task_names(args.tasks)
    options = dict(include_path=args.tasks_dir, limit=args.tasks_limit)
    ours = tasks(model, tok, names, **options)
    original = tasks(reference, tok, names, **options) if reference is not None else None
    return side_by_side(ours, original)


def _headline(evaluation: dict | None) -> dict:
    if not evaluation or "perplexity" not in evaluation:
        return {}
    return {k: evaluation[k] for k in ("perplexity", "kl", "top1")}


def _calibration_name(args: argparse.Namespace) -> str:
    return f"{args.n_calib} windows of {args.seq_len} tokens of {args.calib}"


def _check_format(args: argparse.Namespace) -> None:
    """--format's needs, checked before any work."""
    from discq.methods import METHODS
    if args.format != "hf" and not METHODS[args.method].affine_grid:
        affine = [m for m, v in METHODS.items() if v.affine_grid]
        raise ValueError(f"--format {args.format} stores affine grids ({', '.join(affine)}), "
                         f"not {args.method}'s codes")
    if args.format.startswith("gguf:"):
        if args.group_along != "input":
            raise ValueError(f"--format {args.format}: llama.cpp's blocks run along the input "
                             f"dimension; drop --group-along")
        if _gguf_source(args.model) is None and Path(args.model).is_dir():
            from discq.export.gguf_metadata import check_tokenizer
            check_tokenizer(args.model)  # the vocabulary is written from it: readable?



def _gguf_source(model: str) -> Path | None:
    from discq.models import BUNDLED_MODELS, bundled_path
    path = bundled_path(model) if model in BUNDLED_MODELS else Path(model)
    return path if path.suffix == ".gguf" and path.is_file() else None


def _save(qmodel, out: Path, tok, args: argparse.Namespace, metadata: dict) -> None:
    """A transformers model directory with a model card (or, with --format, a GGUF file or a
    compressed-tensors directory); models transformers does not know: save_quantized."""
    card = _card(qmodel, args, metadata)
    if args.format.startswith("gguf"):
        _save_gguf(qmodel, out, args, card, tok)
        return
    if args.format == "compressed-tensors":
        from discq.export import to_compressed_tensors
        to_compressed_tensors(qmodel, out, tokenizer=tok, card=card, overwrite=args.overwrite)
        return
    if not hasattr(qmodel, "save_pretrained"):
        save_quantized(qmodel, out, tokenizer=tok, overwrite=args.overwrite, metadata=metadata)
        return
    from discq.hf import save_pretrained
    save_pretrained(qmodel, out, tokenizer=tok, overwrite=args.overwrite, metadata=metadata,
                    card=card)


def _card(qmodel, args: argparse.Namespace, metadata: dict) -> str:
    from discq.card import model_card
    from discq.passes.inspect import layer_config
    from discq.passes.quantize import coverage_of
    config = next((c for m in qmodel.modules() for name in m._parameters
                   if (c := layer_config(m, name))), None)
    from discq.passes.quantize import plan_of
    report, plan = coverage_of(qmodel), plan_of(qmodel)
    return model_card({"model": args.model, **metadata}, calibration=metadata["calibration"],
                      evaluation=metadata["evaluation"], config=None if plan else config,
                      fmt=args.format, coverage=report.describe(names=8) if report else None,
                      widths=plan.describe(names=len(plan.layers)) if plan else None)


def _save_gguf(qmodel, out: Path, args: argparse.Namespace, card: str, tok) -> None:
    """out/<name>-<type>.gguf and the model card, written together: metadata and tokenizer
    copied from the model's own .gguf, or written from its config and tokenizer."""
    from discq.export import to_gguf
    from discq.io import write_atomically
    kind = args.format.split(":")[1] if ":" in args.format else None  # None: as rounded
    source = _gguf_source(args.model)
    origin = {"source": source} if source is not None else \
        {"tokenizer": tok, "pre": getattr(args, "gguf_pre", "default")}

    def write(tmp: Path) -> None:
        name = f"{Path(args.model).stem}-{kind or f'{args.target_bpw}bpw'}.gguf"
        to_gguf(qmodel, tmp / name, type=kind, **origin)
        (tmp / "README.md").write_text(card)
    write_atomically(out, args.overwrite, write)


def evaluate(args: argparse.Namespace) -> dict:
    from discq.data import eval_windows
    model, tok, source = _load_any(args.model)
    ref_name = args.reference or (source if source != args.model else None)
    reference = _load_any(ref_name)[0] if ref_name else None
    windows = eval_windows(tok, args.data, n_windows=args.n_windows, seq_len=args.seq_len)
    if args.int8_activations:
        from discq.inference import plain_linears
        model = plain_linears(model, int8_activations=True)  # as discq.generate decodes it
    result = pipeline.evaluate(model, reference, windows)
    task_rows = task_scores(model, reference, tok, args)
    return {"model": args.model, "reference": ref_name,
            **({"int8_activations": True} if args.int8_activations else {}),
            **{k: round(v, 4) for k, v in result.items()},
            **({"tasks": task_rows} if task_rows else {})}


def imatrix(args: argparse.Namespace) -> dict:
    """`discq imatrix`: llama.cpp's importance matrix of the model on the calibration text."""
    from discq.data import calibration_batches
    from discq.export import to_imatrix
    from discq.models import load_model
    out = Path(args.out)
    if out.exists() and not args.overwrite:  # before the model is loaded
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    model, tok = load_model(args.model)
    calib = calibration_batches(tok, args.calib, n_samples=args.n_calib, seq_len=args.seq_len)
    to_imatrix(model, calib, out, dataset=_calibration_name(args), overwrite=args.overwrite)
    return {"model": args.model, "calibration": _calibration_name(args),
            "tokens": sum(b.numel() for b in calib), "out": str(out)}


def bench(args: argparse.Namespace) -> dict:
    from discq.passes import bits_per_weight
    model, tok, _ = _load_any(args.model)
    prompt = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    if args.int8_activations and not args.compile:
        raise ValueError("--int8-activations needs --compile (discq.generate's compiled step)")
    t0 = time.perf_counter()
    speed = pipeline.greedy_decode_speed(model, prompt, args.tokens, lean=args.compile,
                                         int8_activations=args.int8_activations)
    try:
        bpw = round(bits_per_weight(model), 3)
    except ValueError:
        bpw = None  # not quantized
    hints = speed_hints(model, args.compile, args.int8_activations)
    for hint in hints:  # the flags of the fast configuration this run did not use (stderr)
        print(f"discq bench: faster with {hint}", file=sys.stderr)
    return {"model": args.model, "compiled": args.compile,
            **({"int8_activations": True} if args.int8_activations else {}),
            "bits_per_weight": bpw,
            "tokens_per_s": round(speed, 2), "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_gib": round(pipeline.peak_rss_gib(), 2),
            **({"faster_with": hints} if args.json else {})}


def speed_hints(model, compiled: bool, int8_activations: bool) -> list[str]:
    """The parts of the fast CPU decode configuration that this model and these flags leave
    out: the compiled step, 8-bit activations where a quantized linear has the op, an 8-bit
    head (SmolLM2 4-bit on the README's Xeon: 83 -> 105 -> 154 tokens/s, perplexity +0.3% for
    the head and +0.2% for the activations)."""
    from torch import nn

    from discq.inference import PlainLinear
    from discq.tensors.base import QuantizedTensor
    from discq.tensors.ops import INT8_ACTIVATIONS
    quantized = [m for m in model.modules()
                 if isinstance(m, nn.Linear) and isinstance(m.weight, QuantizedTensor)]
    if not quantized:
        return []
    hints = []
    if not int8_activations and any(PlainLinear(m.weight, None, True).op
                                    in INT8_ACTIVATIONS.values() for m in quantized):
        hints.append("--compile --int8-activations (integer products; `discq eval "
                     "--int8-activations` reports what it costs)")
    elif not compiled:
        hints.append("--compile (one compiled token step over a static cache)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear) and not isinstance(head.weight, QuantizedTensor):
        hints.append("an 8-bit head: `discq quantize ... --head-bits 8` (the full-precision "
                     "head is read on every token)")
    return hints


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
