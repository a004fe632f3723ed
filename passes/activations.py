"""The hidden states passed from block to block, in memory-mapped files.

With a work directory (a resumable or streaming run), each calibration batch's hidden state
[B, S, D] lives in one of two files: a block reads its inputs from one and writes its outputs
into the other, and after the block the roles swap. So the calibration activations need not
fit in memory (the OS keeps in RAM what it can, as page cache), and at every instant one file
holds a complete set: the inputs of the first unfinished block, which is what a resumed run
starts from.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

FILES = ("hidden-0.bin", "hidden-1.bin")


class MappedActivations:
    """Two memory-mapped files of per-batch hidden states; `current` holds the next block's
    inputs. `shapes`: each calibration batch's [B, S]."""

    def __init__(self, directory: Path, shapes: list[tuple[int, ...]], current: int = 0):
        self.directory, self.shapes, self.current = Path(directory), shapes, current
        self.buffers: list[torch.Tensor] | None = None
        self.offsets = [0]
        for s in shapes:
            self.offsets.append(self.offsets[-1] + math.prod(s))

    def _open(self, h: torch.Tensor) -> None:
        # the feature size and dtype are known at the first hidden state: files sized then
        self.width, self.dtype = h.shape[-1], h.dtype
        n = self.offsets[-1] * self.width
        self.buffers = [torch.from_file(str(self.directory / f), shared=True, size=n,
                                        dtype=self.dtype) for f in FILES]

    def view(self, which: int, i: int) -> torch.Tensor:
        """Batch i's hidden state in file `which`: [B, S, D]."""
        lo, hi = self.offsets[i] * self.width, self.offsets[i + 1] * self.width
        return self.buffers[which][lo:hi].view(*self.shapes[i], self.width)

    def write(self, which: int, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.buffers is None:
            self._open(h)
        if tuple(h.shape) != (*self.shapes[i], self.width) or h.dtype != self.dtype:
            raise RuntimeError(f"the hidden state of calibration batch {i} is {tuple(h.shape)} "
                               f"{h.dtype}; offloading expects [batch, seq, features] = "
                               f"{(*self.shapes[i], self.width)} {self.dtype} for every block")
        out = self.view(which, i)
        out.copy_(h)
        return out

    def capture(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Store the first block's input of batch i (in `current`)."""
        return self.write(self.current, i, h)

    def output(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Store the block's output of batch i (in the other file): the next block's input."""
        return self.write(1 - self.current, i, h)

    def swap(self) -> None:
        """The block is done: its outputs are the current inputs."""
        self.current = 1 - self.current

    def reopen(self, h: torch.Tensor) -> None:
        """Map the files of a resumed run (`h`: any batch's hidden state, for size and dtype)."""
        if self.buffers is None:
            self._open(h)

    def remove(self) -> None:
        self.buffers = None
        for f in FILES:
            (self.directory / f).unlink(missing_ok=True)
