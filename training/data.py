"""The calibration LightningDataModule: steps are the unit, and every step's sequences are a
pure function of (seed, step, rank), so a run resumed from a checkpoint sees exactly the data an
uninterrupted run would have seen, and DDP ranks see disjoint sequences."""
from __future__ import annotations

import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader


def as_sequences(batches: list[torch.Tensor]) -> torch.Tensor:
    """Calibration batches [B, S] -> one tensor of sequences [n, S]; mixed lengths are cut to
    the shortest (with a warning), since a step stacks sequences."""
    rows = [r for b in batches for r in b]
    S = min(len(r) for r in rows)
    if any(len(r) != S for r in rows):
        warnings.warn(f"calibration sequences have different lengths; all are cut to {S} tokens",
                      stacklevel=3)
    return torch.stack([r[:S] for r in rows])


class StepSampler:
    """Which sequences step `step` uses on `rank` of `world`: a seeded permutation per pass over
    the data, consumed in order."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def indices(self, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        start = (step * world + rank) * self.batch_size
        pos = torch.arange(start, start + self.batch_size)
        epoch, within = pos // self.n, pos % self.n
        out = torch.empty_like(pos)
        for e in epoch.unique().tolist():
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e))
            out[epoch == e] = perm[within[epoch == e]]
        return out


class CalibrationDataModule(L.LightningDataModule):
    """Yields one item per optimizer step: the step's sequences are chosen by the module from
    the global step (see StepSampler), which is what makes resuming exact."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.steps), batch_size=1, shuffle=False)
