"""Runs DiscQuant inside `quantize_`: swaps the target linears for RelaxedLinear, fits with a
Lightning Trainer (resuming from `checkpoint_dir/last.ckpt` when present), rounds, and installs
the packed weights. No weight is replaced before the fit has finished: on any failure or
interruption the original linears, parameter flags and train/eval mode are put back."""
from __future__ import annotations

import contextlib
from pathlib import Path

import lightning as L
import torch
from discq.passes.calibration import as_batches
from discq.passes.disc_init import STARTS
from discq.passes.disc import RELAXATIONS, DiscConfig, RelaxedLinear, mean_noise
from discq.passes.quantize import check_finite, install_weight
from discq.passes.sharding import is_sharded
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data import CalibrationDataModule
from .disc_best import held_out_count
from .disc_module import DiscQuantModule
from .fsdp import unshard
from .trainer import build_trainer, fit


def _swap(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _relax(model: nn.Module, targets, config: DiscConfig, starts: dict | None = None
           ) -> list[RelaxedLinear]:
    """Replace each target linear by a RelaxedLinear around it (in place, no weight copied);
    `starts`: each target's start from another method (discq.passes.disc_init)."""
    g = torch.Generator().manual_seed(config.seed)
    layers = []
    for fqn, lin in targets:  # (weights checked finite by disc_quantize, before any work)
        extra = {"start": starts.pop(fqn)} if starts else {}  # popped: freed once relaxed
        layers.append(RELAXATIONS[config.codebook].relax(lin, config, fqn, g, **extra))
        _swap(model, fqn, layers[-1])
    return layers


def decoder_blocks(model: nn.Module, layers: list[RelaxedLinear]) -> list[nn.Module]:
    """The longest nn.ModuleList whose every entry holds relaxed linears (a transformer's
    decoder layers): the units of activation checkpointing."""
    relaxed = {id(l) for l in layers}
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and all(
                any(id(s) in relaxed for s in block.modules()) for block in m):
            best = list(m)
    return best


class _Checkpointed:
    """A block's forward run under non-reentrant activation checkpointing (a class, not a
    lambda, so the model stays picklable for spawned DDP processes)."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def checkpointed(blocks: list[nn.Module], enable: bool = True):
    """Activation checkpointing per block (torch.utils.checkpoint, non-reentrant so gradients
    reach x inside the blocks). Our own wrapper rather than transformers'
    gradient_checkpointing_enable: that one only acts in train mode, and DiscQuant runs the
    model in eval mode (dropout would make teacher and student random); it also leaves an
    input-grad hook behind. Each block's forward is restored on exit."""
    patched = []
    try:
        for block in blocks if enable else []:
            block.forward = _Checkpointed(block.forward)
            patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward  # the instance attribute: the class's forward is back


@contextlib.contextmanager
def compiled(blocks: list[nn.Module], enable: bool = True):
    """Each block's forward (and so its backward) through `torch.compile`; the blocks are
    alike, so they share one compilation (their parameters are its inputs; integer attributes
    such as transformers' `layer_idx` are not specialized, else each block would compile
    again: 4x the compile time on 10 layers). Undone on exit."""
    try:
        for block in blocks if enable else []:
            block.compile(dynamic=False)
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            yield
    finally:
        for block in blocks if enable else []:
            block._compiled_call_impl = None


def _precision(kwargs: dict) -> str:
    """bf16-mixed where the device computes bf16 natively (recent CUDA GPUs, CPUs with
    AVX512-BF16/AMX), else fp32."""
    accel = str(kwargs.get("accelerator", "auto"))
    if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def _trainer(config: DiscConfig) -> L.Trainer:
    # a checkpoint at most every 50 steps, and at least four in a run
    return build_trainer(config.trainer_kwargs, max_steps=config.steps, accelerator="auto",
                         precision=_precision(config.trainer_kwargs or {}),
                         checkpoint_dir=config.checkpoint_dir,
                         checkpoint_every=min(50, max(1, config.steps // 4)), keep_top=1,
                         title=f"DiscQuant {config.gguf or f'{config.bits}-bit'}")


def _fit(model: nn.Module, layers: list[RelaxedLinear], config: DiscConfig, batches) -> None:
    blocks = decoder_blocks(model, layers)
    module = DiscQuantModule(model, layers, config, mean_noise(layers), units=blocks)
    trainer = _trainer(config)
    # held-out sequences only where the best point is scored (one process: see disc_module)
    scored = config.keep_best and trainer.world_size == 1
    held = held_out_count(sum(len(b) for b in batches)) if scored else 0
    data = CalibrationDataModule(batches, config.steps, config.batch_size, config.seed, held)
    ckpt = Path(config.checkpoint_dir) / "last.ckpt" if config.checkpoint_dir else None
    try:
        with checkpointed(blocks, _checkpointing(model, config, data.sequences.shape[1])), \
                compiled(blocks, config.compile_step):
            fit(trainer, module, datamodule=data,
                ckpt_path=str(ckpt) if ckpt and ckpt.is_file() else None)
    finally:  # sharded by the FSDP strategy: whole again, as the caller gave it
        if any(is_sharded(p) for p in model.parameters()):
            unshard(model)


# activations a step may keep for its backward pass before blocks are recomputed instead
ACTIVATION_BYTES = 2**30


def _checkpointing(model: nn.Module, config: DiscConfig, seq_len: int) -> bool:
    """config.gradient_checkpointing, or (None) whether a step's activations would exceed
    ACTIVATION_BYTES: per token and decoder layer about 16 hidden-width and 4 MLP-width fp32
    values (norm inputs, q/k/v/o, attention output, residuals; gate, up, act, product)."""
    if config.gradient_checkpointing is not None:
        return config.gradient_checkpointing
    config_of = getattr(getattr(model, "config", None), "get_text_config", None)
    c = config_of(decoder=True) if config_of else None
    D, L = getattr(c, "hidden_size", None), getattr(c, "num_hidden_layers", None)
    if not (isinstance(D, int) and isinstance(L, int)):  # not a transformers model: recompute
        return True
    inner = getattr(c, "intermediate_size", None) or 4 * D
    per_token = L * (16 * D + 4 * inner) * 4
    return config.batch_size * seq_len * per_token > ACTIVATION_BYTES


@contextlib.contextmanager
def _frozen_eval(model: nn.Module):
    """Eval mode and no gradients for the model's own parameters during the fit (only the
    relaxation variables are trained); both restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.requires_grad_(False).eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def disc_quantize(model: nn.Module, config: DiscConfig, targets) -> None:
    """DiscQuant of `targets` (the handler registered in passes/disc.py calls this)."""
    batches = as_batches(config.calibration, model)
    layers: list[RelaxedLinear] = []
    with _frozen_eval(model):
        for fqn, lin in targets:  # refuse NaN weights before any work, naming the layer
            check_finite(lin.weight, fqn)
        starts = STARTS[config.init](model, config, targets, batches) \
            if config.init in STARTS else None
        try:
            layers = _relax(model, targets, config, starts)
            _fit(model, layers, config, batches)
            rounded = [l.rounded() for l in layers]
        finally:
            for (fqn, lin), _ in zip(targets, layers):
                _swap(model, fqn, lin)
    for (_, lin), q in zip(targets, rounded):
        install_weight(lin, q)
