"""Quantizing a model larger than memory, block by block from its safetensors shards.

`quantize_pretrained(src_dir, config, out_dir)` builds the model with its parameters on the meta
device, reads the parameters outside the decoder blocks (embeddings, final norm, head), and
runs the method through the shared block driver with a streaming source: each block's
parameters are read from the shards just before it is quantized and, once it is, its quantized
tensors are written to an output shard and the block goes back to the meta device. The
calibration activations live in memory-mapped files. Peak memory is about one block in full
precision, its Hessians, one block's activations and the layers outside the blocks, whatever
the model's size. Everything is written into `<out_dir>.partial/`, which becomes `out_dir` at
the end; a run stopped for any reason is continued by the same call (from the last finished
block, to the identical result) and never touches `out_dir` before it is complete.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from discq.hf import PLACEHOLDER, DiscqHfConfig
from discq.io import _collect, _swap_into_place, model_class
from discq.passes import quantize_
from discq.passes.block_source import CheckpointedBlocks, use_source, write_json
from discq.passes.capture import find_blocks
from discq.passes.experts import ExpertLinears, fill_stack, restack
from discq.passes.inspect import set_layer_config
from discq.passes.memory_plan import calibration_tokens, check_fits, plan_run
from discq.passes.prepare import planning_targets
from discq.passes.quantize import select_matrices
from discq.passes.registry import method_of

INDEX = "model.safetensors.index.json"
# what a model directory carries besides weights and config: copied as they are
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
          "generation_config.json", "chat_template.jinja")


class ShardReader:
    """The tensors of a safetensors checkpoint (one file or an index of shards), read one by
    one (safetensors maps the files, so nothing else is read into memory)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index, single = self.directory / INDEX, self.directory / "model.safetensors"
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self.files = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.directory} has neither {INDEX} nor model.safetensors;"
                                    f" streaming reads a transformers checkpoint in safetensors")
        self.handles: dict[str, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def close(self) -> None:
        """Unmap the files: their pages would otherwise count in the process's resident size."""
        self.handles.clear()

    def get(self, key: str) -> torch.Tensor:
        name = self.files[key]
        if name not in self.handles:
            self.handles[name] = safe_open(str(self.directory / name), framework="pt")
        return self.handles[name].get_tensor(key)


class ConvertedReader:
    """The tensors of a checkpoint under the names of the model built from its config:
    transformers renames keys and merges some as it loads (a mixture-of-experts checkpoint
    stores each expert's projections apart, `experts.3.w1.weight`, which the model holds as one
    stacked `experts.gate_up_proj`); its own conversion mapping is applied here, one tensor at
    a time, so a block's stacked experts are read without reading anything else."""

    def __init__(self, reader: ShardReader, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                     dot_natural_key, rename_source_key)
        self.reader, self.model, self.directory = reader, model, reader.directory
        mapping = get_model_conversion_mapping(model)
        renamings = [c for c in mapping if isinstance(c, WeightRenaming)]
        converters = [c for c in mapping if isinstance(c, WeightConverter)]
        self.converters = {p: c for c in converters for p in c.source_patterns}
        meta = model.state_dict()
        self.sources: dict[str, list[tuple[str, str | None]]] = {}
        for key in sorted(reader.files, key=dot_natural_key):  # experts in their order
            target, pattern = rename_source_key(key, renamings, converters,
                                                model.base_model_prefix, meta)
            if target not in meta and key in meta:
                target, pattern = key, None
            self.sources.setdefault(target, []).append((key, pattern))

    def __contains__(self, key: str) -> bool:
        return key in self.sources

    def close(self) -> None:
        self.reader.close()

    def get(self, key: str) -> torch.Tensor:
        from copy import deepcopy
        sources = self.sources[key]
        if sources[0][1] is None:  # as stored, or renamed
            return self.reader.get(sources[0][0])
        converter = deepcopy(self.converters[sources[0][1]])
        for name, pattern in sources:
            converter.add_tensor(key, name, pattern, lambda name=name: self.reader.get(name))
        out = converter.convert(key, model=self.model, config=self.model.config)
        v = out[key]
        return v[0] if isinstance(v, list) else v


def load_params(module: nn.Module, prefix: str, reader: ConvertedReader,
                dtype: torch.dtype | None, skip=None) -> None:
    """Fill `module`'s parameters and saved buffers from the checkpoint keys `prefix` + name
    (but those `skip(name)` selects). Expert stacks exploded into linears are read as the
    stacked tensors they are, and a Conv1D turned linear as its transposed weight."""
    stacks = {name: m for name, m in module.named_modules() if isinstance(m, ExpertLinears)}
    for name, stack in stacks.items():
        _load_stack(stack, prefix + name, reader, dtype)
    for key, t in module.state_dict(keep_vars=True).items():
        if (skip is not None and skip(key)) or any(key.startswith(n + ".") for n in stacks):
            continue
        full = prefix + key
        if full not in reader:
            continue  # tied to a key read elsewhere (the caller checks nothing stays on meta)
        v = reader.get(full)
        owner_name, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if getattr(owner, "discq_from_conv1d", False) and attr == "weight":
            v = v.t().contiguous()  # Conv1D stores [in, out]
        if tuple(v.shape) != tuple(t.shape):
            raise ValueError(f"{reader.directory}: {full} is {tuple(v.shape)} in the checkpoint "
                             f"but {tuple(t.shape)} in the model its config.json describes")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(v, requires_grad=False)
        else:
            owner._buffers[attr] = v


def _load_stack(stack: ExpertLinears, key: str, reader, dtype) -> None:
    """An exploded expert stack from the checkpoint's stacked tensor (and its bias)."""
    if key not in reader:
        raise ValueError(f"{reader.directory}: no tensor {key} (the experts of this layer)")
    W = reader.get(key)
    bias = reader.get(f"{key}_bias") if stack._original_bias is not None else None
    if dtype is not None:
        W, bias = W.to(dtype), bias.to(dtype) if bias is not None else None
    fill_stack(stack, W, bias)


def release(module: nn.Module) -> None:
    """Put `module`'s parameters back on the meta device (its memory is freed)."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and not p.is_meta:
                m._parameters[name] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
    trim_heap()


def trim_heap() -> None:
    """Hand freed heap memory back to the OS. glibc keeps what a block's many medium-sized
    allocations freed in its per-thread arenas; over a long stream that grows the process by
    a sizeable part of a block per block (measured: 2.7 GB at block 17 of a 2B model, against
    a flat 0.4 GB with this)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file, complete on disk before it gets its name (written, synced, renamed:
    the run's state may then say the block is done); its pages are dropped from the cache
    (under a memory limit, dirty cache of files written quickly is what runs out first)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class StreamedBlocks(CheckpointedBlocks):
    """The block driver's source for a streaming run: blocks read from `reader` before, written
    as output shards into the work directory after (see the module docstring)."""

    def __init__(self, reader: ShardReader, work: Path, settings: str, config_dict: dict,
                 blocks_fqn: str, n_blocks: int, dtype: torch.dtype | None):
        super().__init__(work, settings)
        self.reader, self.config_dict, self.dtype = reader, config_dict, dtype
        self.blocks_fqn, self.n_shards = blocks_fqn, n_blocks + 1

    def shard(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def load(self, i: int, block: nn.Module) -> None:
        load_params(block, f"{self.blocks_fqn}.{i}.", self.reader, self.dtype)
        self.reader.close()
        left = [k for k, t in block.state_dict(keep_vars=True).items() if t.is_meta]
        if left:
            raise ValueError(f"{self.reader.directory}: block {i} has no tensors {left[:3]} "
                             f"(under {self.blocks_fqn}.{i}.) in the checkpoint")

    def restore(self, i: int, block: nn.Module) -> None:
        pass  # its shard is written already

    def save_block(self, i: int, block: nn.Module) -> None:
        """Write block i's tensors (quantized ones as their parts) as one output shard."""
        for m in list(block.modules()):
            if any(isinstance(c, ExpertLinears) for c in m.children()):
                restack(m)  # written as the model holds it: one tensor per stack
        for m in block.modules():
            for name, p in m._parameters.items():
                if hasattr(p, "format_name"):
                    set_layer_config(m, name, self.config_dict)
        prefix = f"{self.blocks_fqn}.{i}."
        tensors, meta = _collect(block)
        tensors = {prefix + k: v for k, v in tensors.items()}
        layers = {prefix + k: spec for k, spec in meta["quantized"].items()}
        for name in layers:
            tensors[name] = PLACEHOLDER.clone()
        write_shard(tensors, self.directory / self.shard(i))
        write_json(self.directory / f"block-{i:05d}.json", {
            "layers": layers, "keys": sorted(tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "aliases": {prefix + k: prefix + v for k, v in meta["aliases"].items()}})
        release(block)


def quantize_pretrained(src_dir: str | os.PathLike, config, out_dir: str | os.PathLike, *,
                        filter_fn=None, quantize_head: bool = False,
                        dtype: torch.dtype | None = None, overwrite: bool = False,
                        metadata: dict | None = None) -> Path:
    """Quantize the transformers checkpoint in `src_dir` (safetensors, any size) with `config`
    (RTN, GPTQ, GPTVQ, QuIP#/QTIP without fine-tuning), block by block from disk, into the
    model directory `out_dir` (`discq.from_pretrained` / transformers load it). Every linear
    but the output head is quantized (`quantize_head=True`: it too; `filter_fn(module, fqn)`
    to choose). `dtype`: the precision blocks are computed in (default: as stored).
    Resumable: see the module docstring."""
    from discq.pipeline import keep_head_filter
    src, out = Path(src_dir), Path(out_dir)
    _check_call(config, out, overwrite, dtype)
    files = ShardReader(src)  # first: a directory without weights is told so
    model = skeleton(src)
    reader = ConvertedReader(files, model)
    blocks_fqn, blocks = find_blocks(model)
    chosen_by = filter_fn or (None if quantize_head else keep_head_filter(model))
    matrices = select_matrices(model, chosen_by)
    targets = [(mx.fqn, mx.module) for mx in matrices]
    chosen = {m for _, m in targets}
    tokens = calibration_tokens(getattr(config, "calibration", None))
    check_fits(plan_run(model, config, planning_targets(matrices), tokens=tokens, stream=True,
                        dtype=dtype), f"streaming {config.method} of {src}")  # before any read
    later = untouched_outside(model, blocks, chosen)
    load_outside(model, blocks_fqn, reader, dtype, later)
    settings = json.dumps({"config": config.to_json(), "source": str(src.resolve()),
                           "dtype": str(dtype)})
    source = StreamedBlocks(reader, out.parent / f"{out.name}.partial", settings,
                            config.to_dict(), blocks_fqn, len(blocks), dtype)
    if method_of(config).data_driven:
        with use_source(source):
            quantize_(model, config, filter_fn=lambda m, fqn: m in chosen)
    else:
        _data_free(model, config, targets, blocks, source)
    if dtype is not None:
        model.config.dtype = dtype
    for name in later:  # every block is written and released: now the fp head
        load_params(model.get_submodule(name), f"{name}.", reader, dtype)
    reader.close()
    check_loaded(model, reader, (blocks_fqn + ".",))
    finish(model, source, src, out, metadata)
    return out


def _check_call(config, out: Path, overwrite: bool, dtype) -> None:
    from discq.passes import QuantConfig
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be one discq config (e.g. gptq_config(...)), got "
                        f"{type(config).__name__}")
    # an end-to-end method (DiscQuant) is refused by the plan, which every run checks
    if getattr(config, "finetune", False):
        raise ValueError(f"{config.method}: fine-tuning end to end needs the whole model in "
                         f"memory; stream with finetune=False")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16) "
                        f"or None (as stored), got {dtype!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose a new out_dir or pass "
                              f"overwrite=True")


def skeleton(src: Path) -> nn.Module:
    """The model of `src`'s config.json with its parameters on meta (buffers real)."""
    from accelerate import init_empty_weights
    cls, hf_config = model_class(src)
    with init_empty_weights():
        return cls(hf_config).eval()


def load_outside(model: nn.Module, blocks_fqn: str, reader: ShardReader, dtype,
                 later: tuple[str, ...] = ()) -> None:
    """Read every tensor outside the blocks (embeddings, final norm, head) but those under
    the module names `later` (read by `finish`: a head kept in full precision is not needed
    while blocks are quantized); tie what the config ties; refuse a checkpoint that leaves
    any of them unread."""
    skip = (blocks_fqn + ".", *(f"{m}." for m in later))
    load_params(model, "", reader, dtype, skip=lambda k: k.startswith(skip))
    reader.close()
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    check_loaded(model, reader, skip)


def check_loaded(model: nn.Module, reader: ShardReader, skip: tuple[str, ...]) -> None:
    """Refuse a checkpoint that left tensors (but those under `skip`) on the meta device."""
    left = [k for k, t in model.state_dict(keep_vars=True).items()
            if t.is_meta and not k.startswith(skip)]
    if left:
        raise ValueError(f"{reader.directory}: the checkpoint has no tensors {left[:3]}; is it "
                         f"the model its config.json describes?")


def untouched_outside(model: nn.Module, blocks, chosen: set) -> tuple[str, ...]:
    """Names of the linears outside the blocks that are not quantized (an fp head)."""
    inside = {m for b in blocks for m in b.modules()}
    return tuple(fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)
                 and m not in inside and m not in chosen)


