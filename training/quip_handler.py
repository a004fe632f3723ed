"""The rotated-basis methods (QuIP#, QTIP) with fine-tuning inside `quantize_`: BlockLDLQ block by
block, with stage-1 fine-tuning after each block and stage-2 (end to end) fine-tuning at the
end when `finetune=True`. On any failure the model's continuous parameters are put back too (the
quantized weights are restored by `quantize_`)."""
from __future__ import annotations

from collections.abc import Callable

from discq.passes.quip_sharp import RotatedConfig
from torch import nn

from .finetune import FinetuneConfig, finetune_, finetune_block_
from .tunable import FrozenReference


def finetune_settings(config: RotatedConfig) -> FinetuneConfig:
    """The fine-tuning options of a QuIP# or QTIP config."""
    return FinetuneConfig(
        block_epochs=config.ft_block_epochs, block_lr=config.ft_block_lr, steps=config.ft_steps,
        lr=config.ft_lr, sign_lr=config.ft_sign_lr, batch_size=config.ft_batch_size,
        valid_fraction=config.ft_valid_fraction, patience=config.ft_patience,
        tune_head=config.ft_tune_head, seed=config.seed, checkpoint_dir=config.checkpoint_dir,
        trainer_kwargs=config.trainer_kwargs)


def rotated_finetuned(model: nn.Module, config: RotatedConfig, targets,
                      quantize: Callable[..., None]) -> None:
    """`quantize(model, config, targets, after_block=...)` (QuIP#'s or QTIP's block driver) with
    fine-tuning; their handlers call this."""
    settings = finetune_settings(config)
    teacher = FrozenReference(model, share=[m.weight for _, m in targets])
    report = {"blocks": []}

    def stage1(block, inputs, fp_outputs) -> None:
        report["blocks"].append(finetune_block_(block, inputs, fp_outputs, settings))

    try:
        quantize(model, config, targets, after_block=stage1)
        report["end_to_end"] = finetune_(model, teacher, config.calibration, settings)
    except BaseException:
        teacher.restore_continuous()
        raise
    model.discq_finetune = report  # held-out losses before/after, for the curious

