"""A lean decode loop: one compiled token step over a static KV cache.

    ids = discq.generate(model, prompt_ids, max_new_tokens=64)              # greedy
    ids = discq.generate(model, prompt_ids, 64, temperature=0.8, top_k=40, seed=0)

Per token, Python does only the loop: the step (embedding, every layer, the cache update, the
head for the last position and the choice of the next token) is one compiled program; the
prompt goes through a second compiled program with a dynamic length. Both are compiled once per
model and cache size and kept on the model, so later calls start at full speed. A model whose
cache cannot be static (`_can_compile_fullgraph` false, e.g. a sliding or recurrent cache) falls
back to transformers' `generate`, with a warning saying so.

The programs run views of the model (`discq.inference.plain_linears`: every tensor shared,
quantized linears calling their op on plain tensors), so the compiled code guards plain tensors
only; linears that read the same input (q/k/v, gate/up) run as one call (`discq.siblings`); the
token step's view computes attention in plain ops, cheaper than the SDPA kernel for one query
row.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from discq.graph_call import GraphCall
from discq.inference import plain_linears, shared_copy
from discq.siblings import fuse_siblings
from discq.tensors.base import QuantizedTensor

_ATTR = "_discq_decoder"


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when `temperature` is 0, else sampled from the
    softmax of logits / temperature over the `top_k` most likely tokens (all when None)."""
    temperature: float = 0.0
    top_k: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")


def pick(logits: Tensor, sampling: Sampling, u: Tensor | None) -> Tensor:
    """Next token ids [B, 1] from logits [B, V]; `u` uniform(0, 1) [B, V] when sampling (the
    Gumbel-max trick: argmax of logits/T + Gumbel noise is a sample of softmax(logits/T))."""
    if sampling.temperature == 0:
        return logits.argmax(-1, keepdim=True)
    z = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < z.shape[-1]:
        kth = z.topk(sampling.top_k, dim=-1).values[:, -1:]  # [B, 1]
        z = z.masked_fill(z < kth, float("-inf"))
    return (z - torch.log(-torch.log(u))).argmax(-1, keepdim=True)


def supports_static_cache(model: nn.Module) -> bool:
    """Whether the model decodes with transformers' StaticCache under one compiled graph."""
    return bool(getattr(model, "_can_compile_fullgraph", False)) and hasattr(model, "config")


def sliding_limit(model: nn.Module) -> float:
    """How many positions (prompt and new tokens) the compiled step can decode: a sliding-window
    layer's cache keeps its fill level in a Python int that a replayed graph never updates, so
    such layers are decoded as full attention, which is the same function while the whole
    sequence fits in the window (Mistral, Gemma 2/3, gpt-oss); longer ones fall back."""
    config = model.config.get_text_config(decoder=True) if hasattr(model, "config") else None
    windows = [getattr(config, name, None) for name in ("sliding_window", "attention_chunk_size")]
    windows = [w for w in windows if isinstance(w, int) and w > 0]
    return min(windows) if windows else float("inf")


def _unslid(cache, max_cache_len: int):
    """The cache with every sliding-window layer replaced by a full static layer of
    `max_cache_len` positions (see `sliding_limit`)."""
    from transformers.cache_utils import STATIC_LAYER_TYPE_MAPPING
    full = STATIC_LAYER_TYPE_MAPPING["full_attention"]
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False) or hasattr(layer, "sliding_window"):
            cache.layers[i] = full(max_cache_len=max_cache_len)
    return cache


def compile_apart(fn, name: str, options: dict | None = None, backend="inductor"):
    """torch.compile(fullgraph) of `fn` through a wrapper with its own code object: Dynamo keys
    compiled graphs by code object, so programs compiled from one shared code object (every
    module's forward) would chain their guards and each call would check the others'. Here the
    prefill and the step, and different models, never see each other's."""
    ns = {"fn": fn}
    exec(compile("def call(*args):\n    return fn(*args)\n", f"<discq {name}>", "exec"), ns)
    return torch.compile(ns["call"], fullgraph=True, options=options, backend=backend)


def _arguments_only(entries: list) -> list[bool]:
    """Dynamo guard filter: keep the guards on the compiled call's arguments (`args...`) and on
    the global state (grad mode, shape relations: named ""), drop those reached through globals."""
    return [e.name == "" or e.name.startswith("args") for e in entries]


