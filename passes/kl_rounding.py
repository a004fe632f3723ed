"""Rounding every target for the whole model's output (`hessian="kl"`): the shared driver.

The Kronecker factors of every target's KL Hessian are taken first, on the original model
(`kl_hessian.KLFactors`), then each layer is rounded with its own factors by the method's
`quantize_layer(fqn, module, H_in, H_out)` (H_out None unless the config feeds rows back
through it, `kl_rows` > 0: its sketch costs about as much again). Unlike the block driver no layer's Hessian depends
on the layers rounded before it (as in YAQA), so nothing is run through the model while
rounding. With `checkpoint_dir` the factors are kept in `<checkpoint_dir>/kl_hessians` and each
rounded layer in `<checkpoint_dir>/kl_layers`: the same call started again after a crash reads
both back instead of running the passes and rounding those layers again.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn
from tqdm.auto import tqdm

from .block_source import _store, fingerprint, write_json
from .kl_hessian import KLFactors, Shared

QuantizeKL = Callable[[str, nn.Linear, Tensor, Tensor | None], None]
# factors taken once and read by every run inside `sharing(...)` (mixed widths' candidates)
_SHARED: contextvars.ContextVar[Shared | None] = contextvars.ContextVar("kl_shared",
                                                                        default=None)


@contextlib.contextmanager
def sharing(factors: KLFactors):
    """Inside, a config with `hessian="kl"` rounds with `factors` (no pass of its own) when
    they cover its targets (and hold the output side if its `kl_rows` needs it)."""
    token = _SHARED.set(factors.shared())
    try:
        yield
    finally:
        _SHARED.reset(token)


def check_whole_model(targets) -> None:
    """The KL's gradients need a backward pass through every block at once: a streaming run,
    which holds one block in memory, cannot take them."""
    for fqn, m in targets:
        if m.weight.is_meta:
            raise ValueError(f"hessian='kl' needs the whole model in memory (one backward pass "
                             f"through every block), but {fqn!r} is not loaded (a streaming "
                             f"run); use hessian='inputs' when streaming")


def kl_factors(model: nn.Module, batches, targets, config) -> KLFactors | Shared:
    """Every target's factors for a config with `hessian="kl"` and `kl_rows` (and
    `checkpoint_dir`, `seed` where it has them), computed now, on the model as it is."""
    check_whole_model(targets)
    shared = _SHARED.get()
    if shared is not None and shared.covers(targets) \
            and (shared.output_side or getattr(config, "kl_rows", 0) == 0):
        return shared
    checkpoint_dir = getattr(config, "checkpoint_dir", None)
    directory = None if checkpoint_dir is None else Path(checkpoint_dir) / "kl_hessians"
    return KLFactors(model, batches, targets, seed=getattr(config, "seed", 0),
                     output_side=getattr(config, "kl_rows", 0) > 0, directory=directory,
                     settings=_fingerprint(config, batches, targets)).compute()


def _fingerprint(config, batches, targets) -> str:
    return fingerprint(config.to_json(), batches, [fqn for fqn, _ in targets])


def kl_quantize(model: nn.Module, batches, targets: list[tuple[str, nn.Linear]],
                quantize_layer: QuantizeKL, config, *, desc: str) -> None:
    """Each target rounded by `quantize_layer(fqn, module, H_in, H_out)`, in order."""
    factors = kl_factors(model, batches, targets, config)
    done = _Finished(config.checkpoint_dir, _fingerprint(config, batches, targets))
    for fqn, m in tqdm(targets, desc=desc, unit="layer", leave=False):
        if done.restore(fqn, m):
            continue
        H_in, H_out = factors.pop(fqn)
        quantize_layer(fqn, m, H_in, H_out)
        done.add(fqn, m)


class _Finished:
    """The layers a checkpointed run has rounded: saved one by one (`discq.io`'s module
    store), listed in `state.json` (written after the layer's files, atomically)."""

    def __init__(self, checkpoint_dir: str | None, key: str):
        self.directory = None if checkpoint_dir is None else Path(checkpoint_dir) / "kl_layers"
        self.key, self.names = key, []
        state = None if self.directory is None else self.directory / "state.json"
        if state is not None and state.is_file():
            old = json.loads(state.read_text())
            self.names = old["layers"] if old.get("fingerprint") == key else []

    def restore(self, fqn: str, module: nn.Module) -> bool:
        if fqn not in self.names:
            return False
        _store("load")(self.directory / fqn, module)
        return True

    def add(self, fqn: str, module: nn.Module) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        _store("save")(module, self.directory / fqn)
        self.names.append(fqn)
        write_json(self.directory / "state.json", {"fingerprint": self.key,
                                                   "layers": self.names})
