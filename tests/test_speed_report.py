"""The speed benchmark's report (benchmarks/speed.py): a `--decode-only` rerun names the
machine its older layer tables came from, and the kernel sentence describes the variants that
the layer tables hold."""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import speed  # noqa: E402

LAYER = {"shape": "smollm2 q/o (576x576)", "N": 576, "K": 576, "batch": 1, "ms": 0.1,
         "gbps": None}


def result(cpu: str, layers_from: dict | None, variants=("fp32", "discq 4-bit g64")) -> dict:
    machine = {"cpu": cpu, "cores": 2, "threads": 2, "torch": "2.13.0+cpu", "date": "2026-12-04"}
    return {"machine": machine, "device": "cpu", "device_name": None, "peak_gbps": None,
            "layers": [{**LAYER, "variant": v} for v in variants], "streamed": None,
            "layers_from": layers_from, "command": "python benchmarks/speed.py --decode-only",
            "decode": None}


def test_a_decode_rerun_names_the_machine_of_its_layer_tables():
    old = {"date": "2026-12-01", "torch": "2.13.0+cpu", "cpu": "AMD EPYC"}
    text = speed.markdown(result("Intel(R) Xeon(R) Processor", old))
    assert "from the run of 2026-12-01 (torch 2.13.0+cpu, on another machine: AMD EPYC)" in text
    assert "same machine" not in text
    assert "(torch 2.13.0+cpu, same machine)" in speed.markdown(result("AMD EPYC", old))


def test_the_kernel_sentence_follows_the_layer_variants():
    plain = speed.markdown(result("AMD EPYC", None))
    assert "fused C++ kernel (up to 64 rows" in plain and "GPTVQ" not in plain
    with_vq = speed.markdown(result("AMD EPYC", None, ("fp32", "discq gptvq 2-bit 2-D")))
    assert "GPTVQ: up to 16 rows" in with_vq