class Decoder:
    """The compiled prefill and token step of one model over one static cache of
    `max_cache_len` positions for `batch` sequences."""

    def __init__(self, model: nn.Module, batch: int, max_cache_len: int, sampling: Sampling,
                 cpp_wrapper: bool = True, int8_activations: bool = False):
        from transformers import StaticCache
        self.sampling, self.cpp_wrapper = sampling, cpp_wrapper
        self.int8_activations = int8_activations
        self.weights = _weights_key(model)
        self.batch, self.max_cache_len = batch, max_cache_len
        self.cache = _unslid(StaticCache(config=model.config, max_cache_len=max_cache_len),
                             max_cache_len)
        device = next(model.parameters()).device
        # the prefill's view; an eager step on a dummy token allocates the cache outside the
        # compiled programs and shows which linears read the same input (discq.siblings)
        self.model = plain_linears(model, (model.__dict__.get(_ATTR),), int8_activations)
        dummy = torch.zeros(batch, 1, dtype=torch.long, device=device)
        fuse_siblings(self.model, lambda view: view(input_ids=dummy, cache=self.cache,
                                                    use_cache=True, logits_to_keep=1))
        self.cache.reset()
        self.step_model = _one_query_attention(shared_copy(self.model))
        # the prefill guards only its own arguments (the prompt's shape and dtype, the noise) and
        # the global state: the ~10,000 guards on the model, its config and the cache cost ~2.5 ms
        # a call on SmolLM2, and all of those are this decoder's own, checked by `fits`
        self.prefill = compile_apart(functools.partial(self._next, self.model), "prefill",
                                     {"guard_filter_fn": _arguments_only})
        # the step in C++ end to end (Inductor's C++ wrapper): the Python wrapper's per-kernel
        # calls cost ~5 ms a token on SmolLM2; the prefill runs once per call and stays Python
        # (its C++ build with a dynamic length takes minutes)
        # no guards at all on the step, and Dynamo itself skipped after its first call
        # (discq.graph_call; Dynamo's guards on every tensor of the model cost ~1.5 ms a token
        # on SmolLM2, fetching those tensors ~0.6 ms): its inputs have fixed shapes, it runs a
        # view made here, and `fits` rebuilds the decoder when the model's weights are replaced
        # (their values are read on every call)
        self.step = GraphCall(functools.partial(self._next, self.step_model), "step",
                              {"cpp_wrapper": cpp_wrapper})

    def __deepcopy__(self, memo: dict) -> None:
        # a copy of the model gets no decoder: these programs read the original's tensors (the
        # copy compiles its own on its first generate)
        return None

    def _next(self, model: nn.Module, ids: Tensor, u: Tensor | None) -> Tensor:
        """ids: [B, L] appended to the cache -> the next token ids [B, 1]."""
        out = model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        return pick(out.logits[:, -1], self.sampling, u)

    def fits(self, model: nn.Module, batch: int, length: int, sampling: Sampling, device,
             cpp_wrapper: bool, int8_activations: bool) -> bool:
        return (cpp_wrapper == self.cpp_wrapper and batch == self.batch
                and int8_activations == self.int8_activations
                and length <= self.max_cache_len and sampling == self.sampling
                and self.cache.layers[0].keys.device == device
                and self.weights == _weights_key(model))

    def run(self, ids: Tensor, max_new_tokens: int, eos: set[int], generator) -> Tensor:
        """ids: [B, S] -> [B, S + T] with T <= max_new_tokens (fewer when every row ended)."""
        self.cache.reset()
        B = ids.shape[0]
        noise = self._noise(generator, ids)
        torch._dynamo.maybe_mark_dynamic(ids, 1)  # one prefill program for every prompt length
        tok = self.prefill(ids, noise())
        out, done = [tok], torch.zeros(B, dtype=torch.bool, device=ids.device)
        with _no_gc():  # a collection of every Python object mid-decode stalls a token
            self._loop(tok, out, done, max_new_tokens, eos, noise)
        return torch.cat([ids, *out], dim=1)

    def _loop(self, tok: Tensor, out: list, done: Tensor, max_new_tokens: int, eos: set[int],
              noise) -> None:
        for _ in range(max_new_tokens - 1):
            if eos:
                done |= _is_eos(tok[:, 0], eos)
                if bool(done.all()):
                    break
            tok = self._step(tok, noise())
            # a row that has ended repeats its end token (the model's output there is unused)
            out.append(torch.where(done[:, None], out[-1], tok) if eos else tok)

    def _step(self, tok: Tensor, u: Tensor | None) -> Tensor:
        """One token: the compiled step (no guards, see __init__)."""
        return self.step(tok, u)

    def _noise(self, generator, ids: Tensor):
        """A function giving each step's uniform noise [B, V] (None when greedy)."""
        if self.sampling.temperature == 0:
            return lambda: None
        V = self.model.get_output_embeddings().out_features
        shape = (ids.shape[0], V)
        # uniform in (0, 1): log(-log(u)) must stay finite
        return lambda: torch.rand(shape, generator=generator, device=ids.device).clamp_(
            1e-20, 1 - 1e-7)


@contextlib.contextmanager
def _no_gc():
    """Python's cyclic garbage collector off (as it was, after): a full collection walks every
    object of torch, transformers and the model, milliseconds at a random token."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _one_query_attention(view: nn.Module) -> nn.Module:
    """The token step's view computes attention in plain ops (a query row against the cache: two
    small matmuls and a softmax that Inductor fuses), not the SDPA kernel, whose fixed cost per
    call (~30 µs a layer on 2 cores) is most of the work for one query. Models without
    transformers' switch keep theirs."""
    try:
        view.set_attn_implementation("eager")
    except (AttributeError, ValueError, NotImplementedError):
        pass
    return view


