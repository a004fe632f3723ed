"""Our dependencies' messages that a user can do nothing about, silenced inside discq's own
calls only: the caller's log levels and progress-bar setting are restored on exit.

- torchao logs a warning per CUDA extension library that a CPU build of torch cannot load, and
  torch logs a deprecation line for each enum torchao registers with pytree (both on import,
  which transformers also triggers when it loads a model);
- transformers draws bars for converting a GGUF file and loading weights, and datasets one for
  tokenizing the calibration text: each seconds long.
"""
from __future__ import annotations

import contextlib
import logging

NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_loggers(names, level: int = logging.ERROR):
    """Inside: the loggers `names` log at `level` and above only; their levels come back."""
    logs = [logging.getLogger(n) for n in names]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(level)
    try:
        yield
    finally:
        for log, old in zip(logs, levels):
            log.setLevel(old)


@contextlib.contextmanager
def quiet_dependencies(progress_bars: bool = False):
    """Inside: NOISY_LOGGERS log errors only, and the progress bars of transformers and datasets
    are off unless `progress_bars` (those imported by then: importing them costs seconds)."""
    import sys
    # both libraries have the same switch in their utils.logging
    switches = [sys.modules[m].utils.logging for m in ("transformers", "datasets")
                if m in sys.modules and not progress_bars]
    switches = [s for s in switches if s.is_progress_bar_enabled()]
    for s in switches:
        s.disable_progress_bar()
    try:
        with quiet_loggers(NOISY_LOGGERS):
            yield
    finally:
        for s in switches:
            s.enable_progress_bar()
