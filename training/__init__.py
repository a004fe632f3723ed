"""Optimization with Lightning: DiscQuant (and fine-tuning). Importing this package registers
the handlers; `quantize_` imports it on first use of a config that needs it."""
from . import disc_handler  # noqa: F401  (registers DiscConfig's handler)
from .data import CalibrationDataModule, StepStream
from .disc_module import DiscQuantModule

__all__ = ["CalibrationDataModule", "DiscQuantModule", "StepStream"]

# QuIP# fine-tuning (issue 6)
from . import quip_handler  # noqa: F401  (registers QuipSharpConfig's handler)
from .finetune import (
            BlockFinetuneModule,
            FinetuneConfig,
            FinetuneModule,
            finetune_,
            finetune_block_,
)
from .tunable import FrozenReference, Tunables

__all__ += [
            "BlockFinetuneModule",
            "FinetuneConfig",
            "FinetuneModule",
            "FrozenReference",
            "Tunables",
            "finetune_",
            "finetune_block_",
]
