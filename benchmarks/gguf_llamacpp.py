"""discq's rounding in llama.cpp's own file types, run by llama.cpp, against llama.cpp's own
quantizer — SmolLM2-135M or Gemma 3 270M, side by side in one run:

- llama.cpp: `llama_model_quantize` (allow_requantize, no importance matrix) of the bundled
  GGUF, the same weights discq starts from; with `--imatrix`, also `llama-quantize --imatrix`
  (`make llama-tools`) with the importance matrix of discq's GPTQ calibration tokens
  (`discq.export.to_imatrix`): the same data discq's methods see;
- discq RTN, GPTQ (XᵀX or KL Hessians) and DiscQuant with `gguf=<mixture>`: the same per-tensor
  types (llama.cpp's fallbacks included), written by `discq.export.to_gguf`; with `--rotate`,
  each also of the model rotated by `discq.rotate_` first, beside it;
- full precision: the model as an F32 GGUF.
Every file is evaluated *in llama.cpp* (llama-cpp-python) on held-out text: perplexity, KL to the
fp32 model and top-1 agreement, plus the file size; for discq's files also discq's own
evaluation of the same weights (the two agree within llama.cpp's 8-bit activation rounding).

    python benchmarks/gguf_llamacpp.py [--model smollm2|gemma3] [--types Q4_0,Q4_K_M,Q3_K_M,Q2_K]
                                       [--methods rtn,gptq,gptq-kl,disc] [--disc-steps 100]
                                       [--imatrix] [--rotate]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import gguf
import llama_cpp

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write  # noqa: E402

import discq  # noqa: E402
from discq.data import calibration_batches, eval_windows  # noqa: E402
from discq.eval import compare  # noqa: E402
from discq.llamacpp import LlamaCppModel, quantize  # noqa: E402
from discq.models import bundled_path, load_model  # noqa: E402
from discq.pipeline import evaluate, keep_head_filter  # noqa: E402


MODELS = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}


def discq_file(model, config, path: Path, source: Path, rotate: bool = False
               ) -> tuple[Path, object]:
    """The model rounded by `config` (head left to the export: llama.cpp's type for it); with
    `rotate`, rotated first (`discq.rotate_`: the same function, rotations in the weights)."""
    q = copy.deepcopy(model)
    if rotate:
        discq.rotate_(q)
    discq.quantize_(q, config, filter_fn=keep_head_filter(q))
    return discq.export.to_gguf(q, path, source=source), q


def in_llama_cpp(path: Path, model, windows) -> dict:
    with LlamaCppModel(path, n_ctx=windows[0].shape[1]) as m:
        out = compare(model, m, windows, progress=False)
    return {**out, "mib": round(path.stat().st_size / 2**20, 2)}


def configs(mixture: str, a, calib, disc_calib) -> dict:
    """{row name: a function making its config} (made only for the methods asked for)."""
    return {
        "discq RTN": lambda: discq.rtn_config(gguf=mixture),
        f"discq GPTQ ({a.n_calib}x512)": lambda: discq.gptq_config(gguf=mixture,
                                                                   calibration=calib),
        f"discq GPTQ-KL ({a.n_calib}x512)": lambda: discq.gptq_config(
            gguf=mixture, calibration=calib, hessian="kl"),
        f"discq DiscQuant ({a.disc_steps} steps of {a.disc_batch}x{a.disc_seq})":
            lambda: discq.disc_config(gguf=mixture, calibration=disc_calib, steps=a.disc_steps,
                                      batch_size=a.disc_batch, init="rtn",
                                      warmup=max(1, a.disc_steps // 10)),
    }


def run_type(mixture: str, model, windows, a, calib, disc_calib, tmp: Path) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    try:
        theirs = quantize(a.source, tmp / f"llama-{mixture}.gguf", mixture)
        rows.append({"type": mixture, "method": "llama.cpp", "seconds": time.perf_counter() - t0,
                     **in_llama_cpp(theirs, model, windows), **types_of(theirs)})
        print(rows[-1], flush=True)
    except RuntimeError as e:  # llama.cpp refuses IQ2_XXS/IQ2_XS/IQ1 without an imatrix
        print(f"{mixture} llama.cpp without an importance matrix: skipped ({e})", flush=True)
    if a.imatrix_path is not None:
        t0 = time.perf_counter()
        theirs = quantize(a.source, tmp / f"llama-im-{mixture}.gguf", mixture,
                          imatrix=a.imatrix_path)
        rows.append({"type": mixture, "method": f"llama.cpp + imatrix ({a.n_calib}x512)",
                     "seconds": time.perf_counter() - t0, **in_llama_cpp(theirs, model, windows),
                     **types_of(theirs)})
        print(rows[-1], flush=True)
    for name, make in configs(mixture, a, calib, disc_calib).items():
        short = name.lower().split(" (")[0].removeprefix("discq ").replace("discquant", "disc")
        if short not in a.methods:
            continue
        try:
            config = make()
        except ValueError as e:  # e.g. DiscQuant on a codebook i-quant mixture
            print(f"{mixture} {name}: skipped ({e})", flush=True)
            continue
        for rotate in (False, True) if a.rotate else (False,):
            rows.append(discq_row(mixture, f"{name}, rotated" if rotate else name, config,
                                  model, windows, a.source, tmp, rotate))
            print(rows[-1], flush=True)
    return rows


def discq_row(mixture: str, name: str, config, model, windows, source: Path, tmp: Path,
              rotate: bool) -> dict:
    """One discq file's row: rounded (after `discq.rotate_` when `rotate`), written, run by
    llama.cpp and by discq."""
    t0 = time.perf_counter()
    path, q = discq_file(model, config, tmp / f"discq-{mixture}.gguf", source, rotate)
    seconds = time.perf_counter() - t0
    ours = evaluate(q, None, windows, progress=False)  # perplexity only: no second fp32 pass
    row = {"type": mixture, "method": name, "seconds": seconds,
           **in_llama_cpp(path, model, windows), **types_of(path),
           "discq_perplexity": ours["perplexity"]}
    path.unlink()
    return row


def types_of(path: Path) -> dict:
    """{"types": "IQ4_NL 180, IQ4_XS 30, …"}: how many 2-D weights the file has of each type."""
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) >= 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return {"types": ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))}


def table(rows: list[dict], a, info: dict) -> str:
    title = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma 3 270M"}[a.model]
    md = [f"# discq's rounding in llama.cpp's GGUF types vs llama.cpp's quantizer, {title}",
          "", f"Machine: {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
          f"llama-cpp-python {llama_cpp.__version__}, {info['date']}. Every row is a GGUF file "
          f"run by llama.cpp; eval: {a.eval_windows}x{a.seq_len} tokens of hamlet (held out), "
          f"KL and top-1 against the fp32 model. `discq ppl`: discq's own evaluation of the "
          f"same weights. Command: `python benchmarks/gguf_llamacpp.py --model {a.model} --types "
          f"{','.join(a.types)} --methods {','.join(a.methods)} --n-calib {a.n_calib} "
          f"--disc-steps {a.disc_steps} --disc-batch {a.disc_batch} --disc-seq {a.disc_seq} "
          f"{'--imatrix ' if a.imatrix else ''}{'--rotate ' if a.rotate else ''}"
          f"--name {a.name}`.", "",
          "| type | method | MiB | perplexity | KL | top-1 | discq ppl | time (s) | tensors |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = f"{r['discq_perplexity']:.2f}" if "discq_perplexity" in r else ""
        md.append(f"| {r['type']} | {r['method']} | {r['mib']:.1f} | {r['perplexity']:.2f} | "
                  f"{r['kl']:.4f} | {r['top1']:.3f} | {ours} | {r['seconds']:.0f} | "
                  f"{r.get('types', '')} |")
    if any(r["method"].endswith(", rotated") for r in rows):
        md += ["", ROTATED_NOTE]
    return "\n".join(md) + "\n"


ROTATED_NOTE = ("Rotated rows: `discq.rotate_` unties a tied head (the final norm's scale must "
                "be folded into the head, and the embedding cannot carry it), so a tied model's "
                "rotated file stores the head a second time, in the mixture's type for "
                "`output.weight`: the MiB column shows what that costs.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--types", type=lambda s: s.split(","), default=["Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K"])
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["rtn", "gptq", "disc"],
                    help="of rtn, gptq, gptq-kl, disc (DiscQuant)")
    ap.add_argument("--rotate", action="store_true",
                    help="each discq row also of the model rotated by discq.rotate_ first, "
                         "beside it")
    ap.add_argument("--imatrix", action="store_true",
                    help="also llama.cpp's quantizer with the importance matrix of the GPTQ "
                         "calibration tokens (needs llama-quantize: make llama-tools)")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--disc-steps", type=int, default=100)
    ap.add_argument("--disc-batch", type=int, default=2)
    ap.add_argument("--disc-seq", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--name", help="results file name (default gguf_llamacpp_<model>)")
    a = ap.parse_args()
    a.name = a.name or f"gguf_llamacpp_{a.model}"
    model, tok = load_model(MODELS[a.model])
    a.source = bundled_path(MODELS[a.model])
    windows = eval_windows(tok, "shakespeare", n_windows=a.eval_windows, seq_len=a.seq_len)
    calib = calibration_batches(tok, "shakespeare", n_samples=a.n_calib, seq_len=512, seed=0)
    disc_calib = calibration_batches(tok, "shakespeare", n_samples=a.disc_steps * a.disc_batch,
                                     seq_len=a.disc_seq, seed=0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        a.imatrix_path = (discq.export.to_imatrix(model, calib, tmp / "discq.imatrix.gguf")
                          if a.imatrix else None)
        full = discq.export.to_gguf(model, tmp / "f32.gguf", source=a.source)
        rows = [{"type": "F32", "method": "full precision", "seconds": 0,
                 **in_llama_cpp(full, model, windows)}]
        for mixture in a.types:
            rows += run_type(mixture, model, windows, a, calib, disc_calib, tmp)
    info = machine()
    args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()
            if k != "imatrix_path"}
    write(a.name, {"machine": info, "args": args, "rows": rows}, table(rows, a, info))


if __name__ == "__main__":
    main()
