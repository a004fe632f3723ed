"""Rows of the quality harness run one after the other in one process, for timings side by side
(the harness runs each row in its own process, and rows that ran on different days or beside
other work have incomparable times). Same fp32 model, calibration and evaluation as the harness.
    python benchmarks/side_by_side.py SPECS_JSON OUT_JSONL
SPECS_JSON: a list of specs ({"method": "gptq", "bits": 3, "group_size": 64, "hessian": "kl"},
optionally "seq_len": cut the calibration sequences into pieces of that length, "rotate": true:
`discq.rotate_` first, the rotation folded into the weights); one JSON line a
spec is appended to OUT_JSONL, with the machine.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import describe, machine  # noqa: E402
from quality import prepare, scores  # noqa: E402
from quality_row import load_model  # noqa: E402
from runners._common import calibration_list, target_linears  # noqa: E402

import discq  # noqa: E402
from discq.methods import build_config  # noqa: E402


def run(specs: list[dict], out: Path) -> None:
    d = prepare("smollm2", 32)
    reference = load_model(d / "fp32")
    calib = torch.load(d / "calib.pt", weights_only=True)  # [32, 512]
    for spec in specs:
        spec = dict(spec)
        seq = spec.pop("seq_len", None)
        rotated = spec.pop("rotate", False)
        ids = calib if not seq else calib[:, : calib.shape[1] // seq * seq].reshape(-1, seq)
        model = copy.deepcopy(reference)
        if rotated:
            discq.rotate_(model)
        config = build_config(spec.pop("method"), calibration=calibration_list(ids, 8), **spec)
        chosen = set(target_linears(model).values())
        t0 = time.perf_counter()
        discq.quantize_(model, config, filter_fn=lambda m, fqn: m in chosen)
        seconds = time.perf_counter() - t0
        row = {"config": config.to_dict(), "seq_len": seq, "rotated": rotated,
               "seconds": round(seconds, 1),
               **{k: round(v, 4) for k, v in scores(d, reference, model).items()},
               "machine": describe(machine()), "date": time.strftime("%Y-%m-%d"),
               "command": "python benchmarks/side_by_side.py " + " ".join(sys.argv[1:])}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    run(json.loads(sys.argv[1]), Path(sys.argv[2]))
