"""What fine-tuning may change in a quantized model, and the original model as a teacher.

Codes never change. What stays continuous is tuned: the sign vectors of rotated quantized
weights (s_in/s_out of lattice, trellis and incoherent weights, stored as fp16 and trained as
fp32 parameters) and a trellis code's table (HYB's lut, tuned with the signs), the weights and
biases of normalization layers, linear biases (an expert layer's too), and optionally the
output head when it is not quantized.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from discq.passes.experts import is_experts
from discq.tensors.base import QuantizedTensor
from torch import Tensor, nn
from torch.func import functional_call

SIGN_NAMES = ("s_in", "s_out")


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the model-specific norms (LlamaRMSNorm, ...)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(
        ("RMSNorm", "LayerNorm"))


class Tunables:
    """The continuous parameters of `module`. Entering the context replaces every quantized
    weight's sign vectors (and code table, if it has one) by fp32 `nn.Parameter`s (`signs`);
    leaving writes them back in their stored dtype. `other` holds norms, biases and the head
    (`head`, if given and not quantized); these are the module's own parameters, tuned in
    place."""

    def __init__(self, module: nn.Module, head: nn.Module | None = None, norms: bool = True):
        self.module = module
        self.owners = [m.weight for m in module.modules() if isinstance(m, nn.Linear)
                       and isinstance(m.weight, QuantizedTensor)
                       and all(getattr(m.weight, n, None) is not None for n in SIGN_NAMES)]
        seen: set[int] = set()
        self.other = [p for p in self._others(module, head, norms)
                      if id(p) not in seen and not seen.add(id(p))]
        self.signs: list[nn.Parameter] = []
        self._dtypes: list[torch.dtype] = []

    @staticmethod
    def _names(w: QuantizedTensor) -> list[str]:
        """The sign vectors, and the code tables a format offers (`tunable_tables`: HYB's),
        tuned at the sign vectors' rate."""
        tables = w.tunable_tables() if hasattr(w, "tunable_tables") else []
        return list(SIGN_NAMES) + tables

    @staticmethod
    def _others(module: nn.Module, head: nn.Module | None, norms: bool) -> Iterable[nn.Parameter]:
        for m in module.modules():
            if norms and is_norm(m):
                yield from (p for p in m.parameters(recurse=False) if p is not None)
            if isinstance(m, nn.Linear) and m.bias is not None:
                yield m.bias
            if is_experts(m):  # a stacked expert layer's biases, one row per expert
                yield from (p for n, p in m._parameters.items()
                            if p is not None and n.endswith("_bias"))
        if head is not None and not isinstance(head.weight, QuantizedTensor):
            yield head.weight

    def __enter__(self) -> Tunables:
        self.signs, self._dtypes = [], []
        for w in self.owners:
            for name in self._names(w):
                s = getattr(w, name)
                self._dtypes.append(s.dtype)
                p = nn.Parameter(s.detach().float().clone())
                setattr(w, name, p)
                self.signs.append(p)
        return self

    @torch.no_grad()
    def bind(self) -> None:
        """Set the sign Parameters on their weights again. Needed after `model.to(...)`
        (Lightning moves the model at fit start): nn.Module._apply rebuilds tensor-subclass
        weights through detach(), which leaves plain copies of s_in/s_out in place of the
        Parameters, and training would then never move them. `.data` is replaced, not the
        Parameter, so an optimizer holding them stays valid."""
        it = iter(self.signs)
        for w in self.owners:
            for name in self._names(w):
                p, current = next(it), getattr(w, name)
                if p.device != current.device:
                    p.data = p.data.to(current.device)
                setattr(w, name, p)

    def __exit__(self, *exc) -> None:
        it = iter(zip(self.signs, self._dtypes))
        for w in self.owners:
            for name in self._names(w):
                p, dtype = next(it)
                setattr(w, name, p.detach().to(dtype))
        self.signs = []

    def parameters(self) -> list[nn.Parameter]:
        return self.signs + self.other

    def count(self) -> int:
        return sum(p.numel() for p in self.parameters())


class FrozenReference:
    """The model as it is when this is created, as a teacher: ids -> logits. Holds the
    Parameters in `share` by reference (quantization replaces weights, it never writes into
    them, so these cost no copy) and clones every other parameter (fine-tuning changes norms
    and the head in place). The teacher runs `model` itself with these tensors swapped in."""

    def __init__(self, model: nn.Module, share: Iterable[Tensor] = ()):
        shared = {id(p) for p in share}
        self.model = model
        self.params = {n: p if id(p) in shared else p.detach().clone()
                       for n, p in model.named_parameters()}
        self.shared = shared

    @torch.no_grad()
    def restore_continuous(self) -> None:
        """Put the cloned (continuous) parameters back into the model, e.g. after a failed
        fine-tuning; the shared ones (the weights quantization replaces) are left alone."""
        for name, p in self.model.named_parameters():
            saved = self.params.get(name)
            if saved is not None and id(saved) not in self.shared and p.shape == saved.shape \
                    and type(p.data) is type(saved):
                p.copy_(saved)

    @torch.no_grad()
    def __call__(self, ids: Tensor) -> Tensor:
        out = functional_call(self.model, self.params, (ids,), {"use_cache": False})
        return out.logits if hasattr(out, "logits") else out[0]

    @torch.no_grad()
    def last_hidden(self, ids: Tensor) -> Tensor:
        """The teacher's last hidden states [B, S, D] (its decoder alone: a large vocabulary's
        logits are then formed a slice at a time)."""
        base, prefix = self.model.base_model, self.model.base_model_prefix + "."
        params = {k[len(prefix):]: v for k, v in self.params.items() if k.startswith(prefix)}
        return functional_call(base, params, (ids,), {"use_cache": False}).last_hidden_state

    def head(self):
        """The output head with the teacher's weights: hidden -> logits."""
        head = self.model.get_output_embeddings()
        name = next(n for n, m in self.model.named_modules() if m is head)
        params = {k[len(name) + 1:]: v for k, v in self.params.items()
                  if k.startswith(name + ".")}
        return lambda h: functional_call(head, params, (h,))
