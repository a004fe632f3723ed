"""Optimization with Lightning: DiscQuant and fine-tuning. The methods' handlers (registered
next to their configs in `discq.passes`) import these modules on first use."""
from .data import CalibrationDataModule, StepStream
from .disc_module import DiscQuantModule
from .fsdp import ShardBytes, ShardedStrategy, fsdp_strategy
from .finetune import (
    BlockFinetuneModule,
    FinetuneConfig,
    FinetuneModule,
    finetune_,
    finetune_block_,
)
from .tunable import FrozenReference, Tunables

__all__ = [
    "BlockFinetuneModule",
    "CalibrationDataModule",
    "DiscQuantModule",
    "FinetuneConfig",
    "FinetuneModule",
    "FrozenReference",
    "ShardBytes",
    "ShardedStrategy",
    "StepStream",
    "Tunables",
    "finetune_",
    "finetune_block_",
    "fsdp_strategy",
]
