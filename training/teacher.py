"""The original model's next-token distribution on DiscQuant's calibration sequences, computed
once before the first step so that a step runs only the student.

Per position the k most likely tokens' log-probabilities (the logits less their normalizer) and
which tokens they are: k·8 bytes a position instead of V·4 (SmolLM2's 49,152-token vocabulary,
k = 128: 1 KiB against 192 KiB), so the whole run's teacher fits where its logits did not; the
loss is then `passes.kl.top_k_kl`. k = 0 keeps every log-probability. When even that exceeds the
memory allowed, the arrays live in a temporary file, memory-mapped, read a batch at a time.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class TeacherCache:
    """`n` sequences of `S` positions, `k` tokens kept of `V` (k = 0 or k >= V: all)."""

    def __init__(self, n: int, S: int, V: int, k: int, room_bytes: int):
        self.k = V if k == 0 or k >= V else k
        self.full = self.k == V
        shape = (n, S, self.k)
        self.on_disk = self.nbytes(n, S, V, k) > room_bytes
        self._tmp = None
        if self.on_disk:
            self._tmp = tempfile.TemporaryDirectory(prefix="discq-teacher-")
            where = Path(self._tmp.name)
            self.logp = np.lib.format.open_memmap(where / "logp.npy", "w+", np.float32, shape)
            self.index = None if self.full else np.lib.format.open_memmap(
                where / "index.npy", "w+", np.int32, shape)
        else:
            self.logp = np.empty(shape, np.float32)
            self.index = None if self.full else np.empty(shape, np.int32)

    @staticmethod
    def nbytes(n: int, S: int, V: int, k: int) -> int:
        k = V if k == 0 or k >= V else k
        return n * S * k * (4 if k == V else 8)

    @torch.no_grad()
    def put(self, rows: slice, logits: Tensor) -> None:
        """The teacher's logits [b, S, V] of sequences `rows`."""
        logp = F.log_softmax(logits.float(), dim=-1)
        if not self.full:
            logp, idx = logp.topk(self.k, dim=-1)  # [b, S, k]
            self.index[rows] = idx.to(torch.int32).cpu().numpy()
        self.logp[rows] = logp.cpu().numpy()

    def get(self, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        """(log-probs [B, S, k], token ids [B, S, k] or None) of sequences `idx` [B]."""
        rows = idx.cpu().numpy()
        logp = torch.from_numpy(np.ascontiguousarray(self.logp[rows]))
        index = None if self.full else torch.from_numpy(np.ascontiguousarray(self.index[rows]))
        return logp, index
