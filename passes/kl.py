"""The one KL of discq: how far a quantized model's next-token distribution is from the
original's. DiscQuant minimizes it, fine-tuning minimizes its cross-entropy form, evaluation
reports it; all three compute it here, in fp32 (bf16 log-probabilities round KLs of 1e-3 to
noise)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def token_kl(teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """KL(p_t ‖ p_s) = Σ_v p_t (log p_t − log p_s) per position: [..., V] -> [...]."""
    return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)


def forward_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(p_t ‖ p_s) averaged over all positions. logits: [B, S, V]."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    return token_kl(lt, ls).mean()


def soft_cross_entropy(teacher_logits: Tensor, student_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(−Σ p_t log p_s, KL(p_t ‖ p_s)), both averaged over positions: the cross-entropy has the
    KL's gradient in the student (they differ by the teacher's entropy). logits: [B, S, V]."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    ce = -(lt.exp() * ls).sum(-1).mean()
    return ce, token_kl(lt, ls).mean()