def _weights_key(model: nn.Module) -> tuple:
    """Which tensors the model computes with: a weight replaced (quantized, moved, cast) or a
    module swapped changes it."""
    return tuple((id(t), t.dtype, t.device) for t in (*model.parameters(), *model.buffers()))


def _is_eos(tok: Tensor, eos: set[int]) -> Tensor:
    return torch.isin(tok, torch.tensor(sorted(eos), device=tok.device))


def generate(model: nn.Module, ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, eos_token_id: int | list[int] | None = -1,
             seed: int | None = None, max_cache_len: int | None = None,
             cpp_wrapper: bool | None = None, int8_activations: bool = False) -> Tensor:
    """Continue `ids` [B, S] (token ids, every row a full prompt of S tokens) by up to
    `max_new_tokens` tokens: [B, S + T]. Greedy by default; `temperature` > 0 samples (from the
    `top_k` most likely tokens when given; `seed` makes it repeatable). Stops early once every
    row has produced an end token (`eos_token_id`; -1, the default, takes the model's generation
    config, None never stops early). The cache holds `max_cache_len` positions (default: the
    smallest power of two, at least 64, at or above S + max_new_tokens: the step attends to
    every cached position, so a short generation reads a short cache); the compiled programs
    are kept on the model and reused while batch, sampling and cache size fit. `cpp_wrapper`
    compiles the token step's program to C++ end to end (Inductor's C++ wrapper): ~2 ms a token
    faster on SmolLM2, but its first compile takes minutes on 2 cores (then cached on disk);
    None (default) uses it unless a weight's format says it does not pay (QTIP, QuIP#: their
    ~30 ms steps compiled for 10–16 minutes with it, 2 without, at the same speed).
    `int8_activations` rounds each quantized linear's input to 8 bits per block of 32 and
    multiplies in integers (`discq.inference.plain_linears`): faster on CPU; `discq eval
    --int8-activations` measures what it costs in perplexity."""
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        raise TypeError(f"ids must be a [batch, length] LongTensor of token ids, got "
                        f"{getattr(ids, 'shape', type(ids))}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    sampling = Sampling(float(temperature), top_k)
    if cpp_wrapper is None:
        cpp_wrapper = all(type(p).cpp_wrapper for p in model.parameters()
                          if isinstance(p, QuantizedTensor))
    need = ids.shape[1] + max_new_tokens
    if max_cache_len is not None and max_cache_len < need:
        raise ValueError(f"max_cache_len={max_cache_len} is below prompt + new tokens ({need})")
    eos = _eos_ids(model, eos_token_id)
    generator = None
    if seed is not None:
        generator = torch.Generator(ids.device).manual_seed(seed)
    if not supports_static_cache(model) or need > sliding_limit(model):
        return _fallback(model, ids, max_new_tokens, sampling, eos, generator, int8_activations)
    with torch.no_grad():
        decoder = getattr(model, _ATTR, None)
        if decoder is None or not decoder.fits(model, ids.shape[0], need, sampling, ids.device,
                                               cpp_wrapper, int8_activations) or (
                max_cache_len is not None and decoder.max_cache_len != max_cache_len):
            size = max_cache_len or max(64, 1 << (need - 1).bit_length())
            decoder = Decoder(model, ids.shape[0], size, sampling, cpp_wrapper, int8_activations)
            model.__dict__[_ATTR] = decoder  # not a submodule: never saved or moved
        return decoder.run(ids, max_new_tokens, eos, generator)


def _eos_ids(model: nn.Module, eos_token_id) -> set[int]:
    if eos_token_id == -1:
        cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(cfg, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(e) for e in ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)}


def _fallback(model, ids, max_new_tokens, sampling: Sampling, eos: set[int], generator,
              int8_activations: bool = False):
    """transformers' own generate, for caches that cannot be static."""
    why = (f"{ids.shape[1] + max_new_tokens} positions exceed its sliding window "
           f"({sliding_limit(model)}), which the compiled step decodes as full attention"
           if supports_static_cache(model) else
           "it does not decode with a static cache under one compiled graph")
    warnings.warn(f"discq.generate: {type(model).__name__}: {why}; using transformers' "
                  "generate (slower" + (", float activations)" if int8_activations else ")"),
                  stacklevel=3)
    if generator is not None:
        torch.manual_seed(int(torch.randint(2**31, (), generator=generator)))
    kw = {"do_sample": sampling.temperature > 0}
    if kw["do_sample"]:
        kw.update(temperature=sampling.temperature, top_k=sampling.top_k or 0)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos) or None,
                              attention_mask=torch.ones_like(ids), **kw)
