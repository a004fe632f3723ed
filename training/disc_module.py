"""`DiscQuantModule`: DiscQuant's optimization as a thin LightningModule; the math (relaxed
linears, KL, pull term, schedule) is in `discq.passes.disc`."""
from __future__ import annotations

import logging

import lightning as L
import torch
from discq.passes.disc import (
    DiscConfig,
    RelaxedLinear,
    cosine_with_warmup,
    frac_at_vertex,
    hidden_mse,
    next_token_ce,
)
from discq.passes.kl import chunked_forward_kl, forward_kl, top_k_kl, vocab_size
from discq.passes.memory_plan import available_bytes
from discq.passes.sharding import is_sharded, local, rows_held
from torch import nn

from .disc_best import Best, Scorer, rounded_kl, score_steps
from .teacher import TeacherCache

log = logging.getLogger("discq")


# a batch whose logits hold more (batch·position·vocabulary) entries than this (1 GiB in fp32)
# has its KL formed a slice of positions at a time (Gemma 3's 262k vocabulary at 8×512 tokens:
# 4.3 GB of logits per pass, teacher and student, plus their log-softmax and gradients)
LOGIT_ELEMENTS = 2**28
# the teacher's distribution on every calibration sequence (its top-k log-probabilities,
# `disc_config(teacher_topk=k)`) is computed once and kept in memory up to this much (and a
# quarter of what is free), beyond it in a memory-mapped temporary file; 0: the teacher runs
# at every step instead
TEACHER_CACHE_BYTES = 2**31
# the fraction of variables at a vertex (a pass over every variable) is logged this often
VERTEX_LOG_EVERY = 10


