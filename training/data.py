"""The calibration LightningDataModule.

Steps are the unit: the sequences of optimizer step t on rank r (of w ranks) are the slots
(t·w + r)·B … (t·w + r + 1)·B − 1 of an endless stream that goes through the calibration
sequences in a fresh seeded permutation per pass. Every batch is therefore a pure function of
(seed, step, rank): a run resumed from a checkpoint at step t starts the stream at step t and
sees exactly the data an uninterrupted run would have seen, and DDP ranks see disjoint
sequences whose union is what one process with batch w·B would see. The stream is an
IterableDataset that shards itself by rank, so Lightning adds no DistributedSampler (a sampler
over a map-style dataset would restart at its first batch on resume).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset


def as_sequences(batches: list[torch.Tensor]) -> torch.Tensor:
    """Calibration batches [B, S] -> one tensor of sequences [n, S]; mixed lengths are cut to
    the shortest (with a warning), since a step stacks sequences."""
    rows = [r for b in batches for r in b]
    S = min(len(r) for r in rows)
    if any(len(r) != S for r in rows):
        warnings.warn(f"calibration sequences have different lengths; all are cut to {S} tokens",
                      stacklevel=3)
    return torch.stack([r[:S] for r in rows])


def step_indices(step: int, n: int, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1) -> torch.Tensor:
    """Indices (into n sequences) of the batch of `step` on `rank`: [batch_size]."""
    start = (step * world + rank) * batch_size
    pos = torch.arange(start, start + batch_size)
    epoch, within = pos // n, pos % n
    out = torch.empty_like(pos)
    for e in epoch.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
        out[epoch == e] = perm[within[epoch == e]]
    return out


class StepStream(IterableDataset):
    """Yields {"step": t, "ids": [B, S], "idx": [B]} (which sequences) for steps first_step …
    steps − 1 on one rank; the
    module checks `step` against its global step, so a misaligned resume fails loudly."""

    def __init__(self, sequences: torch.Tensor, batch_size: int, seed: int,
                 first_step: int | Callable[[], int], steps: int, rank: int = 0,
                 world: int = 1):
        self.sequences, self.batch_size, self.seed = sequences, batch_size, seed
        self.first_step, self.steps, self.rank, self.world = first_step, steps, rank, world

    def _first(self) -> int:
        return self.first_step() if callable(self.first_step) else self.first_step

    def __iter__(self):
        n = len(self.sequences)
        for t in range(self._first(), self.steps):
            idx = step_indices(t, n, self.batch_size, self.seed, self.rank, self.world)
            yield {"step": torch.tensor(t), "ids": self.sequences[idx], "idx": idx}

    def __len__(self) -> int:
        return self.steps - self._first()


class CalibrationDataModule(L.LightningDataModule):
    """`steps` batches of `batch_size` calibration sequences per rank, cycled and reshuffled
    (seeded) over passes; resumable at any step (see the module docstring)."""

    def __init__(self, batches: list[torch.Tensor], steps: int, batch_size: int, seed: int,
                 held_out: int = 0):
        super().__init__()
        sequences = as_sequences(batches)  # [n, S]
        if not 0 <= held_out < len(sequences):
            raise ValueError(f"held_out={held_out} of {len(sequences)} calibration sequences")
        # the last `held_out` sequences are never trained on (DiscQuant's choice among the
        # integral points it has seen); the stream cycles through the others
        n = len(sequences) - held_out
        self.sequences, self.held_out = sequences[:n], sequences[n:]  # [n, S], [h, S]
        self.steps, self.batch_size, self.seed = steps, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        # the first step is read when iteration starts, after Lightning has restored a
        # checkpoint's loop state (with mid-epoch validation it does so after building loaders)
        t = self.trainer
        first = (lambda: t.global_step) if t else 0
        rank, world = (t.global_rank, t.world_size) if t else (0, 1)
        stream = StepStream(self.sequences, self.batch_size, self.seed, first, self.steps,
                            rank, world)
        return DataLoader(stream, batch_size=None)
