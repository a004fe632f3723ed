"""What the runners share: which linears every quantizer rounds, and the timer."""
from __future__ import annotations

import time
from contextlib import contextmanager

from torch import nn


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear but the output head (kept fp32 by every row, as are the embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


@contextmanager
def stopwatch():
    """Yields a dict whose "seconds" is set on exit: wall time of the block."""
    out = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0


def calibration_list(calib, batch_size: int = 8) -> list:
    """calib [N, S] -> batches [B, S], the form discq's configs take."""
    return list(calib.split(batch_size))
