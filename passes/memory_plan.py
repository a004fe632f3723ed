"""Peak memory and time of a quantization run, estimated before it starts.

`plan_run(model, config, tokens=...)` counts, from the model's shapes alone (a skeleton on the
meta device works), what the run will hold: the model, the quantized weights, the calibration
activations, one layer's Hessian and working copies, and for DiscQuant the relaxation and
optimizer state; `stream=True` plans a streaming run (one block at a time). `check_fits(plan)`
refuses, with the estimate, a run the machine cannot hold, so that it fails at once instead of
at block 30. Estimates are deliberately a little pessimistic; times are rough (from a measured
matmul rate and each method's `layer_cost`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .capture import find_blocks
from .registry import method_of

GiB = 2**30


@dataclass
class MemoryPlan:
    parts: dict[str, int] = field(default_factory=dict)  # bytes, by what holds them
    resident: int = 0   # of those, already in memory when the check runs (the loaded model)
    seconds: float = 0.0

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        rows = [f"  {k:<44} {v / GiB:8.2f} GiB" for k, v in self.parts.items()]
        return "\n".join([*rows, f"  {'estimated peak':<44} {self.peak / GiB:8.2f} GiB",
                          f"  {'estimated time (rough)':<44} {self.seconds / 60:8.1f} min"])

    def to_dict(self) -> dict:
        return {"parts_gib": {k: round(v / GiB, 3) for k, v in self.parts.items()},
                "peak_gib": round(self.peak / GiB, 3), "minutes": round(self.seconds / 60, 1)}


def _bytes(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    return t.numel() * (dtype or t.dtype).itemsize


def plan_run(model: nn.Module, config, targets: list[tuple[str, nn.Linear]], *,
             tokens: int = 0, stream: bool = False, dtype: torch.dtype | None = None
             ) -> MemoryPlan:
    """The plan of quantizing `targets` of `model` with `config` on `tokens` calibration
    tokens (`dtype`: what the weights are computed in; default as they are)."""
    method = method_of(config)
    if stream and method.end_to_end:
        raise ValueError(f"{config.method} optimizes the whole model end to end, not block by "
                         f"block, so it cannot stream; shard it across processes instead "
                         f"(trainer_kwargs=dict(strategy='fsdp', devices=2))")
    plan, bits = MemoryPlan(), getattr(config, "bits", 4)
    weights = [m.weight for _, m in targets]
    n_target = sum(w.numel() for w in weights)
    model_bytes = sum(_bytes(p, dtype) for p in model.parameters())
    _, blocks = find_blocks(model) if method.data_driven or stream else (None, [])
    width = max((m.in_features for _, m in targets), default=0)
    if stream:
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        plan.parts["layers outside the blocks"] = sum(
            _bytes(p, dtype) for p in model.parameters() if id(p) not in in_blocks)
        plan.parts["one block"] = 2 * max(sum(_bytes(p, dtype) for p in b.parameters())
                                          for b in blocks)
    else:
        plan.parts["model"] = model_bytes
        plan.resident = model_bytes
        plan.parts["quantized weights (originals kept until the end)"] = n_target * bits // 8
    act = tokens * width * (dtype or torch.float32).itemsize
    if method.end_to_end:
        # x (4 bytes a weight), AdamW's two moments (8), its gradient (4), codes and pull (4)
        plan.parts["relaxation and optimizer state"] = 20 * n_target
        step = _step_tokens(config)  # a step's batch, not the whole calibration set
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = getattr(head, "out_features", 0)
        plan.parts["one step's activations and logits"] = 4 * step * (
            2 * width * max(len(blocks), 1) + 3 * vocab)
    elif method.data_driven:
        plan.parts["calibration activations" + (" (memory-mapped)" if stream else "")] = 3 * act
        K = max((w.shape[1] for w in weights), default=0)
        NK = max((w.numel() for w in weights), default=0)
        plan.parts["one layer's Hessian and working copies"] = 4 * (4 * K * K + 4 * NK)
        if getattr(config, "hessian", "inputs") == "kl":
            _plan_kl(plan, model, targets, config, stream, len(blocks), width)
    plan.seconds = _seconds(method, config, weights, blocks, tokens)
    if getattr(config, "hessian", "inputs") == "kl":  # a forward and a backward per sequence
        plan.seconds += 3 * 2 * sum(w.numel() for w in weights) * tokens / matmul_rate()
    return plan


def _plan_kl(plan: MemoryPlan, model, targets, config, stream: bool, n_blocks: int,
             width: int) -> None:
    """KL Hessians: one pass's chunk of factors, one batch's forward and backward."""
    from .kl_hessian import MAX_BYTES, PIECE, batch_size, factor_bytes
    if stream:
        raise ValueError("hessian='kl' needs the whole model in memory (one backward pass "
                         "through every block): it cannot stream; use hessian='inputs'")
    output_side = getattr(config, "kl_rows", 0) > 0
    plan.parts["KL Hessian factors (one pass's share)"] = min(
        MAX_BYTES, sum(factor_bytes(m, output_side) for _, m in targets))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tokens = PIECE * batch_size(model, targets)
    plan.parts["one batch's forward and backward"] = 4 * tokens * (
        12 * width * max(n_blocks, 1) + 3 * getattr(head, "out_features", 0))


def _seconds(method, config, weights, blocks, tokens: int) -> float:
    """Rough: calibration forwards (about 3 per block: each layer's input computed once,
    true-sequential, plus its Hessian's product) + layer rounding; for
    an end-to-end method, its steps of teacher and student forwards and the backward."""
    if not method.data_driven:
        return sum(w.numel() for w in weights) * 2e-8
    rate = matmul_rate()
    block_params = sum(p.numel() for b in blocks for p in b.parameters())
    forward = 3 * 2 * block_params * tokens / rate
    layers = sum(2 * w.shape[0] * w.shape[1] ** 2 + w.shape[1] ** 3 for w in weights) / rate
    if method.end_to_end:
        return 10 * sum(w.numel() for w in weights) * _step_tokens(config) * config.steps / rate
    return forward + 4 * method.layer_cost * layers


def _step_tokens(config) -> int:
    """Tokens in one optimizer step of an end-to-end method (batch size × sequence length)."""
    calibration = getattr(config, "calibration", None)
    seqs = [b.shape[-1] for b in calibration or [] if isinstance(b, torch.Tensor)]
    return getattr(config, "batch_size", 8) * max(seqs, default=512)


_RATE: list[float] = []


def matmul_rate() -> float:
    """This machine's fp32 matmul rate (FLOP/s), measured once (~0.1 s)."""
    if not _RATE:
        a = torch.randn(512, 512)
        a @ a
        t0, n = time.perf_counter(), 8
        for _ in range(n):
            a @ a
        _RATE.append(n * 2 * 512**3 / max(time.perf_counter() - t0, 1e-9))
    return _RATE[0]


def available_bytes() -> int:
    """Memory this process may still take: the kernel's MemAvailable, or less under a cgroup
    limit (v2, or v1's memory controller)."""
    avail = 2**62
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    for limit, usage in _cgroup_files():
        try:
            lim, use = Path(limit).read_text().strip(), int(Path(usage).read_text())
        except (OSError, ValueError):
            continue
        if lim.isdigit() and int(lim) < 2**60:
            # the group's usage counts page cache (files read and written), which the kernel
            # gives back under the limit: not in the way of the run
            avail = min(avail, int(lim) - use + _file_cache(Path(usage).parent))
    return avail


def _file_cache(group: Path) -> int:
    """Bytes of file pages charged to a cgroup (v1 `total_cache`/`cache`, v2 `file`)."""
    try:
        stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return 0
    for key in ("total_cache", "cache", "file"):
        if key in stat:
            return int(stat[key])
    return 0


def _cgroup_files() -> list[tuple[str, str]]:
    """(limit, usage) files of this process's memory cgroup, v2 and v1, with and without the
    path /proc/self/cgroup names (inside a container the mount may start at the group)."""
    files = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            files += [(f"{d}/memory.max", f"{d}/memory.current")
                      for d in {f"/sys/fs/cgroup{path}", "/sys/fs/cgroup"}]
        elif "memory" in controllers.split(","):
            files += [(f"{d}/memory.limit_in_bytes", f"{d}/memory.usage_in_bytes")
                      for d in {f"/sys/fs/cgroup/memory{path}", "/sys/fs/cgroup/memory"}]
    return files


def calibration_tokens(calibration) -> int:
    """Tokens in a calibration list (0 when there is none or it is not a list of tensors)."""
    if isinstance(calibration, torch.Tensor):
        return calibration.numel()
    if isinstance(calibration, (list, tuple)):
        return sum(b.numel() for b in calibration if isinstance(b, torch.Tensor))
    return 0


def check_fits(plan: MemoryPlan, what: str) -> None:
    """MemoryError, with the plan, when the run needs more than the machine has free
    (environment DISCQ_SKIP_MEMORY_CHECK=1: run anyway, e.g. where swap makes room)."""
    need, free = plan.peak - plan.resident, available_bytes()
    if need > free and os.environ.get("DISCQ_SKIP_MEMORY_CHECK") != "1":
        raise MemoryError(f"{what} needs about {need / GiB:.2f} GiB more memory than is in use "
                          f"now, but only {free / GiB:.2f} GiB is available:\n"
                          f"{plan.describe()}\nStream it from disk (discq.quantize_pretrained, "
                          f"`discq quantize --stream`), use fewer calibration tokens, or a "
                          f"larger machine; `discq plan` shows the estimate for any setting "
                          f"(DISCQ_SKIP_MEMORY_CHECK=1 runs it anyway)")
