"""Where the block driver's blocks come from and where finished ones go.

In memory (no source active) the driver quantizes the model's blocks in place and keeps nothing
on disk. `CheckpointedBlocks(directory, settings)` makes a run resumable: after each block its
weights are saved (`save_quantized` of the block), the next block's inputs stay in
memory-mapped files (`activations.py`), and `state.json` (written last, atomically) says how far
the run got; the same call started again restores the finished blocks and continues with the
next, ending bit-identical to an uninterrupted run. The streaming source (`discq.stream`)
extends it: blocks are read from safetensors shards before and written to output shards after.

A source is made active with `use_source(source)`; the driver asks `current_source()`.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .activations import MappedActivations

_SOURCE: contextvars.ContextVar[CheckpointedBlocks | None] = contextvars.ContextVar(
    "discq_block_source", default=None)
STATE = "state.json"

# how a module's tensors are saved and loaded (`save(module, dir)`, `load(dir, module)`): set
# by `discq.io` on import (passes/ knows nothing of the file layout, as with AFTER_QUANTIZE)
MODULE_STORE: dict = {}


def register_module_store(save, load) -> None:
    MODULE_STORE.update(save=save, load=load)


def _store(what: str):
    if what not in MODULE_STORE:
        raise RuntimeError("import discq first: it registers how checkpointed blocks are saved")
    return MODULE_STORE[what]


def current_source() -> CheckpointedBlocks | None:
    return _SOURCE.get()


@contextlib.contextmanager
def use_source(source: CheckpointedBlocks | None):
    """Within the block, the block driver takes its blocks from `source` (None: in memory)."""
    token = _SOURCE.set(source)
    try:
        yield source
    finally:
        _SOURCE.reset(token)


def checkpointed(checkpoint_dir: str | os.PathLike | None, settings: str):
    """`use_source` of a `CheckpointedBlocks` in `checkpoint_dir` (a context doing nothing
    without one, or when a source is active already: a streaming run checkpoints itself)."""
    if checkpoint_dir is None or current_source() is not None:
        return contextlib.nullcontext()
    return use_source(CheckpointedBlocks(checkpoint_dir, settings))


def fingerprint(settings: str, batches: list[torch.Tensor], names: list[str]) -> str:
    """What must be equal for a run to resume another: settings, calibration ids, targets."""
    h = hashlib.sha256(settings.encode())
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.cpu().numpy().tobytes())
    h.update("\n".join(names).encode())
    return h.hexdigest()


def write_json(path: Path, obj: dict) -> None:
    """Atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class CheckpointedBlocks:
    """A resumable block-by-block run in `directory` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, settings: str):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be a directory path, got "
                            f"{type(directory).__name__}")
        self.directory, self.settings = Path(directory), settings
        self.state: dict = {}
        self.activations: MappedActivations | None = None

    # ---- the run ---------------------------------------------------------------------------
    def begin(self, model: nn.Module, blocks: nn.ModuleList, batches, targets) -> None:
        """Open (or resume) the run; refuses a directory holding another run's blocks."""
        self.directory.mkdir(parents=True, exist_ok=True)
        key = fingerprint(self.settings, batches, [fqn for fqn, _ in targets])
        file = self.directory / STATE
        old = json.loads(file.read_text()) if file.is_file() else None
        if old is not None and old.get("fingerprint") != key:
            raise ValueError(f"{self.directory} holds the blocks of a run with other settings, "
                             f"calibration data or layers; delete it or choose another "
                             f"checkpoint directory")
        self.state = old or {"fingerprint": key, "blocks_done": 0, "current": 0,
                             "rest_done": False, "outputs": 0}
        self.activations = MappedActivations(self.directory, [tuple(b.shape) for b in batches],
                                             self.state["current"])

    @property
    def finished(self) -> int:
        return self.state["blocks_done"]

    def resume(self, inputs: list) -> None:
        """Point the captured inputs at the stored hidden states of the first unfinished block."""
        from .capture import input_hidden, set_hidden
        acts = self.activations
        acts.reopen(input_hidden(*inputs[0]))
        for i, (args, kwargs) in enumerate(inputs):
            set_hidden(args, kwargs, acts.view(acts.current, i))

    def template(self):
        """What a block returns, for a run resumed after its last block: a tensor, or a tuple
        of this length with the hidden state first."""
        n = self.state["outputs"]
        return (None,) * n if n else None

    def restore(self, i: int, block: nn.Module) -> None:
        """A block finished by an earlier run: its saved weights go back into the model."""
        _store("load")(self.directory / f"block-{i:05d}", block)

    def load(self, i: int, block: nn.Module) -> None:
        """Make block i's weights available (they are in memory already)."""

    def save_block(self, i: int, block: nn.Module) -> None:
        _store("save")(block, self.directory / f"block-{i:05d}")

    def done(self, i: int, block: nn.Module, output, carried: list | None) -> None:
        """Block i is quantized and its outputs are the current inputs: save, then commit."""
        self.save_block(i, block)
        if carried is not None:  # what a method's hooks carry to the next block
            save_file({str(k): t.contiguous() for k, t in enumerate(carried)},
                      str(self.directory / f"carried-{i:05d}.safetensors"))
        self.state.update(blocks_done=i + 1, current=self.activations.current,
                          outputs=len(output) if isinstance(output, (tuple, list)) else 0)
        write_json(self.directory / STATE, self.state)
        (self.directory / f"carried-{i - 1:05d}.safetensors").unlink(missing_ok=True)

    def carried(self) -> list[torch.Tensor] | None:
        """What the hooks carried out of the last finished block, if they carry anything."""
        file = self.directory / f"carried-{self.finished - 1:05d}.safetensors"
        if not file.is_file():
            return None
        d = load_file(str(file))
        return [d[str(k)] for k in range(len(d))]

    # ---- the layers outside the blocks -----------------------------------------------------
    @property
    def rest_finished(self) -> bool:
        return self.state["rest_done"]

    def restore_rest(self, rest: dict[nn.Module, str]) -> None:
        for m, fqn in rest.items():
            _store("load")(self.directory / f"rest-{fqn}", m)

    def rest_done(self, rest: dict[nn.Module, str]) -> None:
        for m, fqn in rest.items():
            _store("save")(m, self.directory / f"rest-{fqn}")
        self.state["rest_done"] = True
        write_json(self.directory / STATE, self.state)

    def end(self) -> None:
        """Every block is done: the activation files are not needed any more."""
        if self.activations is not None:
            self.activations.remove()
