"""Import torchao quietly.

The CPU build of torch cannot load torchao's CUDA extension libraries; torchao logs a warning per
library on import. That is expected here and says nothing to a user, so it is silenced during our
import only (the user's logging configuration is restored afterwards).
"""
from __future__ import annotations

import logging

_NOISY = ("torchao", "torch.utils._pytree")


def _quiet_import():
    logs = [logging.getLogger(n) for n in _NOISY]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
        from torch.utils._python_dispatch import return_and_correct_aliasing
        from torchao.utils import TorchAOBaseTensor
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    return TorchAOBaseTensor, return_and_correct_aliasing


TorchAOBaseTensor, return_and_correct_aliasing = _quiet_import()
