"""Runs DiscQuant inside `quantize_`: swaps the target linears for RelaxedLinear, fits with a
Lightning Trainer (resuming from `checkpoint_dir/last.ckpt` when present), rounds, and installs
the packed weights. On any failure the original linears are put back untouched."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import nn

from discq.passes.calibration import as_batches
from discq.passes.disc import DiscConfig, RelaxedLinear, mean_noise
from discq.passes.quantize import check_finite, install_weight
from discq.passes.registry import register_model_handler
from discq.passes.rtn import layer_seed
from discq.tensors.incoherent import rotation

from .data import CalibrationDataModule, as_sequences
from .disc_module import DiscQuantModule


def _swap(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _relax(model, targets, config: DiscConfig) -> list[RelaxedLinear]:
    g = torch.Generator().manual_seed(config.seed)
    layers = []
    for fqn, lin in targets:
        check_finite(lin.weight, fqn)
        layers.append(RelaxedLinear(lin, config.grid(), g, config.init,
                                    _rotation(lin, fqn) if config.incoherence else None))
        _swap(model, fqn, layers[-1])
    return layers


def _rotation(lin: nn.Linear, fqn: str) -> tuple:
    """The same seeded rotations RTN and GPTQ use for this layer: (s_in, s_out, q_in, q_out)."""
    seed = layer_seed(fqn)
    s_in, q_in = rotation(lin.in_features, seed)
    s_out, q_out = rotation(lin.out_features, seed + 7919)
    return s_in, s_out, q_in, q_out


def _trainer(config: DiscConfig) -> L.Trainer:
    kw = dict(max_steps=config.steps, accelerator="auto", devices=1, logger=False,
              enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
              deterministic=False, precision="32-true")
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        kw["precision"] = "bf16-mixed"
    if config.checkpoint_dir:
        from lightning.pytorch.callbacks import ModelCheckpoint
        kw["enable_checkpointing"] = True
        kw["callbacks"] = [ModelCheckpoint(dirpath=config.checkpoint_dir, save_last=True,
                                           every_n_train_steps=max(1, min(50, config.steps // 4)),
                                           save_top_k=1, enable_version_counter=False)]
    extra = dict(config.trainer_kwargs or {})
    kw["callbacks"] = kw.get("callbacks", []) + list(extra.pop("callbacks", []))  # both kept
    kw.update(extra)
    return L.Trainer(**kw)


def _fit(model, layers, config: DiscConfig, batches) -> None:
    noise = mean_noise(layers)
    module = DiscQuantModule(model, layers, config, as_sequences(batches), noise)
    ckpt = Path(config.checkpoint_dir) / "last.ckpt" if config.checkpoint_dir else None
    with warnings.catch_warnings():
        for noise in (".*does not have many workers.*", ".*GPU available but not used.*",
                      ".*module\\(s\\) in eval mode.*", ".*deprecated.*"):
            warnings.filterwarnings("ignore", noise)  # eval mode is deliberate: no dropout
        _checkpointing(model, config.gradient_checkpointing)
        _trainer(config).fit(module, datamodule=CalibrationDataModule(config.steps),
                             ckpt_path=str(ckpt) if ckpt and ckpt.is_file() else None)


def _checkpointing(model: nn.Module, enable: bool) -> None:
    """Activation checkpointing of the decoder layers (transformers models), non-reentrant so
    gradients reach the relaxation variables inside the checkpointed layers."""
    if not enable or not hasattr(model, "gradient_checkpointing_enable"):
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@register_model_handler(DiscConfig)
def _disc_model(model: nn.Module, config: DiscConfig, targets) -> None:
    batches = as_batches(config.calibration, model)
    was_training = model.training
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    layers = []
    try:
        layers = _relax(model, targets, config)
        _fit(model, layers, config, batches)
        rounded = [l.rounded() for l in layers]
    finally:
        for (fqn, lin), _ in zip(targets, layers):
            _swap(model, fqn, lin)
        if hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
        model.train(was_training)
    for (_, lin), q in zip(targets, rounded):
        install_weight(lin, q)
