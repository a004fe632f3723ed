"""discq.siblings: linears that read one input run as one call, computing what they computed."""
import pytest
import torch
from models import tiny_quantized_llama, tiny_random_llama
from torch import nn

import discq
from discq.inference import PlainLinear, plain_linears
from discq.siblings import SiblingLinear, fuse_siblings
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.grid import AffineGrid


@pytest.fixture(scope="module")
def model():
    return tiny_quantized_llama(seed=7)


def kinds(view, layer):
    return {n: type(m).__name__ for n, m in view.model.layers[layer].named_modules()
            if isinstance(m, (PlainLinear, SiblingLinear)) and ".group." not in n}


def linear_calls(view) -> dict:
    """name -> (input, output) of every linear of the next forward, recorded by hooks."""
    seen, hooks = {}, []
    for name, m in view.named_modules():
        if isinstance(m, (PlainLinear, SiblingLinear)) and ".group" not in name:
            hooks.append(m.register_forward_hook(
                lambda _m, args, y, name=name: seen.__setitem__(name, (args[0], y))))
    return seen, hooks


@pytest.mark.parametrize("int8", [False, True])
def test_qkv_and_gate_up_fused_with_the_same_outputs(model, int8):
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    view = plain_linears(model, int8_activations=int8)
    seen, hooks = linear_calls(view)
    with torch.no_grad():
        ref = view(input_ids=ids).logits
        for h in hooks:
            h.remove()
        assert fuse_siblings(view, lambda v: v(input_ids=ids[:, :3])) == 4  # 2 per layer
        out = view(input_ids=ids).logits
        # each member on the unfused forward's input, in the model's order
        fused = {n: view.get_submodule(n)(seen[n][0]) for n in seen}
    assert kinds(view, 1) == {
        "self_attn.q_proj": "SiblingLinear", "self_attn.k_proj": "SiblingLinear",
        "self_attn.v_proj": "SiblingLinear", "self_attn.o_proj": "PlainLinear",
        "mlp.gate_proj": "SiblingLinear", "mlp.up_proj": "SiblingLinear",
        "mlp.down_proj": "PlainLinear"}
    # 8-bit activations: every output channel computed alone, bit for bit; float: GEMM blocking.
    # (The logits only up to rounding: torch's elementwise ops on the members' strided slices
    # may round their last elements differently from the contiguous outputs of separate calls.)
    for n, (_, y) in seen.items():
        assert torch.equal(fused[n], y) if int8 else torch.allclose(fused[n], y, atol=1e-5), n
    assert torch.allclose(out, ref, atol=1e-5)
    group = view.model.layers[0].self_attn.q_proj.group
    assert group.x is None and group.parts is None  # nothing kept between forwards


def test_compiled_fused_view_equals_eager(model):
    ids = torch.randint(0, 320, (1, 5), generator=torch.Generator().manual_seed(1))
    view = plain_linears(model)
    with torch.no_grad():
        fuse_siblings(view, lambda v: v(input_ids=ids))
        torch._dynamo.reset()
        out = torch.compile(view, fullgraph=True)(input_ids=ids).logits
        assert torch.allclose(out, view(input_ids=ids).logits, atol=1e-5)


class Four(nn.Module):
    """a, b, c read x; x changes in place; d reads it (and a again, when `shared_a`)."""

    def __init__(self, shared_a: bool):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(64, 32) for _ in range(4))
        self.shared_a = shared_a

    def forward(self, x):
        x = x * 1.0
        y = self.a(x) + self.b(x) + self.c(x)
        y = y + self.d(x.mul_(2))  # the same tensor, other values
        return y + self.a(x) if self.shared_a else y


def quantized_four(shared_a: bool):
    torch.manual_seed(0)
    m = Four(shared_a)
    discq.quantize_(m, discq.rtn_config(4, 32))
    return m


def test_groups_need_one_unchanged_input_and_linears_called_once():
    x = torch.randn(3, 64)
    view = plain_linears(quantized_four(shared_a=False))
    ref = view(x)
    assert fuse_siblings(view, lambda v: v(x)) == 1
    assert [type(m).__name__ for m in (view.a, view.b, view.c, view.d)] == [
        "SiblingLinear", "SiblingLinear", "SiblingLinear", "PlainLinear"]
    assert torch.allclose(view(x), ref, atol=1e-5)
    view = plain_linears(quantized_four(shared_a=True))  # a is called twice: left alone
    assert fuse_siblings(view, lambda v: v(x)) == 1
    assert isinstance(view.a, PlainLinear) and isinstance(view.b, SiblingLinear)
    assert view.b.group.sizes == [32, 32]


def test_weights_that_do_not_stack_stay_apart():
    view = plain_linears(quantized_four(shared_a=False))
    grid = AffineGrid(3, 32, True, "input", torch.float16)
    view.b = PlainLinear(AffineQuantizedTensor.from_hp(torch.randn(32, 64), grid), None)
    assert fuse_siblings(view, lambda v: v(torch.randn(2, 64))) == 0  # 4-bit a, 3-bit b
    a, b = view.a.source[0], view.b.source[0]
    assert AffineQuantizedTensor.stack_outputs([a, b]) is None
    assert AffineQuantizedTensor.stack_outputs([a, a]).shape == (64, 64)
