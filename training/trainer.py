"""The one Lightning `Trainer` builder of discq (DiscQuant, fine-tuning): settings a run
needs, the checkpoint callback that makes it resumable, the user's `trainer_kwargs` on top,
and the warnings of our dependencies a user can do nothing about, quieted inside our fits only.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import warnings

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException

from discq.interrupt import Interrupted, as_interrupted
from discq.quiet import quiet_loggers

# each is about how discq drives Lightning, not about the user's setup: eval mode is deliberate
# (no dropout in teacher or student); resuming mid-epoch is exact (the stream is a function of
# the step, training/data.py); one data process suits in-memory token batches
QUIET = (".*does not have many workers.*", ".*GPU available but not used.*",
         ".*module\\(s\\) in eval mode.*", ".*[Cc]heckpoint directory .* exists and is not empty.*",
         ".*val_check_interval.*", ".*The number of training batches.*",
         ".*resuming from a checkpoint that ended before the epoch ended.*",
         ".*has `__len__` defined.*", ".*isinstance\\(treespec, LeafSpec\\).*")

QUIET_LOGS = ("lightning.pytorch.utilities.rank_zero",
              "lightning.pytorch.trainer.connectors.signal_connector")


@contextlib.contextmanager
def quiet_lightning():
    """Inside: the warnings in QUIET are ignored and Lightning's info lines (rank zero, and
    "Received SIGTERM" before we report the stop ourselves) are off; the caller's warning
    filters and log levels are restored on exit."""
    with quiet_loggers(QUIET_LOGS, logging.WARNING), warnings.catch_warnings():
        for pattern in QUIET:
            warnings.filterwarnings("ignore", pattern)
        yield


class _SeenException(Callback):
    """Keeps the exception a fit stopped on: Lightning reports it to callbacks, then ends a
    Ctrl-C with `sys.exit(1)`, which alone would not say that it was a Ctrl-C."""

    exception: BaseException | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.exception = exception


def fit(trainer: L.Trainer, module: L.LightningModule, *args, **kwargs) -> None:
    """`trainer.fit(module, ...)` with QUIET quieted, and a run stopped by Ctrl-C or SIGTERM
    raised as `discq.interrupt.Interrupted` (Lightning exits the process instead: with status 1
    on Ctrl-C, with status 0 on SIGTERM), so the caller restores its model and the command line
    exits 130/143. Checkpoints written so far stay."""
    seen = _SeenException()
    trainer.callbacks.append(seen)
    try:
        with quiet_lightning():
            trainer.fit(module, *args, **kwargs)
    except SystemExit as e:
        if isinstance(e, SIGTERMException):
            raise Interrupted(signal.SIGTERM) from None
        stop = as_interrupted(seen.exception) if seen.exception is not None else None
        if stop is None:
            raise
        raise stop from None
    finally:
        trainer.callbacks.remove(seen)


class StepsBar(RichProgressBar):
    """Lightning's bar, titled with what runs (e.g. "DiscQuant") instead of "Epoch 0/-2": our
    fits are one stream of `max_steps` steps."""

    def __init__(self, title: str):
        super().__init__()
        self.title = title

    def _get_train_description(self, current_epoch: int) -> str:
        return self.title


def build_trainer(trainer_kwargs: dict | None = None, *, callbacks=(),
                  checkpoint_dir: str | None = None, checkpoint_every: int = 50,
                  keep_top: int = 0, title: str | None = None, **settings) -> L.Trainer:
    """A Trainer with discq's defaults (one device, no logger, no model summary, no sanity
    validation) and `settings` (max_steps, precision, ...); with `checkpoint_dir`, a
    `ModelCheckpoint` writing `last.ckpt` every `checkpoint_every` steps, which a rerun with
    the same arguments resumes from; with `title`, the progress bar is a `StepsBar(title)`. `trainer_kwargs` (the user's) override all of it; their
    "callbacks" are added to ours; a "ddp…" or "fsdp" strategy name becomes
    `resolve_strategy(name)`."""
    extra = dict(trainer_kwargs or {})
    kw = dict(devices=1, logger=False, enable_model_summary=False, enable_checkpointing=False,
              num_sanity_val_steps=0, **settings)
    cbs = [*callbacks, *extra.pop("callbacks", [])]
    bar_wanted = kw.get("enable_progress_bar", True) and extra.get("enable_progress_bar", True)
    if title and bar_wanted and not any(isinstance(c, ProgressBar) for c in cbs):
        cbs.append(StepsBar(title))  # the user's own bar, if any, wins
    if checkpoint_dir:
        from lightning.pytorch.callbacks import ModelCheckpoint
        kw["enable_checkpointing"] = True
        cbs.append(ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=keep_top,
                                   every_n_train_steps=checkpoint_every,
                                   enable_version_counter=False))
    if "strategy" in extra:
        extra["strategy"] = resolve_strategy(extra["strategy"])
    with quiet_lightning():  # its "GPU available ..." lines come from the constructor
        return L.Trainer(**{**kw, **extra, "callbacks": cbs})


def resolve_strategy(strategy):
    """A "ddp…" strategy name becomes the same DDPStrategy without DDP's buffer broadcast before
    every forward: every rank builds identical buffers (grids, codes), synced once; "fsdp"
    becomes discq's sharded strategy (FSDP2, CPU or GPU: `discq.training.fsdp`)."""
    if strategy == "fsdp":
        from .fsdp import fsdp_strategy
        return fsdp_strategy()
    if not isinstance(strategy, str) or not strategy.startswith("ddp"):
        return strategy
    from lightning.pytorch.strategies import StrategyRegistry
    entry = StrategyRegistry[strategy]
    return entry["strategy"](**entry["init_params"], forward_sync_buffers=False)
