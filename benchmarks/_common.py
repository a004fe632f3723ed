"""Shared helpers of the benchmark scripts: peak memory sampling, machine info, result files."""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

RESULTS = Path(__file__).parent / "results"


@contextmanager
def peak_rss():
    """Samples this process's resident memory every 20 ms; yields a dict with "before_gib" and,
    on exit, "peak_gib" (peak during the block) and "extra_gib" (peak minus before)."""
    proc, stop = psutil.Process(), threading.Event()
    out = {"peak_gib": 0.0, "before_gib": proc.memory_info().rss / 2**30}

    def sample():
        while not stop.is_set():
            out["peak_gib"] = max(out["peak_gib"], proc.memory_info().rss / 2**30)
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["extra_gib"] = out["peak_gib"] - out["before_gib"]


def timed_quantize(model, config, filter_fn) -> dict:
    """discq.quantize_(model, config) timed: wall and CPU seconds, the load on the cores before
    and after (above their count, other work shared them), peak and added resident memory."""
    import discq
    load = os.getloadavg()[0]
    with peak_rss() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        discq.quantize_(model, config, filter_fn=filter_fn)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu, "load_before": load,
            "load_after": os.getloadavg()[0], "peak_rss_gib": mem["peak_gib"],
            "extra_rss_gib": mem["extra_gib"]}


def machine() -> dict:
    """The machine of a result: CPU, cores, caches, vector extensions, torch, date (discq
    imported here, not above: the peers' environment imports this module without it)."""
    from discq.machine import machine_info
    info = {**machine_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def describe(m: dict) -> str:
    from discq.machine import describe as describe_machine
    return describe_machine(m)


def write(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def status_gib(field: str) -> float:
    """A /proc/self/status memory field in GiB. VmHWM is this program's own peak resident set:
    `ru_maxrss` would also count the parent's resident set at the fork (Linux carries it
    over the exec), which here holds a whole model."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"/proc/self/status has no {field}")
