"""The one Lightning `Trainer` builder of discq (DiscQuant, fine-tuning): settings a run
needs, the checkpoint callback that makes it resumable, the user's `trainer_kwargs` on top,
and the warnings of our dependencies a user can do nothing about, quieted inside our fits only.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import lightning as L

# each is about how discq drives Lightning, not about the user's setup: eval mode is deliberate
# (no dropout in teacher or student); resuming mid-epoch is exact (the stream is a function of
# the step, training/data.py); one data process suits in-memory token batches
QUIET = (".*does not have many workers.*", ".*GPU available but not used.*",
         ".*module\\(s\\) in eval mode.*", ".*[Cc]heckpoint directory .* exists and is not empty.*",
         ".*val_check_interval.*", ".*The number of training batches.*",
         ".*resuming from a checkpoint that ended before the epoch ended.*",
         ".*has `__len__` defined.*", ".*isinstance\\(treespec, LeafSpec\\).*")


@contextlib.contextmanager
def quiet_lightning():
    """Inside: the warnings in QUIET are ignored and Lightning's rank-zero info lines are off;
    the caller's warning filters and log level are restored on exit."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in QUIET:
                warnings.filterwarnings("ignore", pattern)
            yield
    finally:
        log.setLevel(level)


def build_trainer(trainer_kwargs: dict | None = None, *, callbacks=(),
                  checkpoint_dir: str | None = None, checkpoint_every: int = 50,
                  keep_top: int = 0, **settings) -> L.Trainer:
    """A Trainer with discq's defaults (one device, no logger, no model summary, no sanity
    validation) and `settings` (max_steps, precision, ...); with `checkpoint_dir`, a
    `ModelCheckpoint` writing `last.ckpt` every `checkpoint_every` steps, which a rerun with
    the same arguments resumes from. `trainer_kwargs` (the user's) override all of it; their
    "callbacks" are added to ours; a "ddp…" strategy name becomes `ddp_strategy(name)`."""
    extra = dict(trainer_kwargs or {})
    kw = dict(devices=1, logger=False, enable_model_summary=False, enable_checkpointing=False,
              num_sanity_val_steps=0, **settings)
    cbs = [*callbacks, *extra.pop("callbacks", [])]
    if checkpoint_dir:
        from lightning.pytorch.callbacks import ModelCheckpoint
        kw["enable_checkpointing"] = True
        cbs.append(ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=keep_top,
                                   every_n_train_steps=checkpoint_every,
                                   enable_version_counter=False))
    if "strategy" in extra:
        extra["strategy"] = ddp_strategy(extra["strategy"])
    return L.Trainer(**{**kw, **extra, "callbacks": cbs})


def ddp_strategy(strategy):
    """A "ddp…" strategy name becomes the same DDPStrategy without DDP's buffer broadcast before
    every forward: every rank builds identical buffers (grids, codes), synced once."""
    if not isinstance(strategy, str) or not strategy.startswith("ddp"):
        return strategy
    from lightning.pytorch.strategies import StrategyRegistry
    entry = StrategyRegistry[strategy]
    return entry["strategy"](**entry["init_params"], forward_sync_buffers=False)
