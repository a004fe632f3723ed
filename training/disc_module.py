"""`DiscQuantModule`: DiscQuant's optimization as a thin LightningModule (the math is in
`discq.passes.disc`)."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from discq.passes.disc import (DiscConfig, RelaxedLinear, cosine_with_warmup, forward_kl,
                               frac_at_vertex, pull_gradient)

from .data import StepSampler


class DiscQuantModule(L.LightningModule):
    def __init__(self, model: nn.Module, layers: list[RelaxedLinear], config: DiscConfig,
                 sequences: torch.Tensor, noise: float):
        super().__init__()
        self.model = model
        self.layers = layers  # a plain list: they are submodules of model already
        self.config = config
        self.register_buffer("sequences", sequences, persistent=False)
        self.noise = noise  # δ̄²
        self.sampler = StepSampler(len(sequences), config.batch_size, config.seed)

    # only the variables x are state: checkpoints stay small and never copy the model
    def state_dict(self, *args, **kwargs):
        return {f"x.{i}": l.x.detach().clone() for i, l in enumerate(self.layers)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        with torch.no_grad():
            for i, l in enumerate(self.layers):
                l.x.copy_(state_dict[f"x.{i}"])

    def _logits(self, ids: torch.Tensor, teacher: bool) -> torch.Tensor:
        for l in self.layers:
            l.teacher = teacher
        return self.model(ids, use_cache=False).logits  # [B, S, V]

    def training_step(self, batch, batch_idx):
        idx = self.sampler.indices(self.global_step, self.global_rank, self.trainer.world_size)
        ids = self.sequences[idx.to(self.sequences.device)]  # [B, S]
        c = self.config
        if c.kl_weight == 0 and c.ce_weight == 0:  # only the pull towards RTN is left
            return sum(l.x.sum() for l in self.layers) * 0.0
        with torch.no_grad():
            teacher = self._logits(ids, teacher=True)
        student = self._logits(ids, teacher=False)
        kl = forward_kl(teacher, student)
        loss = c.kl_weight * kl / self.noise
        if c.ce_weight:
            loss = loss + c.ce_weight * F.cross_entropy(
                student[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        self.log("kl", kl.detach(), prog_bar=True)
        self.log("vertex", frac_at_vertex(self.layers), prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        for l in self.layers:
            pull_gradient(l, self.config.rho, self.config.clamp)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():  # projection onto [0, 1], before any checkpoint can see x
            for l in self.layers:
                l.x.clamp_(0, 1)

    def configure_optimizers(self):
        c = self.config
        opt = torch.optim.AdamW([l.x for l in self.layers], lr=c.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: cosine_with_warmup(step, min(c.warmup, c.steps // 4), c.steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
