"""Evaluation: perplexity, and agreement of a quantized model with the original one.

All functions run batch by batch under `torch.no_grad()` in eval mode with a progress bar, and
compute log-softmax in fp32 whatever the model's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def _logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities. ids: [B, S] -> [B, S-1, V] fp32."""
    device = next(model.parameters()).device
    logits = model(ids.to(device)).logits  # [B, S, V]
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def check_token_ids(model: nn.Module, ids: torch.Tensor) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        raise ValueError(f"token windows must be integer tensors [batch, seq], got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}) for this model, found "
                         f"[{int(ids.min())}, {int(ids.max())}]: was the text tokenized with "
                         f"this model's tokenizer?")


def _windows(windows) -> list[torch.Tensor]:
    windows = list(windows)
    if not windows:
        raise ValueError("windows is empty: pass discq.data.eval_windows(tokenizer, ...)")
    return windows


@torch.no_grad()
def perplexity(model: nn.Module, windows, *, progress: bool = True) -> float:
    """exp of the token-weighted mean negative log-likelihood over every next-token prediction."""
    model.eval()
    nll, count = 0.0, 0
    for ids in tqdm(_windows(windows), desc="perplexity", disable=not progress, leave=False):
        check_token_ids(model, ids)
        lp = _logprobs(model, ids)  # [B, S-1, V]
        target = ids[:, 1:].to(lp.device)
        nll -= lp.gather(-1, target.unsqueeze(-1)).sum().item()
        count += target.numel()
    return math.exp(nll / count)


@torch.no_grad()
def compare(reference: nn.Module, model: nn.Module, windows, *,
            progress: bool = True) -> dict[str, float]:
    """Perplexity of both models, mean KL(p_reference ‖ p_model) of the next-token
    distributions over all positions, and top-1 agreement (same argmax)."""
    reference.eval(), model.eval()
    nll_m = nll_r = kl = agree = 0.0
    count = 0
    for ids in tqdm(_windows(windows), desc="compare", disable=not progress, leave=False):
        check_token_ids(model, ids)
        lp_r, lp_m = _logprobs(reference, ids), _logprobs(model, ids)  # [B, S-1, V]
        target = ids[:, 1:].to(lp_m.device).unsqueeze(-1)
        nll_m -= lp_m.gather(-1, target).sum().item()
        nll_r -= lp_r.gather(-1, target).sum().item()
        kl += (lp_r.exp() * (lp_r - lp_m)).sum().item()
        agree += (lp_r.argmax(-1) == lp_m.argmax(-1)).sum().item()
        count += target.numel()
    return {"perplexity": math.exp(nll_m / count), "reference_perplexity": math.exp(nll_r / count),
            "kl": kl / count, "top1": agree / count}


@torch.no_grad()
def embedding_similarity(reference: nn.Module, model: nn.Module, batches, *,
                         progress: bool = True) -> float:
    """Mean cosine similarity of mean-pooled last hidden states (encoders). batches: LongTensor
    [B, S] or dicts with input_ids / attention_mask."""
    reference.eval(), model.eval()
    sims = []
    for b in tqdm(_windows(batches), desc="embeddings", disable=not progress, leave=False):
        inputs = b if isinstance(b, dict) else {"input_ids": b}
        mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
        pooled = [_mean_pool(m(**inputs).last_hidden_state, mask) for m in (reference, model)]
        sims.append(F.cosine_similarity(pooled[0], pooled[1], dim=-1))
    return torch.cat(sims).mean().item()


def _mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h: [B, S, D], mask: [B, S] -> [B, D]."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)