class DiscQuantModule(L.LightningModule):
    """`model` has its target linears replaced by `layers`; `noise` is δ̄² (mean_noise)."""

    def __init__(self, model: nn.Module, layers: list[RelaxedLinear], config: DiscConfig,
                 noise: float, units: list[nn.Module] = ()):
        super().__init__()
        self.model = model
        self.layers = layers  # a plain list: they are submodules of model already
        self.config = config
        self.noise = noise
        self.units = list(units)  # the decoder blocks: FSDP's units when sharded
        self.teacher: TeacherCache | None = None  # see cache_teacher
        self.best = Best()  # see discq.training.disc_best
        self.scorer: Scorer | None = None

    def configure_model(self) -> None:
        # under the sharded strategy (discq.training.fsdp) Lightning sets the device mesh
        if self._device_mesh is not None:
            from .fsdp import shard
            shard(self.model, self.units, self._device_mesh["data_parallel"])

    # only the variables x are state: checkpoints stay small and never copy the model
    def state_dict(self, *args, **kwargs) -> dict:
        # views, not clones: the checkpoint is written before x changes again, and a clone
        # would add 4 bytes per weight at every save
        return {f"x.{i}": l.x.detach() for i, l in enumerate(self.layers)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if strict and len(state_dict) != len(self.layers):
            raise ValueError(f"checkpoint has {len(state_dict)} variables, this run has "
                             f"{len(self.layers)} layers: was it written for another model or "
                             f"filter? Use another checkpoint_dir")
        with torch.no_grad():  # a sharded x takes its rows of the (whole) saved one
            for i, l in enumerate(self.layers):
                local(l.x).copy_(rows_held(state_dict[f"x.{i}"], l.x))

    def _set_teacher(self, teacher: bool) -> None:
        for l in self.layers:
            l.teacher = teacher

    def units_unsharded(self) -> bool:
        return self._device_mesh is None

    def _forward(self, ids: torch.Tensor, teacher: bool):
        """(logits [B, S, V], hidden states per layer or None)."""
        for l in self.layers:
            l.teacher = teacher
        want_hidden = self.config.hidden_weight > 0
        out = self.model(ids, use_cache=False, output_hidden_states=want_hidden)
        return out.logits, (out.hidden_states if want_hidden else None)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if int(batch["step"]) != self.global_step:  # see discq.training.data
            raise RuntimeError(f"calibration stream at step {int(batch['step'])}, trainer at "
                               f"{self.global_step}: data order would not be reproducible")
        ids, c = batch["ids"], self.config  # ids: [B, S]
        if c.kl_weight == 0 and c.ce_weight == 0 and c.hidden_weight == 0:
            return sum(l.x.sum() for l in self.layers) * 0.0  # only the pull to RTN is left
        if self.teacher is not None:
            logp, index = self.teacher.get(batch["idx"])  # [B, S, k] each
            student, _ = self._forward(ids, teacher=False)
            kl = top_k_kl(logp.to(ids.device), None if index is None else index.to(ids.device),
                          student)
            return self._loss(kl, student, ids)
        kl = None
        if c.hidden_weight == 0 and c.ce_weight == 0 and self.units_unsharded():
            kl = chunked_forward_kl(self.model, ids, self._set_teacher, LOGIT_ELEMENTS)
        if kl is not None:  # a large vocabulary: never the whole batch's logits at once
            return self._loss(kl)
        with torch.no_grad():
            teacher, t_hidden = self._forward(ids, teacher=True)
        student, s_hidden = self._forward(ids, teacher=False)
        loss = self._loss(forward_kl(teacher, student), student, ids)
        if c.hidden_weight:
            loss = loss + c.hidden_weight * hidden_mse(t_hidden, s_hidden) / self.noise
        return loss

    def _loss(self, kl: torch.Tensor, student=None, ids=None) -> torch.Tensor:
        """The KL (and cross-entropy) terms of the loss, logged."""
        c = self.config
        loss = c.kl_weight * kl / self.noise
        if c.ce_weight:
            loss = loss + c.ce_weight * next_token_ce(student, ids)
        self.log("kl", kl.detach(), prog_bar=True)
        if self.global_step % VERTEX_LOG_EVERY == 0 or self.global_step == c.steps - 1:
            self.log("frac_at_vertex", frac_at_vertex(self.layers), prog_bar=True)
        return loss

    def on_train_start(self) -> None:
        self.cache_teacher()
        if self.global_step == 0:  # a resumed run has its best so far from the checkpoint
            self._score(0)

    def on_train_end(self) -> None:
        """Leave x at the best rounded point seen (see discq.training.disc_best)."""
        b, last = self.best, self.config.steps
        if self.config.keep_best and 0 <= b.step < last:
            log.info("DiscQuant: the rounded point after step %d has the lowest held-out KL "
                     "(%.4f); it is kept instead of the last step's", b.step, b.kl)
            b.restore(self.layers)

    def _score(self, step: int) -> None:
        """The held-out KL of the rounded point now; kept if it is the best so far."""
        if not self.config.keep_best or self.trainer.world_size > 1:
            return  # several processes (DDP, FSDP): the last step's point, as in the paper
        if self.scorer is None:
            data = self.trainer.datamodule
            seqs = data.held_out if len(data.held_out) else data.sequences[:8]  # [h, S]
            self.scorer = Scorer(self.model, seqs, self._set_teacher)
        kl = rounded_kl(self.model, self.layers, self.scorer)
        self.best.offer(kl, step, self.layers)
        self.log("held_out_kl", kl, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["discq_best"] = self.best.state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "discq_best" in checkpoint:
            self.best.load(checkpoint["discq_best"])

    @torch.no_grad()
    def cache_teacher(self) -> None:
        """The teacher's distribution on every calibration sequence, computed once where the
        run would otherwise compute it more than once (each sequence seen in more than one
        step): its `teacher_topk` most likely tokens' log-probabilities a position (all with
        0), in memory up to TEACHER_CACHE_BYTES and a quarter of the free memory, else on
        disk (`training/teacher.py`); a step then runs only the student. Not for the
        intermediate-layer term (it needs the teacher's hidden states), a batch whose logits
        are formed in slices (large vocabularies), several processes, or
        TEACHER_CACHE_BYTES = 0."""
        c, data = self.config, self.trainer.datamodule
        seqs = getattr(data, "sequences", None)  # [n, S]
        if seqs is None or c.hidden_weight or self.trainer.world_size > 1 \
                or not TEACHER_CACHE_BYTES:
            return
        (n, S), B = seqs.shape, c.batch_size
        V = vocab_size(self.model)
        if c.steps * B <= n or V is None or B * S * V > LOGIT_ELEMENTS:
            return  # each sequence seen once at most: nothing to save; or sliced logits
        room = min(TEACHER_CACHE_BYTES, available_bytes() // 4)  # a quarter of what is free
        cache = TeacherCache(n, S, V, c.teacher_topk, room)
        device = next(self.model.parameters()).device
        per = max(B, LOGIT_ELEMENTS // (4 * S * V))  # sequences a forward: larger is faster
        for i in range(0, n, per):
            rows = slice(i, min(i + per, n))
            cache.put(rows, self._forward(seqs[rows].to(device), teacher=True)[0])
        self.teacher = cache

    def on_before_optimizer_step(self, optimizer) -> None:
        # after backward (and DDP's all-reduce): the pull term and the clamp of the KL gradient
        for l in self.layers:
            l.apply_pull(self.config.rho, self.config.clamp)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():  # projection onto [0, 1] before any checkpoint can see x
            for l in self.layers:
                l.x.clamp_(0, 1)
        # scored here, not in on_train_batch_end: that runs after the checkpoint callback, and
        # a run resumed from that checkpoint would miss this step's score
        done = self.global_step + 1  # the step counter moves after this hook
        if done in score_steps(self.config.steps):
            self._score(done)

    def configure_optimizers(self):
        c = self.config
        xs = [l.x for l in self.layers]
        fused = all(x.device.type in ("cpu", "cuda") and not is_sharded(x) for x in xs)
        opt = torch.optim.AdamW(xs, lr=c.lr, weight_decay=0.01, fused=fused)
        warmup = min(c.warmup, c.steps // 4)  # a short run still gets most of its steps at lr
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: cosine_with_warmup(step, warmup, c.steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

