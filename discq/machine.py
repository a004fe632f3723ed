"""The machine a number was measured on, named the same way everywhere (benchmark files, the
demo's table): CPU model, cores, cache sizes and vector extensions. Machines sold under one
name differ where it matters for speed (an AMD EPYC VM with 8 MiB of L3 or 32; with or without
AVX-512)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

ISA = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def machine_info() -> dict:
    """{"cpu": model name, "cores": logical CPUs, "caches": {"L2": "512K", ...}, "isa": [...]}."""
    return {"cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "caches": cpu_caches(), "isa": isa_flags()}


def _cpuinfo(key: str) -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_caches() -> dict:
    """Data and unified cache sizes of CPU 0 by level, as Linux reports them ("L2": "512K")."""
    out = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            out[f"L{(index / 'level').read_text().strip()}"] = (index / "size").read_text().strip()
        except OSError:
            continue
    return out


def cpu_flags() -> set[str]:
    """Every flag the CPU reports (Linux's /proc/cpuinfo; empty elsewhere)."""
    return set((_cpuinfo("flags") or "").split())


def isa_flags() -> list[str]:
    """The vector extensions among ISA that the CPU reports (what the kernels can use)."""
    flags = cpu_flags()
    return [f for f in ISA if f in flags]


def describe(m: dict | None = None) -> str:
    """One line naming a machine: "AMD EPYC, 2 cores, L2 512K, L3 32768K, AVX2/FMA/F16C"."""
    m = m or machine_info()
    parts = [m["cpu"], f"{m['cores']} cores"]
    parts += [f"{k} {v}" for k, v in (m.get("caches") or {}).items() if k in ("L2", "L3")]
    if m.get("isa"):
        parts.append("/".join(f.upper() for f in m["isa"]))
    return ", ".join(parts)
