"""QuIP#-style fine-tuning of a quantized model with Lightning: codes fixed, everything that
stays continuous tuned (see `tunable.py`).

Stage 1, `finetune_block_`: one decoder block, its sign vectors and norms, against the original
model's outputs of that block (relative MSE), epochs over the stored calibration inputs.
Stage 2, `finetune_`: the whole model, sign vectors, norms, biases and head, against a
teacher's next-token distribution (soft-target cross-entropy; its KL part is logged), a fixed
number of optimizer steps. Both hold out the last calibration batches, validate on them,
stop early when the held-out loss stops improving (`patience` checks) and end with the best
parameters seen, including the starting ones, so tuning never worsens the held-out loss.
Stage 2 is resumable: with `checkpoint_dir`, Lightning checkpoints hold only the tuned
parameters, and a rerun with the same arguments continues from `last.ckpt`.

Works after any method: `finetune_(model, teacher, calibration)` where `teacher` is the
original model, or `FrozenReference(model)` taken before quantizing (no model copy).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from discq.passes.calibration import as_batches
from discq.passes.kl import (too_many, head_logits, head_split, sliced_losses,
                             soft_cross_entropy)
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .data import CalibrationDataModule
from .trainer import build_trainer, fit
from .tunable import FrozenReference, Tunables

Teacher = Callable[[Tensor], Tensor]  # ids [B, S] -> logits [B, S, V]
LOGIT_ELEMENTS = 2**28  # a batch's logits beyond this: a slice of positions at a time


@dataclass
class FinetuneConfig:
    """Settings of both stages (learning rates as in QuIP#: sign vectors 10x the rest)."""

    block_epochs: int = 2
    block_lr: float = 5e-4
    steps: int = 100
    lr: float = 1e-5
    sign_lr: float = 1e-4
    batch_size: int = 2
    valid_fraction: float = 0.125
    patience: int = 3
    val_every: int = 10
    tune_head: bool = True
    seed: int = 0
    checkpoint_dir: str | None = None
    trainer_kwargs: dict | None = None


class _TunedModule(L.LightningModule):
    """Adam over the tunables (two learning rates) and the best held-out state. Only tunables
    are state: checkpoints never copy the model."""

    def __init__(self, tunables: Tunables, lr: float, sign_lr: float):
        super().__init__()
        self.tunables, self.lr, self.sign_lr = tunables, lr, sign_lr
        self.best_loss = math.inf
        self.best: list[Tensor] = []
        self.val_losses: list[Tensor] = []
        self.history: list[float] = []

    def state_dict(self, *args, **kwargs) -> dict:
        ps = self.tunables.parameters()
        out = {f"p.{i}": p.detach().clone() for i, p in enumerate(ps)}
        out.update({f"best.{i}": b for i, b in enumerate(self.best)})
        out["best_loss"] = torch.tensor(self.best_loss)
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        ps = self.tunables.parameters()
        if sum(k.startswith("p.") for k in state_dict) != len(ps):
            raise ValueError(f"checkpoint holds {sum(k.startswith('p.') for k in state_dict)} "
                             f"tensors, this run tunes {len(ps)}: written for another model? "
                             f"Use another checkpoint_dir")
        with torch.no_grad():
            for i, p in enumerate(ps):
                p.copy_(state_dict[f"p.{i}"])
        self.best = [state_dict[f"best.{i}"] for i in range(len(ps)) if f"best.{i}" in state_dict]
        self.best_loss = float(state_dict["best_loss"])

    def on_fit_start(self) -> None:
        self.tunables.bind()  # the trainer has moved the model, rebuilding quantized weights

    def configure_optimizers(self):
        groups = [{"params": self.tunables.signs, "lr": self.sign_lr},
                  {"params": self.tunables.other, "lr": self.lr}]
        return torch.optim.Adam([g for g in groups if g["params"]])

    def on_validation_epoch_start(self) -> None:
        self.val_losses = []

    def on_validation_epoch_end(self) -> None:
        loss = torch.stack(self.val_losses).mean()
        self.log("val_loss", loss, prog_bar=True)
        self.record(float(loss))

    def record(self, loss: float) -> None:
        """Remember a held-out loss, and the parameters if it is the best so far."""
        self.history.append(loss)
        if loss < self.best_loss:
            self.best_loss = loss
            self.best = [p.detach().clone() for p in self.tunables.parameters()]

    @torch.no_grad()
    def held_out_loss(self, items) -> float:
        return float(torch.stack([self._loss(i) for i in items]).mean())

    def restore_best(self) -> None:
        if self.best:
            with torch.no_grad():
                for p, b in zip(self.tunables.parameters(), self.best):
                    p.copy_(b)


# ---- stage 1: one block -------------------------------------------------------------------

class BlockFinetuneModule(_TunedModule):
    """Stage 1: relative MSE between the block's outputs and the original block's."""

    def __init__(self, block: nn.Module, inputs: list, targets: list[Tensor],
                 tunables: Tunables, lr: float):
        super().__init__(tunables, lr=lr / 10, sign_lr=lr)
        self.block, self.inputs, self.targets = block, inputs, targets

    def _loss(self, i: int) -> Tensor:
        args, kwargs = self.inputs[i]
        out = self.block(*args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        t = self.targets[i]
        return (out - t).pow(2).mean() / t.pow(2).mean()

    def training_step(self, i: Tensor, batch_idx: int) -> Tensor:
        loss = self._loss(int(i))
        self.log("mse", loss.detach(), prog_bar=True)
        return loss

    def validation_step(self, i: Tensor, batch_idx: int) -> None:
        self.val_losses.append(self._loss(int(i)).detach())


def _split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, valid) indices: the last round(n·fraction) items held out (none if n < 2)."""
    k = min(n - 1, max(1, round(n * fraction))) if n > 1 and fraction > 0 else 0
    return list(range(n - k)), list(range(n - k, n))


def _trainer(config: FinetuneConfig, **kw) -> L.Trainer:
    from lightning.pytorch.callbacks import EarlyStopping

    from .fsdp import ShardedStrategy
    strategy = (config.trainer_kwargs or {}).get("strategy")
    if strategy == "fsdp" or isinstance(strategy, ShardedStrategy):
        raise ValueError("fine-tuning is not sharded: its quantized weights are tensor "
                         "subclasses FSDP cannot split; use strategy='ddp' (DiscQuant takes "
                         "strategy='fsdp')")
    stop = EarlyStopping("val_loss", patience=config.patience, mode="min", check_finite=True)
    return build_trainer(config.trainer_kwargs, callbacks=[stop], precision="32-true", **kw)


def _accelerator(module: nn.Module) -> str:
    """Train where the module already is (its stored inputs are there too)."""
    p = next(module.parameters(), None)
    return "gpu" if p is not None and p.device.type == "cuda" else "cpu"


@contextlib.contextmanager
def _only_tunables_trainable(model: nn.Module, tunables: Tunables):
    """requires_grad only on the tunables during the fit; flags and modes restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.requires_grad_(False).eval()
    for p in tunables.parameters():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def finetune_block_(block: nn.Module, inputs: list, targets: list[Tensor],
                    config: FinetuneConfig) -> dict:
    """Stage 1 on `block`, in place: inputs = per calibration batch the (args, kwargs) the
    block receives, targets = the original model's output of the block for each. Returns the
    relative MSE on the held-out batches before and after."""
    train, valid = _split(len(inputs), config.valid_fraction)
    if config.block_epochs == 0 or not valid:
        return {}
    with Tunables(block) as tunables, _only_tunables_trainable(block, tunables):
        module = BlockFinetuneModule(block, inputs, targets, tunables, config.block_lr)
        module.record(module.held_out_loss(valid))  # the start is a candidate for the best
        g = torch.Generator().manual_seed(config.seed)
        loaders = (DataLoader(train, batch_size=None, shuffle=True, generator=g),
                   DataLoader(valid, batch_size=None))
        fit(_trainer(config, max_epochs=config.block_epochs, enable_progress_bar=False,
                     accelerator=_accelerator(block)), module, *loaders)
        module.restore_best()
    return {"before": module.history[0], "after": module.best_loss}


# ---- stage 2: end to end ------------------------------------------------------------------

class FinetuneModule(_TunedModule):
    """Stage 2: the model's next-token distribution against the teacher's."""

    def __init__(self, model: nn.Module, teacher: Teacher, tunables: Tunables,
                 config: FinetuneConfig):
        super().__init__(tunables, lr=config.lr, sign_lr=config.sign_lr)
        self.model, self.teacher = model, teacher

    def _loss(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(soft cross-entropy, KL) to the teacher's next-token distribution; a large
        vocabulary's logits a slice of positions at a time (`passes.kl.sliced_losses`)."""
        split = head_split(self.model)
        if split is not None and isinstance(self.teacher, FrozenReference) \
                and too_many(self.model, ids, LOGIT_ELEMENTS):
            decoder, head, cap = split
            with torch.no_grad():
                t_h = self.teacher.last_hidden(ids)
            s_h = decoder(input_ids=ids, use_cache=False).last_hidden_state
            kl, ce = sliced_losses(s_h, t_h, lambda h: head_logits(head, cap, h),
                                   lambda h: head_logits(self.teacher.head(), cap, h),
                                   LOGIT_ELEMENTS)
            return ce, kl
        with torch.no_grad():
            t = self.teacher(ids)
        return soft_cross_entropy(t, self.model(ids, use_cache=False).logits)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if int(batch["step"]) != self.global_step:  # see discq.training.data
            raise RuntimeError(f"calibration stream at step {int(batch['step'])}, trainer at "
                               f"{self.global_step}: data order would not be reproducible")
        ce, kl = self._loss(batch["ids"])
        self.log("kl", kl.detach(), prog_bar=True)
        return ce

    def validation_step(self, ids: Tensor, batch_idx: int) -> None:
        self.val_losses.append(self._loss(ids)[1].detach())

    def on_train_start(self) -> None:
        """A resumed run: its checkpoint was written at the end of a training step, before
        that step's validation (checkpoints and validation share the interval); the held-out
        loss of the restored state is that validation's, so it is recorded now, as the
        uninterrupted run recorded it (else a best state at that step is missed)."""
        if self.trainer.ckpt_path is not None and self.global_step > 0:
            self.record(self.held_out_loss(self.trainer.datamodule.valid))

    @torch.no_grad()
    def held_out_loss(self, items) -> float:
        return float(torch.stack([self._loss(ids)[1] for ids in items]).mean())


class _Data(CalibrationDataModule):
    """The step stream of training sequences plus fixed held-out batches."""

    def __init__(self, train: list[Tensor], valid: list[Tensor], config: FinetuneConfig):
        super().__init__(train, config.steps, config.batch_size, config.seed)
        self.valid = valid

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.valid, batch_size=None)


def _split_sequences(batches: list[Tensor], config: FinetuneConfig
                     ) -> tuple[list[Tensor], list[Tensor]]:
    rows = [r for b in batches for r in b]
    train, valid = _split(len(rows), config.valid_fraction)
    B = config.batch_size
    held = [torch.stack([rows[i] for i in valid[k:k + B]]) for k in range(0, len(valid), B)]
    return [torch.stack([rows[i] for i in train])], held


def finetune_(model: nn.Module, teacher: nn.Module | Teacher, calibration,
              config: FinetuneConfig | None = None, **overrides) -> dict:
    """Stage 2 on `model` in place: codes fixed, sign vectors, norms, biases and (with
    `tune_head`) the head tuned to match `teacher`'s next-token distribution on
    `calibration` (token batches). `teacher`: the original model, or any ids -> logits
    callable such as `FrozenReference(model)` taken before quantizing. Settings: `config`
    or keywords of `FinetuneConfig`. Returns the held-out KL before and after."""
    config = config or FinetuneConfig()
    for k, v in overrides.items():
        setattr(config, k, v)
    if isinstance(teacher, nn.Module):
        teacher = FrozenReference(teacher, share=list(teacher.parameters()))
    train, valid = _split_sequences(as_batches(calibration, model), config)
    if config.steps == 0 or not valid:
        return {}
    head = model.get_output_embeddings() if config.tune_head else None
    with Tunables(model, head=head) as tunables, _only_tunables_trainable(model, tunables):
        module = FinetuneModule(model, teacher, tunables, config)
        if not _resuming(config):
            module.record(module.held_out_loss(valid))
        _fit_end_to_end(module, _Data(train, valid, config), config)
        module.restore_best()
    return {"kl_before": module.history[0] if module.history else None,
            "kl_after": module.best_loss, "val_history": module.history}


def _resuming(config: FinetuneConfig) -> bool:
    return bool(config.checkpoint_dir) and (Path(config.checkpoint_dir) / "last.ckpt").is_file()


def _fit_end_to_end(module: FinetuneModule, data: _Data, config: FinetuneConfig) -> None:
    trainer = _trainer(config, max_steps=config.steps,
                       val_check_interval=min(config.val_every, config.steps),
                       check_val_every_n_epoch=None, checkpoint_dir=config.checkpoint_dir,
                       checkpoint_every=config.val_every, accelerator=_accelerator(module.model),
                       title="fine-tuning")
    ckpt = Path(config.checkpoint_dir) / "last.ckpt" if _resuming(config) else None
    fit(trainer, module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
