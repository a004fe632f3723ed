"""DiscQuant sharded across processes: FSDP2 (`fully_shard`) through Lightning's
`ModelParallelStrategy`, on CPU (gloo) as on GPU.

`trainer_kwargs=dict(strategy="fsdp", devices=2)` (or `strategy=fsdp_strategy()`): every decoder
block, then the rest of the model, is sharded across the processes, so each holds 1/world of the
teacher weights, of the variables x, of their gradients and of AdamW's moments (the codes, scales
and pull of each relaxed layer stay whole: they are buffers). A block's weights are gathered for
its forward and freed after. Ranks see disjoint batches (as with DDP), so two processes with
`batch_size=b` take the steps one process takes with `2b`. Lightning's own "fsdp" strategy wants
a GPU; this one does not. Checkpoints hold the whole x and optimizer state (gathered), so a run
resumes on any number of processes. After the fit the model is put back as it was: every
parameter whole, no FSDP hooks.
"""
from __future__ import annotations

import lightning as L
import torch
from discq.passes.sharding import is_sharded, local, rows_held
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn


def whole(t):
    """The whole tensor of a shard (a collective: every rank calls it), else `t`."""
    return t.full_tensor() if is_sharded(t) else t


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as pure data-parallel FSDP2 over every process, with
    checkpoints of the LightningModule's own (gathered) state in one file."""

    strategy_name = "discq_fsdp"

    def __init__(self, **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # all processes shard one model
            self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict:
        return {k: whole(v) for k, v in self.lightning_module.state_dict().items()}

    def optimizer_state(self, optimizer) -> dict:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        state = optimizer.state_dict()
        state["state"] = {i: {k: whole(v) for k, v in s.items()}
                          for i, s in state["state"].items()}
        return state

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        checkpoint = self.checkpoint_io.load_checkpoint(checkpoint_path, weights_only=False)
        self.lightning_module.load_state_dict(checkpoint["state_dict"])
        for opt, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            load_sharded_optimizer(getattr(opt, "_optimizer", opt), state)
        return checkpoint


def load_sharded_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict` of a gathered state: each moment cut to its parameter's
    shard (torch's own loader would keep them whole)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.dim() and not is_sharded(v):
                    from torch.distributed.tensor import DTensor
                    optimizer.state[p][k] = DTensor.from_local(
                        rows_held(v, p).to(p.to_local().dtype).clone(), p.device_mesh,
                        p.placements, shape=p.shape, stride=p.stride())


def fsdp_strategy(**kwargs) -> ShardedStrategy:
    """The strategy for `trainer_kwargs=dict(strategy=fsdp_strategy(), devices=N)`."""
    return ShardedStrategy(**kwargs)


def shard(model: nn.Module, units: list[nn.Module], mesh) -> None:
    """FSDP2 over `mesh`: each unit (a decoder block) sharded on its own, then the root."""
    from torch.distributed.fsdp import fully_shard
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


def unshard(model: nn.Module) -> None:
    """Undo `shard` (every rank calls it): whole parameters back, FSDP's hooks removed and
    each module's own class restored, so the model is what it was before the fit."""
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if is_sharded(p):
                m._parameters[name] = nn.Parameter(whole(p.detach()),
                                                   requires_grad=p.requires_grad)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()
            for handle in (state._pre_forward_hook_handle, state._post_forward_hook_handle):
                handle.remove()
            _module_state_mapping.pop(m, None)  # nor its state (it holds the shards)
            # fully_shard made the class FSDP<cls>(FSDPModule, cls): back to cls
            m.__class__ = next(c for c in type(m).__mro__[1:]
                               if not issubclass(c, FSDPModule))


class ShardBytes(L.Callback):
    """At the end of a fit, `out` = this process's bytes of the module's parameters (its FSDP
    shards, or whole tensors) and of the optimizer's state: what sharding divides."""

    out: dict | None = None

    def on_train_end(self, trainer, module) -> None:
        opt = trainer.optimizers[0]
        model = getattr(module, "model", module)
        self.out = dict(
            params=sum(local(p).numel() * p.element_size() for p in model.parameters()),
            optimizer=sum(local(v).numel() * v.element_size() for s in opt.state.values()
                          for v in s.values() if torch.is_tensor(v) and v.dim()))
