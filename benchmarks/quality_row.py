"""One row of the quality benchmark, in its own process (so its memory peak is its own) and in
the row's Python environment (the peers' pins differ from discq's): load the fp32 model from the
shared work directory, quantize it with the row's runner, write the weights as the quantizer
left them, dequantized (`weights.safetensors`, only the tensors it changed), and `meta.json`
(bits, time, memory, the configuration as passed). The parent evaluates every row's weights the
same way (`benchmarks/quality.py`).

    python benchmarks/quality_row.py ROW_JSON WORK_DIR OUT_DIR

Does not import discq unless the runner does: the peers' environment may not have it.
"""
from __future__ import annotations

import importlib
import json
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import status_gib  # noqa: E402


@dataclass
class Inputs:
    model: torch.nn.Module   # fp32, loaded by transformers from model_dir
    model_dir: Path          # HF directory: config, safetensors, tokenizer
    calib: torch.Tensor      # [N, 512] calibration token ids, the same for every row
    work: Path               # the model's work directory (f32.gguf lives here)
    causal: bool


def is_causal(model_dir: Path) -> bool:
    config = json.loads((model_dir / "config.json").read_text())
    return any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])


def load_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM
    cls = AutoModelForCausalLM if is_causal(model_dir) else AutoModel
    return cls.from_pretrained(model_dir, dtype=torch.float32).eval()


def load_inputs(work: Path, model: str, calib_file: str = "calib.pt") -> Inputs:
    """`calib_file`: the calibration draw ("calib.pt": draw 0, "calib_d2.pt": draw 2)."""
    d = work / model
    calib = torch.load(d / calib_file, weights_only=True)  # [N, 512]
    return Inputs(load_model(d / "fp32"), d / "fp32", calib, d, is_causal(d / "fp32"))


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "torchao", "llmcompressor", "auto_round", "hqq",
                 "llama_cpp", "gguf", "compressed_tensors"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def main(row_json: str, work: str, out: str) -> int:
    from safetensors.torch import save_file
    row, out = json.loads(Path(row_json).read_text()), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"id": row["id"], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        torch.manual_seed(0)
        inputs = load_inputs(Path(work), row["model"], row.get("calib_file", "calib.pt"))
        meta["rss_before_gib"] = status_gib("VmRSS")  # libraries and the fp32 model
        result = importlib.import_module(f"runners.{row['runner']}").quantize(inputs, row["spec"])
        meta["peak_rss_gib"] = status_gib("VmHWM")
        tensors = {k: v.detach().float().contiguous() for k, v in result.pop("tensors").items()}
        save_file(tensors, out / "weights.safetensors")
        meta.update(result, ok=True, versions=versions())
    except Exception as e:  # the row says why, with the error, instead of vanishing
        meta.update(ok=False, error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc(limit=6), versions=versions())
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
