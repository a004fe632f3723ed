"""Optimization with Lightning: DiscQuant (and fine-tuning). Importing this package registers
the handlers; `quantize_` imports it on first use of a config that needs it."""
from .data import CalibrationDataModule, StepSampler
from .disc_module import DiscQuantModule
from . import disc_handler  # noqa: F401  (registers DiscConfig's handler)

__all__ = ["CalibrationDataModule", "StepSampler", "DiscQuantModule"]
