"""`finetune=True` for any rounding method (GPTQ, DiscQuant, ...): the method's handler runs,
then stage-2 fine-tuning (`finetune_`) tunes what stayed continuous against the model as it
was before quantizing. Codes never change. QuIP# has its own handler (it also tunes each block
right after rounding it)."""
from __future__ import annotations

from torch import nn

from .finetune import FinetuneConfig, finetune_
from .tunable import FrozenReference


def then_finetune(handler):
    """A model handler that runs `handler`, then fine-tunes end to end for
    `config.finetune_steps` steps on `config.calibration`. If the fine-tuning fails, the
    continuous parameters are put back (the rounded weights by `quantize_`)."""

    def run(model: nn.Module, config, targets) -> None:
        teacher = FrozenReference(model, share=[m.weight for _, m in targets])  # no weight copy
        handler(model, config, targets)
        settings = FinetuneConfig(steps=config.finetune_steps, seed=getattr(config, "seed", 0),
                                  trainer_kwargs=getattr(config, "trainer_kwargs", None))
        try:
            report = finetune_(model, teacher, config.calibration, settings)
        except BaseException:
            teacher.restore_continuous()
            raise
        model.discq_finetune = {"end_to_end": report}

    return run
