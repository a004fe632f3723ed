"""The `discq` command line: quantize, eval, bench, methods.

    discq quantize smollm2-135m --method gptq --bits 3 --group-size 64 --out out/
    discq eval out/ --data shakespeare
    discq bench out/
    discq plan big-model/ --method gptq --stream   # peak memory and time, before running
    discq quantize big-model/ --method gptq --stream --out q/   # block by block from disk
    discq methods                      # what is registered, one line each with its paper
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from discq.methods import available_methods, describe
from discq.passes.gguf_mixture import MIXTURES as GGUF_MIXTURES

OUTPUT_FORMATS = ["hf", "gguf", *(f"gguf:{m}" for m in GGUF_MIXTURES), "compressed-tensors"]


def _add_grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="rtn", choices=available_methods(),
                   help="rounding method (`discq methods` lists them): " + "; ".join(
                       f"{m['name']}: {m['summary']}" for m in describe()))
    p.add_argument("--bits", type=int, default=3, help="bits per weight code (2, 3, 4 or 8)")
    p.add_argument("--group-size", type=int, default=64,
                   help="weights per scale group; 0 means one group per row (default 64)")
    p.add_argument("--symmetric", action="store_true", help="symmetric grid (no zero point)")
    p.add_argument("--group-along", default="input", choices=["input", "output", "auto"],
                   help="groups along the input dim (usual), the output dim (per-input-channel)"
                        " or auto (GPTQ: per layer by the Hessian proxy loss)")
    p.add_argument("--quantize-head", action="store_true",
                   help="also quantize the output head with the method (kept full precision by "
                        "default)")
    p.add_argument("--head-bits", type=int, default=None, choices=[8, 4],
                   help="round the output head (and the tied token embedding) to a symmetric "
                        "8- or 4-bit grid in blocks of 32, as llama.cpp stores them: faster "
                        "decode, a small quality cost that the evaluation reports")
    p.add_argument("--steps", type=int, default=None, help="DiscQuant optimization steps")
    p.add_argument("--hessian", default="inputs", choices=["inputs", "kl"],
                   help="GPTQ, GPTVQ, QuIP#, QTIP: round each layer for its own output "
                        "(inputs, the papers' XᵀX) or for the whole model's (kl: Kronecker "
                        "factors of the KL's Hessian, one backward pass per calibration "
                        "sequence; YAQA)")


def _add_data_args(p: argparse.ArgumentParser, what: str, n: int, seq: int) -> None:
    p.add_argument(f"--{what}", default="shakespeare",
                   help="text source: 'shakespeare' (bundled), a text file or glob, or a "
                        "datasets hub name such as wikitext (needs the network)")
    p.add_argument(f"--n-{'calib' if what == 'calib' else 'windows'}", type=int, default=n,
                   help=f"number of {seq}-token windows (default {n})")
    p.add_argument("--seq-len", type=int, default=seq, help=f"tokens per window (default {seq})")


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="zero-shot tasks of lm-evaluation-harness (pip install lm-eval), e.g. "
                        "arc_easy,hellaswag, scored for this model and the original side by side")
    p.add_argument("--tasks-dir", default=None,
                   help="a directory of your own lm-eval task YAML files (local datasets)")
    p.add_argument("--tasks-limit", type=int, default=None,
                   help="at most this many documents a task (default: all)")


def build_parser() -> argparse.ArgumentParser:
    from discq import __version__
    ap = argparse.ArgumentParser(prog="discq", description="Quantize model weights to 2-4 bits.")
    ap.add_argument("--version", action="version", version=f"discq {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("model", help="bundled name (smollm2-135m, minilm-l6), HF dir, .gguf, hub id")
    _add_grid_args(q)
    _add_data_args(q, "calib", 128, 512)
    q.add_argument("--eval-data", default="shakespeare",
                   help="held-out text for the evaluation written into the model card")
    q.add_argument("--eval-windows", type=int, default=4,
                   help="windows of --seq-len tokens to evaluate on after quantizing (perplexity,"
                        " KL, top-1 vs the original; default 4); 0 skips it")
    q.add_argument("--out", required=True,
                   help="output directory (must be new or empty): a transformers model "
                        "directory (from_pretrained after `import discq`) with a model card")
    q.add_argument("--format", default="hf", choices=OUTPUT_FORMATS, metavar="FORMAT",
                   help="what --out holds: hf (default: transformers layout, discq weights), "
                        "gguf:<mixture> (a .gguf file for llama.cpp in one of llama.cpp's "
                        f"mixtures {', '.join(GGUF_MIXTURES)}: the method rounds onto the "
                        "mixture's types, --bits/--group-size do not apply; metadata and "
                        "tokenizer copied from the model's .gguf, else written from its "
                        "config and tokenizer), gguf (with --target-bpw and GGML-type "
                        "--candidates: each tensor in the type it got), compressed-tensors "
                        "(pack-quantized for vLLM; needs --symmetric)")
    q.add_argument("--target-bpw", type=float, default=None, metavar="B",
                   help="mixed widths: each layer gets the candidate (--candidates) that "
                        "minimizes the predicted KL to the original within B bits per weight "
                        "on average (scales counted); costs one KL pass plus each candidate's "
                        "own run")
    q.add_argument("--candidates", default=None, metavar="C1,C2",
                   help="with --target-bpw: <bits> (--method at that width), <method>:<bits> "
                        "or a GGML type (Q4_0, rounded by --method); default --method at 2,3,4")
    q.add_argument("--gguf-pre", default="default", metavar="NAME",
                   help="with --format gguf:* from a model that is not a .gguf: llama.cpp's "
                        "pre-tokenizer name for its tokenizer (e.g. llama-bpe, qwen2, smollm)")
    q.add_argument("--overwrite", action="store_true", help="replace discq files in --out")
    q.add_argument("--stream", action="store_true",
                   help="quantize block by block from the model directory's safetensors "
                        "shards (memory: about one block, whatever the model's size); resumes "
                        "from <out>.partial when run again; no evaluation (the original is "
                        "never in memory); RTN, GPTQ, GPTVQ, QuIP#/QTIP without fine-tuning")
    q.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="with --stream: the precision blocks are computed in (default: as "
                        "stored)")
    q.add_argument("--checkpoint-dir", default=None,
                   help="save finished blocks (GPTQ, GPTVQ, QuIP#, QTIP) or optimizer "
                        "checkpoints (DiscQuant) here; the same command run again resumes")
    _add_task_args(q)
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    pl = sub.add_parser("plan", help="estimate a run's peak memory and time before running it")
    pl.add_argument("model", help="a transformers model directory (read as a skeleton: no "
                                  "weights are loaded), or a bundled name")
    _add_grid_args(pl)
    _add_data_args(pl, "calib", 128, 512)
    pl.add_argument("--stream", action="store_true", help="plan a streaming run (--stream)")
    pl.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="the precision weights are computed in (default: as stored)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    e = sub.add_parser("eval", help="perplexity, KL and top-1 agreement vs the original model")
    e.add_argument("model", help="a directory written by `discq quantize`, or a model name")
    e.add_argument("--reference", default=None,
                   help="original model to compare with (default: the one it was made from)")
    _add_data_args(e, "data", 8, 512)
    e.add_argument("--int8-activations", action="store_true",
                   help="evaluate with each quantized linear's input rounded to 8 bits per block "
                        "of 32 (as `discq bench --compile --int8-activations` decodes)")
    _add_task_args(e)
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    b = sub.add_parser("bench", help="decode speed and memory of a (quantized) model")
    b.add_argument("model", help="a directory written by `discq quantize`, or a model name")
    b.add_argument("--tokens", type=int, default=32, help="tokens to generate (default 32)")
    b.add_argument("--compile", action="store_true",
                   help="decode with discq.generate: one compiled token step over a static KV "
                        "cache (the first run compiles, minutes for a large model)")
    b.add_argument("--int8-activations", action="store_true",
                   help="with --compile: quantized linears take their input rounded to 8 bits "
                        "per block of 32 and multiply in integers (faster on CPU; `discq eval "
                        "--int8-activations` gives its perplexity)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    im = sub.add_parser("imatrix", help="llama.cpp's importance matrix from calibration text, "
                                        "for llama.cpp's own quantizer (llama-quantize "
                                        "--imatrix FILE)")
    im.add_argument("model", help="bundled name, transformers directory or .gguf")
    _add_data_args(im, "calib", 128, 512)
    im.add_argument("--out", required=True, help="the imatrix file to write (.gguf)")
    im.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    im.add_argument("--json", action="store_true", help="print the summary as JSON")
    m = sub.add_parser("methods", help="list the registered rounding methods")
    m.add_argument("--json", action="store_true", help="print the list as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "methods":
        return _methods(args.json)
    from discq.interrupt import exit_on_signals
    # Ctrl-C or SIGTERM: 130/143; an interrupted quantize wrote nothing (save_quantized is atomic)
    return exit_on_signals(lambda: _run(args), f"discq {args.command}",
                           "nothing was written; checkpoints written so far are kept")


def _run(args: argparse.Namespace) -> int:
    from discq import _commands
    run = {"quantize": _commands.quantize, "eval": _commands.evaluate,
           "bench": _commands.bench, "plan": _commands.plan,
           "imatrix": _commands.imatrix}[args.command]
    try:
        # with --json, stdout carries only the JSON: progress bars (Lightning's rich bar
        # writes to stdout) go to stderr
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            result = run(args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, ImportError,
            MemoryError) as e:
        print(f"discq {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        task_rows = result.pop("tasks", None)
        _commands.print_table(f"discq {args.command}", [result])
        if task_rows:
            _commands.print_table("zero-shot tasks (lm-eval)", task_rows)
    return 0


def _methods(as_json: bool) -> int:
    rows = describe()
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        data = "calibration data" if r["data_driven"] else "data-free"
        print(f"{r['name']:<12} {r['summary']} ({data})")
        if r["paper"]:
            print(f"{'':<12} {r['paper']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
