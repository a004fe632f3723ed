"""The speed benchmark's report (benchmarks/speed.py): a `--decode-only` run is written under
its machine's name (and the kernel build when it is not the CPU's own), its table shows the
prefill columns and both builds, and the kernel sentence describes the variants that the layer
tables hold."""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import speed  # noqa: E402

LAYER = {"shape": "smollm2 q/o (576x576)", "N": 576, "K": 576, "batch": 1, "ms": 0.1,
         "gbps": None}


def result(cpu: str, variants=("fp32", "discq 4-bit g64")) -> dict:
    machine = {"cpu": cpu, "cores": 2, "threads": 2, "torch": "2.13.0+cpu", "date": "2026-12-04"}
    return {"machine": machine, "device": "cpu", "device_name": None, "peak_gbps": None,
            "layers": [{**LAYER, "variant": v} for v in variants], "streamed": None,
            "command": "python benchmarks/speed.py", "decode": None}


def test_a_decode_only_run_is_named_after_its_machine_and_build(monkeypatch):
    monkeypatch.delenv("DISCQ_CPU_KERNEL", raising=False)
    small = {"cpu": "AMD EPYC", "caches": {"L2": "512K", "L3": "8192K"}, "isa": ["avx2", "fma"]}
    monkeypatch.setattr(speed, "machine", lambda: small)
    cpu = {"device": "cpu"}
    assert speed.result_name(cpu, False, True) == "speed_cpu_decode_amd_epyc_l3_8m"
    assert speed.result_name(cpu, False) == "speed_cpu"  # a full run keeps its one file
    monkeypatch.setenv("DISCQ_CPU_KERNEL", "avx2")
    assert speed.result_name(cpu, True, True) == "speed_cpu_decode_amd_epyc_l3_8m_kernel_avx2_quick"
    xeon = {"cpu": "Intel(R) Xeon(R) Platinum 8488C", "caches": {"L3": "107520K"},
            "isa": ["avx2", "avx512f"]}
    assert speed.machine_slug(xeon) == "intel_xeon_platinum_8488c_l3_105m_avx512"


def test_the_decode_table_shows_prefill_and_both_builds():
    rows = [{"variant": "fp32", "tokens_per_s": 20.0, "tokens": 32, "prompt": 16,
             "bytes_per_token": 5.4e8, "machine_gbps": 30.0, "perplexity": 36.68,
             "prefill_ms": {"16": 69.7, "128": 218.6}},
            {"variant": speed.LLAMA_ROW, "tokens_per_s": 133.1, "tokens": 32, "prompt": 16,
             "bytes_per_token": 9.2e7, "machine_gbps": 30.0, "perplexity": 45.67,
             "prefill_ms": {"16": 29.2}, "llama_cpp_python": "0.3.36",
             "llama_cpp_isa": "AVX2/FMA/F16C"}]
    r = {**result("AMD EPYC"), "layers": None, "decode": rows, "kernel_env": "avx2",
         "kernel_build": "AVX2/FMA/F16C", "command": "python benchmarks/speed.py --decode-only"}
    text = speed.markdown(r)
    assert "`python benchmarks/speed.py --decode-only` (DISCQ_CPU_KERNEL=avx2)" in text
    assert "discq's CPU kernels built for AVX2/FMA/F16C." in text
    assert "(built by `make install-llamacpp`, for AVX2/FMA/F16C)" in text
    assert "| prefill 16 tokens (ms) | prefill 128 tokens (ms) |" in text
    assert "| 36.68 | 69.7 | 218.6 |" in text and "| 45.67 | 29.2 | |" in text


def test_the_kernel_sentence_follows_the_layer_variants():
    plain = speed.markdown(result("AMD EPYC"))
    assert "fused C++ kernel (up to 64 rows" in plain and "GPTVQ" not in plain
    with_vq = speed.markdown(result("AMD EPYC", ("fp32", "discq gptvq 2-bit 2-D")))
    assert "GPTVQ: up to 16 rows" in with_vq
