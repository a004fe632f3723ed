"""The Kronecker sketch of the KL Hessian (passes/kl_hessian.py): its bookkeeping against the
weight gradient autograd computes, and its fit to the exact Hessian of a small model's KL."""

import pytest
import torch
from discq.passes.kl_hessian import KLFactors, _accumulate, chunks, collect, draw
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def micro_llama(seed: int = 0) -> LlamaForCausalLM:
    """Small enough for the exact Hessian of one layer (k_proj: [8, 16], 128 weights)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      initializer_range=0.3, tie_word_embeddings=False,
                      attn_implementation="eager")  # sdpa has no double backward
    return LlamaForCausalLM(cfg).eval()


def ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 48, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("T", [3, 40])  # the T×T products and the explicit N×K gradient
def test_accumulate_is_the_gradient_gram(T):
    g = torch.Generator().manual_seed(T)
    X, D = torch.randn(T, 12, generator=g), torch.randn(T, 7, generator=g)
    H_in, H_out = torch.zeros(12, 12), torch.zeros(7, 7)
    _accumulate(H_in, H_out, X[None], D[None])
    G = D.t() @ X
    torch.testing.assert_close(H_in, G.t() @ G, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(H_out, G @ G.t(), rtol=1e-4, atol=1e-4)
    X2, D2 = torch.randn(T, 12, generator=g), torch.randn(T, 7, generator=g)  # a batch of 2
    _accumulate(H_in, H_out, torch.stack([X, X2]), torch.stack([D, D2]))
    G2 = D2.t() @ X2
    torch.testing.assert_close(H_in, 2 * G.t() @ G + G2.t() @ G2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(H_out, 2 * G @ G.t() + G2 @ G2.t(), rtol=1e-4, atol=1e-4)


def test_factors_are_grams_of_the_sampled_gradient():
    """One sequence: H_in·N = GᵀG and H_out·K = GGᵀ for G the gradient autograd gives the
    layer's weight, with the targets drawn as collect draws them (seed 0, sequence 0)."""
    model = micro_llama()
    seq = ids(1, 20)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
              and n.endswith(("k_proj", "down_proj"))]
    got = collect(model, [seq], layers, seed=0)
    logits = model(seq).logits.float()[0]  # [S, V]
    y = draw(torch.softmax(logits.detach(), -1), torch.Generator().manual_seed(0))
    model.zero_grad()
    torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    for fqn, m in layers:
        G = m.weight.grad  # [N, K]
        N, K = G.shape
        H_in, H_out = got[fqn]
        torch.testing.assert_close(H_in * N, G.t() @ G, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(H_out * K, G @ G.t(), rtol=1e-3, atol=1e-5)
    alone = collect(model, [seq], layers, seed=0, output_side=False)  # the input side only
    for fqn, _ in layers:
        assert alone[fqn][1] is None and torch.equal(alone[fqn][0], got[fqn][0])


def test_pieces_and_batching_do_not_change_the_factors(monkeypatch):
    """Sequences are cut into PIECE-token pieces, each its own gradient sample with its own
    draws: stacking 8 of them in a forward gives the factors one at a time gives."""
    import discq.passes.kl_hessian as kh
    model = micro_llama()
    layers = [(n, m) for n, m in model.named_modules() if n.endswith(("q_proj", "up_proj"))]
    monkeypatch.setattr(kh, "PIECE", 8)
    batched = collect(model, [ids(3, 20)], layers)  # pieces of 8, 8, 4 tokens per row
    monkeypatch.setattr(kh, "batch_size", lambda *a: 1)
    alone = collect(model, [ids(3, 20)], layers)
    for fqn, _ in layers:
        for a, b in zip(batched[fqn], alone[fqn]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert [tuple(p.shape) for p in kh._pieces([ids(3, 20)], 8)] == [(6, 8), (3, 4)]


def test_draws_follow_the_distribution():
    p = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4)
    y = draw(p, torch.Generator().manual_seed(0))
    freq = torch.bincount(y, minlength=4) / len(y)
    torch.testing.assert_close(freq, p[0], atol=0.015, rtol=0)
    assert torch.equal(y, draw(p, torch.Generator().manual_seed(0)))  # seeded


def exact_kl_hessian(model, layer: nn.Linear, seqs: torch.Tensor) -> torch.Tensor:
    """∂²/∂W² Σ_t KL(p_original ‖ p_W) at the original W: [NK, NK], row-major vec(W)."""
    name = next(n for n, m in model.named_modules() if m is layer) + ".weight"
    W0 = layer.weight.detach().clone()
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        logp0 = torch.log_softmax(model(seqs).logits.float(), -1)

    def kl(w):
        out = torch.func.functional_call(model, {**params, name: w.reshape(W0.shape)}, (seqs,))
        logp = torch.log_softmax(out.logits.float(), -1)
        return (logp0.exp() * (logp0 - logp)).sum()

    return torch.autograd.functional.hessian(kl, W0.reshape(-1))


def cosine(A: torch.Tensor, B: torch.Tensor) -> float:
    return float((A * B).sum() / (A.norm() * B.norm()))


def test_sketch_fits_the_exact_kl_hessian_better_than_inputs_only():
    """The issue's check: on a model small enough for the exact Hessian of the KL with respect
    to one layer, H_out ⊗ H_in is closer (cosine similarity) than GPTQ's I ⊗ XᵀX."""
    model = micro_llama()
    layer = model.model.layers[1].self_attn.k_proj
    seqs = ids(64, 24, seed=1)
    H = exact_kl_hessian(model, layer, seqs)
    H_in, H_out = collect(model, list(seqs.split(16)), [("k", layer)], seed=0)["k"]
    X = []
    h = layer.register_forward_pre_hook(lambda m, a: X.append(a[0].reshape(-1, 16)))
    with torch.no_grad():
        model(seqs)
    h.remove()
    X = torch.cat(X)
    kl_fit = cosine(H, torch.kron(H_out, H_in))
    inputs_fit = cosine(H, torch.kron(torch.eye(8), X.t() @ X))
    print(f"cosine to the exact KL Hessian: sketch {kl_fit:.3f}, I ⊗ XᵀX {inputs_fit:.3f}")
    assert kl_fit > inputs_fit + 0.05


def test_chunks_bound_memory_and_resume_from_disk(tmp_path, monkeypatch):
    """Chunks of layers whose factors fit the budget, each one pass; a second KLFactors on the
    same directory reads the chunks back (no pass runs) and returns the same factors."""
    model = micro_llama()
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and ".layers." in n]
    from discq.passes.kl_hessian import factor_bytes
    budget = factor_bytes(model.model.layers[0].mlp.up_proj)  # one MLP layer's factors
    split = chunks(targets, budget)
    assert [t for c in split for t in c] == targets  # every layer once, in order
    assert all(len(c) == 1 or sum(factor_bytes(m) for _, m in c) <= budget for c in split)
    assert 1 < len(split) < len(targets)  # small layers share a pass
    batches = [ids(4, 12)]
    first = KLFactors(model, batches, targets, directory=tmp_path, settings="s",
                      max_bytes=20_000).compute()
    assert len(first.chunks) > 2 and len(list(tmp_path.glob("chunk-*.safetensors"))) == len(
        first.chunks)
    import discq.passes.kl_hessian as kh

    def no_pass(*a, **k):
        raise AssertionError("a chunk on disk was computed again")
    monkeypatch.setattr(kh, "collect", no_pass)
    again = KLFactors(model, batches, targets, directory=tmp_path, settings="s",
                      max_bytes=20_000).compute()
    ref = collect(model, batches, targets)
    for fqn, _ in targets:
        for a, b in zip(again.pop(fqn), ref[fqn]):
            torch.testing.assert_close(a, b)
    other = KLFactors(model, batches, targets, directory=tmp_path, settings="changed",
                      max_bytes=20_000)
    with pytest.raises(AssertionError, match="computed again"):
        other.compute()  # other settings: the files on disk are not taken


def test_needs_a_language_model():
    from discq.passes.kl_hessian import _EmbeddingLeaf
    with pytest.raises(ValueError, match="hessian='inputs'"):
        _EmbeddingLeaf(nn.Sequential(nn.Linear(4, 4)))
