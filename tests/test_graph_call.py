"""discq.graph_call: a step compiled through Dynamo once, then called through its graph alone."""
import torch
from torch import nn

from discq.graph_call import GraphCall


class Accumulate(nn.Module):
    """A step like a decoder's: reads fixed tensors, updates a buffer in place, returns one
    tensor; `u` is optional (None, or noise added)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("state", torch.zeros(2, 8))

    def forward(self, x, u=None):
        self.state.add_(self.lin(x))
        return self.state * 2 if u is None else self.state * 2 + u


def pair():
    torch.manual_seed(0)
    m, ref = Accumulate(), Accumulate()
    ref.load_state_dict(m.state_dict())
    return m, ref


def test_later_calls_go_through_the_graph_and_compute_the_same():
    m, ref = pair()
    step = GraphCall(m, "test-step")
    with torch.no_grad():
        for i in range(4):
            x, u = torch.randn(2, 8), torch.randn(2, 8)
            assert torch.allclose(step(x, u), ref(x, u), atol=1e-6)
            if i == 0:  # compiled through Dynamo; from now on Dynamo is never called
                assert step._direct is not None
                step.compiled = None
    assert torch.allclose(m.state, ref.state, atol=1e-6)  # every call's in-place update applied


def test_a_none_argument_stays_none():
    m, ref = pair()
    step = GraphCall(m, "test-none")
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 8)
            assert torch.allclose(step(x, None), ref(x), atol=1e-6)
    assert step._direct is not None


def test_a_graph_that_does_not_return_one_tensor_keeps_dynamo():
    step = GraphCall(lambda x: (x + 1, x * 2), "test-two")
    x = torch.randn(3)
    for _ in range(2):
        a, b = step(x)
        assert torch.equal(a, x + 1) and torch.equal(b, x * 2)
    assert step._direct is None