def _data_free(model, config, targets, blocks, source: StreamedBlocks) -> None:
    """A data-free method (RTN), block by block: read, quantize, write, release."""
    with use_source(source):  # quantize_ then knows the run is planned block by block
        _data_free_blocks(model, config, targets, blocks, source)


def _data_free_blocks(model, config, targets, blocks, source: StreamedBlocks) -> None:
    from tqdm.auto import tqdm
    chosen = {m for _, m in targets}
    source.begin(model, blocks, [], targets)
    with tqdm(desc=config.method, unit="block", initial=source.finished,
              total=len(blocks)) as bar:
        for i in range(source.finished, len(blocks)):
            source.load(i, blocks[i])
            inside = chosen & set(blocks[i].modules())
            if inside:
                quantize_(model, config, filter_fn=lambda m, fqn: m in inside)
            source.done(i, blocks[i], None, None)
            bar.update(1)
    rest = chosen - {m for b in blocks for m in b.modules()}
    if rest:
        quantize_(model, config, filter_fn=lambda m, fqn: m in rest)
    source.end()


def finish(model: nn.Module, source: StreamedBlocks, src: Path, out: Path,
           metadata: dict | None) -> None:
    """Write the tensors outside the blocks, config.json with discq's quantization_config, the
    shard index and the tokenizer files; then the work directory becomes `out`."""
    work, prefix = source.directory, source.blocks_fqn + "."
    tensors, meta = _collect(model, skip=lambda k: k.startswith(prefix))
    layers, aliases = dict(meta["quantized"]), dict(meta["aliases"])
    for name in layers:
        tensors[name] = PLACEHOLDER.clone()
    last = source.shard(source.n_shards - 1)
    write_shard(tensors, work / last)
    weight_map = {k: last for k in tensors}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for i in range(source.n_shards - 1):
        block = json.loads((work / f"block-{i:05d}.json").read_text())
        layers.update(block["layers"])
        aliases.update(block["aliases"])
        weight_map.update({k: source.shard(i) for k in block["keys"]})
        total += block["bytes"]
    plain = sorted(fqn for fqn, m in model.named_modules()
                   if isinstance(m, nn.Linear) and f"{fqn}.weight" not in layers)
    model.config.quantization_config = DiscqHfConfig(
        layers=layers, aliases=aliases, modules_not_converted=plain, metadata=metadata or {})
    model.config.save_pretrained(work)
    write_json(work / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for name in COPIED:
        if (src / name).is_file():
            shutil.copy2(src / name, work / name)
    _drop_run_files(work)
    # an older model in `out` (overwrite=True) must not leave weights beside the new index
    _swap_into_place(work, out, carry=lambda name: not name.startswith(("model", "discq.json")))


def _drop_run_files(work: Path) -> None:
    """What only the run needed: its state, block records, restored layers, activations."""
    for p in work.iterdir():
        if p.name.startswith(("block-", "rest-", "carried-", "hidden-", "state.json")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
