"""Checking calibration data once, for every data-driven method."""
from __future__ import annotations

import torch
from torch import nn


def as_batches(calibration, model: nn.Module | None = None, *, name: str = "calibration"
               ) -> list[torch.Tensor]:
    """`calibration` (a list or any iterable of LongTensor [B, S] or [S]) as a list of [B, S]
    batches, checked: not empty, integer, ids inside the model's vocabulary. Batches may differ
    in shape: every method processes them one at a time."""
    if calibration is None:
        raise ValueError(f"{name} is required for this method: pass {name}=discq.data."
                         f"calibration_batches(tokenizer, 'shakespeare')")
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    batches = []
    for i, b in enumerate(calibration):
        if not isinstance(b, torch.Tensor) or b.is_floating_point() or b.dim() not in (1, 2):
            raise TypeError(f"{name}[{i}] must be an integer tensor of token ids [batch, seq], "
                            f"got {type(b).__name__} {getattr(b, 'shape', '')}")
        batches.append(b.long().unsqueeze(0) if b.dim() == 1 else b.long())
    batches = [b for b in batches if b.numel()]
    if not batches:
        raise ValueError(f"{name} is empty: pass at least one batch of token ids")
    _check_vocab(batches, model, name)
    return batches


def _check_vocab(batches, model, name) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return
    lo = min(int(b.min()) for b in batches)
    hi = max(int(b.max()) for b in batches)
    if lo < 0 or hi >= emb.num_embeddings:
        raise ValueError(f"{name} has token ids in [{lo}, {hi}] but the model's vocabulary is "
                         f"[0, {emb.num_embeddings}): tokenize with this model's tokenizer")
