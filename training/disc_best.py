"""DiscQuant keeps the best integral point it has seen.

The relaxed optimum is rounded at the end (x ≥ ½), and nothing in the relaxation promises that
this point is better than the one the run started from: with `init="gptq"` a short run could
end worse than GPTQ's codes. So the rounded point is scored — the KL from the original model on
held-out calibration sequences (never trained on) — at the start, every quarter of the run and
at the end, and the best one is what DiscQuant returns. Scoring at fixed steps keeps a resumed
run's choice that of the uninterrupted run (the best so far travels in the checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from discq.passes.kl import chunked_forward_kl, forward_kl, token_kl, vocab_size
from discq.passes.sharding import local

# held-out sequences: an eighth of the calibration set, at most this many (each costs a
# teacher and a rounded-student forward at every scoring)
MAX_HELD_OUT = 32
# positions x vocabulary of the logits formed at once while scoring
SCORE_ELEMENTS = 2**26
# the original model's log-probs on the held-out sequences are kept up to this size
TEACHER_BYTES = 2**28


def held_out_count(n: int) -> int:
    """How many of n calibration sequences are held out for scoring (0 below 8: the run then
    scores on training sequences)."""
    return min(n // 8, MAX_HELD_OUT)


def score_steps(steps: int) -> set[int]:
    """Optimizer steps after which the rounded point is scored (the start is step 0)."""
    every = max(1, steps // 4)
    return {s for s in range(every, steps, every)} | {steps}


@dataclass
class Best:
    """The best rounded point so far: its held-out KL, the step it was seen after, and each
    layer's rounding decisions (x ≥ ½, this process's rows)."""

    kl: float = float("inf")
    step: int = -1
    up: list[torch.Tensor] = field(default_factory=list)

    def offer(self, kl: float, step: int, layers) -> bool:
        """Keep the point of `layers` if it beats the best (ties keep the earlier one)."""
        if not kl < self.kl:
            return False
        self.kl, self.step = kl, step
        self.up = [(local(l.x.detach()) >= 0.5).clone() for l in layers]
        return True

    @torch.no_grad()
    def restore(self, layers) -> None:
        """Set each layer's x to the best point's vertex (x ∈ {0, 1})."""
        for l, up in zip(layers, self.up):
            local(l.x).copy_(up.to(l.x.dtype))

    def state(self) -> dict:
        return {"kl": self.kl, "step": self.step, "up": self.up}

    def load(self, state: dict) -> None:
        self.kl, self.step, self.up = state["kl"], state["step"], list(state["up"])


class Scorer:
    """The held-out sequences [h, S] in slices of at most SCORE_ELEMENTS logits, and the
    original model's log-probabilities on them where they take at most TEACHER_BYTES (computed
    at the first scoring), else None: the teacher then runs at every scoring."""

    def __init__(self, model, sequences: torch.Tensor, set_teacher):
        self.model, self.set_teacher = model, set_teacher
        self.device = next(model.parameters()).device
        V = vocab_size(model) or 1
        per = max(1, SCORE_ELEMENTS // (sequences.shape[1] * V))  # sequences at a time
        self.slices = [sequences[i:i + per] for i in range(0, len(sequences), per)]
        small = V > 1 and sequences.numel() * V * 4 <= TEACHER_BYTES
        self.teacher: list[torch.Tensor] | None = [] if small else None

    def teacher_logprobs(self, i: int, ids: torch.Tensor) -> torch.Tensor | None:
        """Slice i's teacher log-probs [b, S, V] when kept (computed the first time)."""
        if self.teacher is None:
            return None
        if i == len(self.teacher):
            self.set_teacher(True)
            self.teacher.append(F.log_softmax(self.model(ids, use_cache=False).logits.float(),
                                              dim=-1))
            self.set_teacher(False)
        return self.teacher[i]


@torch.no_grad()
def rounded_kl(model, layers, scorer: Scorer) -> float:
    """Mean KL(original ‖ rounded) per position over the scorer's sequences: each relaxed
    layer runs through its rounded point."""
    total, count = 0.0, 0
    for l in layers:
        l.hard = True
    try:
        for i, ids in enumerate(scorer.slices):
            ids = ids.to(scorer.device)  # [b, S]
            kl = _slice_kl(model, ids, scorer, i)
            total, count = total + float(kl) * len(ids), count + len(ids)
    finally:
        for l in layers:
            l.hard = False
        scorer.set_teacher(False)
    return total / count


def _slice_kl(model, ids: torch.Tensor, scorer: Scorer, i: int) -> torch.Tensor:
    """The mean KL over one slice's positions."""
    lt = scorer.teacher_logprobs(i, ids)
    if lt is not None:
        ls = F.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)
        return token_kl(lt, ls).mean()
    kl = chunked_forward_kl(model, ids, scorer.set_teacher, SCORE_ELEMENTS)
    if kl is None:
        scorer.set_teacher(True)
        teacher = model(ids, use_cache=False).logits
        scorer.set_teacher(False)
        kl = forward_kl(teacher, model(ids, use_cache=False).logits)
    return kl
