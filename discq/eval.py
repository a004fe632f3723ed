"""Evaluation: perplexity, and agreement of a quantized model with the original one; zero-shot
tasks through lm-evaluation-harness (`tasks`, from `discq/tasks.py`).

All functions run batch by batch under `torch.no_grad()` in eval mode (each model's mode is
restored afterwards) with a tqdm progress bar, and compute log-softmax in fp32 whatever the
model's dtype: bf16 log-probabilities would round KL values of 1e-3 to noise.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from discq.passes.kl import head_logits, head_split, token_kl
from discq.tasks import tasks  # noqa: F401  (discq.eval.tasks: zero-shot tasks via lm-eval)


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; the callers' train/eval modes come back."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# logits of more (batch·position·vocabulary) entries than this are formed a slice of positions
# at a time from the hidden states: Gemma 3's vocabulary of 262,144 makes one 512-token window's
# fp32 logits 0.5 GB, and log-softmax and KL need as much again
CHUNK_ELEMENTS = 2**26


def _logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities: ids [B, S] -> [B, S-1, V], fp32. Position t predicts
    token t+1, so the last position (no target) is dropped."""
    return torch.cat(list(logprob_chunks(model, ids)), dim=1)


def logprob_chunks(model: nn.Module, ids: torch.Tensor) -> Iterator[torch.Tensor]:
    """`_logprobs` in consecutive slices of positions ([B, c, V] fp32 each, covering positions
    0 .. S-2 in order) of at most `CHUNK_ELEMENTS` entries: the decoder runs once, the head and
    log-softmax once per slice. Models whose logits are not head(hidden) (up to Gemma's final
    soft-capping) are run whole."""
    ids = ids.to(_device(model))
    B, S = ids.shape
    vocab = _vocab_size(model)
    step = max(1, CHUNK_ELEMENTS // (B * vocab)) if vocab else S
    split = head_split(model) if step < S - 1 else None
    if split is None:
        out = model(ids)
        logits = out.logits if hasattr(out, "logits") else out  # [B, S, V]; exported modules
        yield F.log_softmax(logits[:, :-1].float(), dim=-1)
        return
    decoder, head, cap = split
    hidden = decoder(input_ids=ids).last_hidden_state  # [B, S, D]
    for a in range(0, S - 1, step):  # logits [B, c, V] of positions a .. a + c
        yield F.log_softmax(head_logits(head, cap, hidden[:, a:min(a + step, S - 1)]), dim=-1)


def _vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(head, "out_features", None)


def check_token_ids(model: nn.Module, ids: torch.Tensor) -> None:
    """Refuse windows that are not [batch, seq] integer ids inside the model's vocabulary
    (the usual cause: text tokenized with another model's tokenizer)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) \
            or ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"each window must be an integer tensor [batch, seq >= 2], got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} "
                         f"{tuple(getattr(ids, 'shape', ()))}: use discq.data.eval_windows")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is not None and ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}) for this model, found "
                         f"[{int(ids.min())}, {int(ids.max())}]: was the text tokenized with "
                         f"this model's tokenizer?")


def _windows(windows: Iterable) -> list:
    if isinstance(windows, torch.Tensor):  # one batch given bare
        windows = [windows]
    windows = list(windows)
    if not windows:
        raise ValueError("windows is empty: pass discq.data.eval_windows(tokenizer, ...)")
    return windows


def perplexity(model: nn.Module, windows: Iterable[torch.Tensor], *,
               progress: bool = True, cached: list | None = None) -> float:
    """exp of the token-weighted mean negative log-likelihood over every next-token prediction
    in `windows` (LongTensors [B, S], e.g. from `discq.data.eval_windows`). `cached`: the
    model's `reference_logprobs` on these windows, read instead of running it."""
    windows = _windows(windows)
    if cached is not None and len(cached) != len(windows):
        raise ValueError(f"cached holds {len(cached)} windows, windows has {len(windows)}; "
                         f"compute it with reference_logprobs(model, windows)")
    nll, count = 0.0, 0
    with _eval_mode(model):
        for i, ids in enumerate(tqdm(windows, desc="perplexity", disable=not progress,
                                     leave=False)):
            check_token_ids(model, ids)
            a = 0
            chunks = logprob_chunks(model, ids) if cached is None else _chunks(cached[i])
            for lp in chunks:  # [B, c, V]
                target = ids[:, 1 + a:1 + a + lp.shape[1]].to(lp.device).unsqueeze(-1)
                nll -= lp.gather(-1, target).sum().item()
                count += target.numel()
                a += lp.shape[1]
    return math.exp(nll / count)


def reference_logprobs(reference: nn.Module, windows: Iterable[torch.Tensor]) -> list:
    """The reference's next-token log-probabilities on each window (per window, its slices of
    positions: `logprob_chunks`), for comparing many models against one reference without
    running it again (`compare(reference, model, windows, cached=...)`). Memory: 4·S·V bytes
    a sequence."""
    with _eval_mode(reference):
        return [list(logprob_chunks(reference, ids)) for ids in _windows(windows)]


def compare(reference: nn.Module, model: nn.Module, windows: Iterable[torch.Tensor], *,
            progress: bool = True, cached: list | None = None) -> dict[str, float]:
    """How closely `model` follows `reference` on `windows`: both perplexities, the mean over
    positions of KL(p_reference ‖ p_model) of the next-token distributions (nats), and top1,
    the fraction of positions where both predict the same most likely token. `cached`: the
    reference's `reference_logprobs` on these windows, used instead of running it."""
    windows = _windows(windows)
    if cached is not None and len(cached) != len(windows):
        raise ValueError(f"cached holds {len(cached)} windows, windows has {len(windows)}; "
                         f"compute it with reference_logprobs(reference, windows)")
    sums = dict(nll_m=0.0, nll_r=0.0, kl=0.0, agree=0.0, count=0)
    with _eval_mode(reference, model):
        for i, ids in enumerate(tqdm(windows, desc="compare", disable=not progress,
                                     leave=False)):
            check_token_ids(model, ids)
            ref = logprob_chunks(reference, ids) if cached is None else _chunks(cached[i])
            _accumulate(sums, ids, ref, _same_slices(logprob_chunks(model, ids)))
    count = sums["count"]
    return {"perplexity": math.exp(sums["nll_m"] / count),
            "reference_perplexity": math.exp(sums["nll_r"] / count),
            "kl": sums["kl"] / count, "top1": sums["agree"] / count}


def _chunks(cached) -> Iterator[torch.Tensor]:
    yield from ([cached] if isinstance(cached, torch.Tensor) else cached)


class _same_slices:
    """The model's log-probs, cut into the slices of positions the reference comes in."""

    def __init__(self, chunks: Iterator[torch.Tensor]):
        self.chunks, self.buffer = chunks, None

    def take(self, n: int) -> torch.Tensor:
        parts, have = [], 0
        while have < n:
            if self.buffer is None:
                self.buffer = next(self.chunks)
            piece = self.buffer[:, :n - have]
            self.buffer = self.buffer[:, n - have:] if self.buffer.shape[1] > n - have else None
            parts.append(piece)
            have += piece.shape[1]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _accumulate(sums: dict, ids: torch.Tensor, ref: Iterator[torch.Tensor],
                ours: _same_slices) -> None:
    """Add one window's NLLs, KL and top-1 agreement, slice of positions by slice."""
    a = 0
    for lp_r in ref:  # [B, c, V]
        lp_m = ours.take(lp_r.shape[1]).to(lp_r.device)
        target = ids[:, 1 + a:1 + a + lp_r.shape[1]].to(lp_r.device).unsqueeze(-1)
        sums["nll_r"] -= lp_r.gather(-1, target).sum().item()
        sums["nll_m"] -= lp_m.gather(-1, target).sum().item()
        sums["kl"] += token_kl(lp_r, lp_m).sum().item()  # Σ over positions
        sums["agree"] += (lp_r.argmax(-1) == lp_m.argmax(-1)).sum().item()
        sums["count"] += target.numel()
        a += lp_r.shape[1]


def embedding_similarity(reference: nn.Module, model: nn.Module, batches: Iterable, *,
                         progress: bool = True) -> float:
    """Mean cosine similarity of the two encoders' sentence embeddings (last hidden state,
    mean-pooled over unmasked tokens). batches: LongTensors [B, S], or tokenizer outputs
    (dicts with input_ids and attention_mask)."""
    sims = []
    with _eval_mode(reference, model):
        for b in tqdm(_windows(batches), desc="embeddings", disable=not progress, leave=False):
            inputs = dict(b) if not isinstance(b, torch.Tensor) else {"input_ids": b}
            mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))  # [B, S]
            pooled = [_mean_pool(m(**{k: v.to(_device(m)) for k, v in inputs.items()})
                                 .last_hidden_state.float().cpu(), mask)
                      for m in (reference, model)]  # 2 x [B, D]
            sims.append(F.cosine_similarity(pooled[0], pooled[1], dim=-1))  # [B]
    return torch.cat(sims).mean().item()


def _mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h: [B, S, D], mask: [B, S] -> [B, D], the mean over tokens where mask is 1."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)
