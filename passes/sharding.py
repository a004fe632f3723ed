"""Tensors that may be FSDP shards (DTensors split along dim 0 across processes): what the
relaxed layers need to apply their per-weight terms to the rows a process holds."""
from __future__ import annotations

from torch import Tensor


def is_sharded(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def local(t) -> Tensor:
    """This process's shard of `t` (a plain tensor as it is)."""
    return t.to_local() if is_sharded(t) else t


def rows_held(full: Tensor, like) -> Tensor:
    """The rows of `full` held by this process's shard of `like` (FSDP2 shards dim 0 in
    chunks of ceil(rows / world); the last ones may be short or empty). `like` unsharded:
    `full` itself."""
    if not is_sharded(like):
        return full
    chunk = -(-like.shape[0] // like.device_mesh.size())
    start = like.device_mesh.get_local_rank() * chunk
    return full[start:start + like.to_local().shape[0]]
