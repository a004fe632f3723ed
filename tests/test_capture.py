"""Calibration capture: blocks found generically, block-by-block inputs equal to the full forward,
true-sequential groups, memoized sub-modules, linears outside the blocks, bad activations."""
import pytest
import torch
from discq.passes import gptq_config
from discq.passes.block_cache import FrozenChildren
from discq.passes.capture import (
    block_inputs,
    find_blocks,
    linear_groups,
    run_block,
    sequential_quantize,
)
from discq.passes.quantize import install_weight
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.grid import AffineGrid
from models import tiny_random_llama
from torch import nn

import discq


def _ids(*shape, seed=0):
    return torch.randint(0, 320, shape, generator=torch.Generator().manual_seed(seed))


def test_blocks_and_sequential_groups_are_found_generically():
    model = tiny_random_llama()
    fqn, blocks = find_blocks(model)
    assert fqn == "model.layers" and len(blocks) == 2
    inputs = block_inputs(model, blocks, [_ids(2, 16)])
    targets = {m: n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)}
    names = [[targets[m] for m in g] for g in linear_groups(blocks[0], targets, inputs)]
    assert names == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                     ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_block_by_block_outputs_equal_the_full_forward():
    model = tiny_random_llama()
    batches = [_ids(2, 16), _ids(3, 9, seed=1)]
    _, blocks = find_blocks(model)
    full = []  # full[b][k]: output of block k on batch b in the ordinary forward
    hooks = [blk.register_forward_hook(lambda m, a, o: full[-1].append(o)) for blk in blocks]
    with torch.no_grad():
        for ids in batches:
            full.append([])
            model(ids)
    for h in hooks:
        h.remove()
    inputs = block_inputs(model, blocks, batches)
    for k, block in enumerate(blocks):
        run_block(block, inputs, update=True)
        for b, (args, _) in enumerate(inputs):
            assert torch.allclose(args[0], full[b][k], atol=1e-5)


def _rtn_recording(calls: dict):
    """A quantize_layer that records each layer's Hessian and installs RTN (cheap, changes the
    activations of later layers like a real method would)."""
    def quantize_layer(fqn, module, H):
        calls[fqn] = H.clone()
        install_weight(module, AffineQuantizedTensor.from_hp(module.weight, AffineGrid(3, 16)))
    return quantize_layer


def _targets(model, head=False):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (head or n != "lm_head")]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_memoized_children_change_nothing_and_skip_work(monkeypatch, attention):
    """Memoized children and kept layer inputs give bit-identical Hessians and outputs, with
    attention computed once per batch (for o_proj's Hessian; trace aside) and gate/up once
    (for down_proj's; the outputs' pass takes the MLP from down_proj's kept input). Eager
    attention also returns its weights, so its output is not o_proj's alone: it is computed
    again once (for gate/up's Hessian), then memoized."""
    batches = [_ids(2, 16), _ids(2, 16, seed=1)]
    results, counts = [], []
    for memoize in (True, False):
        if not memoize:
            monkeypatch.setattr(FrozenChildren, "freeze", lambda self, done, last=False: None)
        model = tiny_random_llama(seed=2)
        model.set_attn_implementation(attention)
        layer = model.model.layers[0]
        n = {"q": [], "gate": []}
        layer.self_attn.q_proj.register_forward_hook(lambda *a: n["q"].append(1))
        layer.mlp.gate_proj.register_forward_hook(lambda *a: n["gate"].append(1))
        calls = {}
        sequential_quantize(model, batches, _targets(model), _rtn_recording(calls))
        results.append((calls, model(batches[0]).logits))
        counts.append({k: len(v) - 1 for k, v in n.items()})  # less the check's forward
    (memo, y_memo), (plain, y_plain) = results
    assert memo.keys() == plain.keys()
    assert all(torch.equal(memo[k], plain[k]) for k in memo)
    assert torch.equal(y_memo, y_plain)
    B = len(batches)  # plain: q in the trace, o's, gate/up's, down's and the outputs' passes
    q = 1 + B if attention == "sdpa" else 1 + 2 * B
    assert counts == [{"q": q, "gate": 1 + B}, {"q": 1 + 4 * B, "gate": 1 + 2 * B}]
    assert "forward" not in vars(layer.self_attn) and "forward" not in vars(layer.mlp)


def _head_input_hessian(model, batches):
    xs = []
    h = model.lm_head.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    h.remove()
    X = torch.cat(xs)
    return 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize("unusual", [False, True])
def test_head_outside_the_blocks_gets_its_hessian_from_the_quantized_blocks(monkeypatch,
                                                                           unusual):
    from discq.passes import capture
    if unusual:  # a model calling its first block twice: full forward instead, with a warning
        def twice(self, *a, **k):
            raise capture._BlocksCalledUnusually("the first block ran twice in one forward")
        monkeypatch.setattr(capture._blocks_replaced, "_first", twice)
    model = tiny_random_llama(seed=3, tie=False)
    batches = [_ids(2, 16), _ids(1, 12, seed=1)]
    calls = {}
    record = _rtn_recording(calls)

    def quantize_layer(fqn, m, H):  # the head's Hessian is only recorded
        return calls.__setitem__(fqn, H) if fqn == "lm_head" else record(fqn, m, H)

    with pytest.warns(UserWarning, match="recomputing") if unusual else _nothing():
        sequential_quantize(model, batches, _targets(model, head=True), quantize_layer)
    assert list(calls)[-1] == "lm_head"
    assert torch.allclose(calls["lm_head"], _head_input_hessian(model, batches), atol=1e-5)
    assert all("forward" not in vars(b) for b in model.model.layers)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.b(torch.relu(self.a(h)))


class _Plain(nn.Module):
    """Not a transformers model: forward(ids) only, blocks returning tensors."""

    def __init__(self, d=16, vocab=40):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(3))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        for blk in self.layers:
            h = blk(h)
        return self.head(h)


def test_a_plain_pytorch_model_is_handled_generically():
    torch.manual_seed(0)
    model = _Plain().eval()
    calib = [torch.randint(0, 40, (4, 8))]
    ref = model(calib[0])
    discq.quantize_(model, gptq_config(4, 16, calibration=calib))
    assert all(isinstance(m.weight, AffineQuantizedTensor)
               for m in model.modules() if isinstance(m, nn.Linear))
    assert (model(calib[0]) - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_nan_activations_name_the_layer():
    model = tiny_random_llama(tie=False)  # untied: the head's weights stay finite
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*NaN"):
        discq.quantize_(model, gptq_config(4, 32, calibration=[torch.full((1, 8), 5)]))
    assert not any(isinstance(m.weight, AffineQuantizedTensor)
                   for m in model.modules() if isinstance(m, nn.Linear))  # nothing installed
