"""The one KL of discq: how far a quantized model's next-token distribution is from the
original's. DiscQuant minimizes it, fine-tuning minimizes its cross-entropy form, evaluation
reports it; all three compute it here, in fp32 (bf16 log-probabilities round KLs of 1e-3 to
noise)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def token_kl(teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """KL(p_t ‖ p_s) = Σ_v p_t (log p_t − log p_s) per position: [..., V] -> [...]."""
    return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)


def forward_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(p_t ‖ p_s) averaged over all positions. logits: [B, S, V]."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    return token_kl(lt, ls).mean()


def top_k_kl(teacher_logprobs: Tensor, index: Tensor | None, student_logits: Tensor) -> Tensor:
    """KL(p_t ‖ p_s) averaged over positions, the teacher kept as the log-probabilities of its
    k most likely tokens (`index` [B, S, k]: which tokens; `teacher_logprobs` [B, S, k]) and the
    rest of its mass as one bucket: the KL of the two distributions coarsened to those k tokens
    and "any other" — never above the full KL (coarsening loses information) and equal to it
    when the k tokens hold all the teacher's mass. `index` None: `teacher_logprobs` is the
    whole [B, S, V]."""
    ls = F.log_softmax(student_logits.float(), dim=-1)  # [B, S, V]
    if index is None:
        return token_kl(teacher_logprobs, ls).mean()
    lq = ls.gather(-1, index.long())  # [B, S, k]
    lp_rest = _log_rest(teacher_logprobs)  # log of the mass outside the k tokens
    lq_rest = _log_rest(lq)
    rest = lp_rest.exp() * (lp_rest - lq_rest)
    return (token_kl(teacher_logprobs, lq) + rest).mean()


def _log_rest(logp: Tensor) -> Tensor:
    """log(1 − Σ_k p) from k log-probabilities [..., k], floored at log(1e-6) (the mass left
    outside a top-k can round to zero or below; 1e-6 of KL is far below the scores' spread)."""
    inside = torch.logsumexp(logp, dim=-1).clamp(max=-1e-6)
    return torch.where(inside > -0.693, torch.log(-torch.expm1(inside)),
                       torch.log1p(-inside.exp()))


def soft_cross_entropy(teacher_logits: Tensor, student_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(−Σ p_t log p_s, KL(p_t ‖ p_s)), both averaged over positions: the cross-entropy has the
    KL's gradient in the student (they differ by the teacher's entropy). logits: [B, S, V]."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    ce = -(lt.exp() * ls).sum(-1).mean()
    return ce, token_kl(lt, ls).mean()


# ---- logits a slice of positions at a time ---------------------------------------------------

def head_split(model):
    """(decoder, head, soft-cap) of a transformers causal LM whose logits are head(decoder's
    last hidden state), soft-capped by `final_logit_softcapping` if set; else None. Lets the
    logits of a large vocabulary (Gemma 3: 262,144) be formed a slice of positions at a time."""
    config = getattr(model, "config", None)
    decoder = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    scaled = any(getattr(config, k, None) not in (None, 1, 1.0)
                 for k in ("logit_scale", "logits_scaling", "output_multiplier_scale"))
    if config is None or decoder is None or decoder is model or head is None or scaled:
        return None
    return decoder, head, getattr(config, "final_logit_softcapping", None)


def head_logits(head, cap, hidden: Tensor) -> Tensor:
    """fp32 logits of `hidden` [B, c, D] through the head (and the soft-cap)."""
    logits = head(hidden).float()
    return logits if not cap else torch.tanh(logits / cap) * cap


def chunked_forward_kl(model, ids: Tensor, set_teacher, max_elements: int) -> Tensor | None:
    """`forward_kl` of the model run as teacher and as student (`set_teacher(flag)` switches
    it), its logits formed and reduced `max_elements` (batch·position·vocabulary) at a time;
    None where the model's logits are not head(hidden) or fit in one slice."""
    split = head_split(model)
    if split is None or not too_many(model, ids, max_elements):
        return None
    decoder, head, cap = split
    with torch.no_grad():
        set_teacher(True)
        t_h = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [B, S, D]
    set_teacher(False)
    s_h = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [B, S, D]

    def teacher_head(h):
        set_teacher(True)
        return head_logits(head, cap, h)

    def student_head(h):
        set_teacher(False)
        return head_logits(head, cap, h)
    kl, _ = sliced_losses(s_h, t_h, student_head, teacher_head, max_elements)
    return kl


def too_many(model, ids: Tensor, max_elements: int) -> bool:
    """Whether a batch's logits would hold more than `max_elements` entries."""
    V = vocab_size(model)
    return V is not None and ids.shape[0] * ids.shape[1] * V > max_elements


def vocab_size(model) -> int | None:
    """The width of a transformers model's logits, from its config (its head may be relaxed
    or quantized); None for other modules."""
    text_config = getattr(getattr(model, "config", None), "get_text_config", None)
    V = getattr(text_config(decoder=True), "vocab_size", None) if text_config else None
    return V if isinstance(V, int) else None


def sliced_losses(s_h: Tensor, t_h: Tensor, student_head, teacher_head, max_elements: int
                  ) -> tuple[Tensor, Tensor]:
    """(KL(p_t ‖ p_s), −Σ p_t log p_s), averaged over positions, from the last hidden states
    [B, S, D] of student and teacher and their heads (hidden -> fp32 logits), a slice of
    positions at a time; each slice's logits are recomputed in the backward pass instead of
    kept (activation checkpointing), so no more than one slice's exist at once."""
    B, S, _ = s_h.shape
    V = teacher_head(t_h[:, :1]).shape[-1]
    step = max(1, max_elements // (B * V))
    kl = ce = 0.0
    for a in range(0, S, step):
        k, c = checkpoint(_slice_losses, s_h[:, a:a + step], t_h[:, a:a + step], student_head,
                          teacher_head, use_reentrant=False)
        kl, ce = kl + k, ce + c
    return kl / (B * S), ce / (B * S)


def _slice_losses(s_h: Tensor, t_h: Tensor, student_head, teacher_head):
    """Σ over the slice's positions of KL(p_t ‖ p_s) and of −Σ_v p_t log p_s (the teacher's
    head first, under no_grad: a switch it sets is set again for the student)."""
    with torch.no_grad():
        lt = F.log_softmax(teacher_head(t_h), dim=-1)
    ls = F.log_softmax(student_head(s_h), dim=-1)
    return token_kl(lt, ls).sum(), -(lt.exp() * ls).sum()
