"""The E8P codebook, its residual variants and the lattice tensor: codes decode to codebook
points, nearest-point search is exact, pack/unpack and save/load are identities."""
import pytest
import torch
from discq.tensors import e8p, e8p_residual
from discq.tensors.hadamard import rotate, rotate_weight, unrotate
from discq.tensors.hadamard import rotation
from discq.tensors.kernels import lattice_cpu
from discq.tensors.kernels.e8p_ref import pack_lattice_codes, unpack_lattice_codes
from discq.tensors.lattice import LatticeQuantizedTensor
from hypothesis import given, settings
from hypothesis import strategies as st

import discq


def _in_shifted_d8_hat(v: torch.Tensor) -> torch.Tensor:
    """v ∓ ¼ ∈ D̂8 = {x ∈ (ℤ + ½)^8, Σx even} for one of the two shifts: [M, 8] -> [M] bool."""
    ok = torch.zeros(len(v), dtype=torch.bool)
    for s in (0.25, -0.25):
        x = v - s
        half = ((x - 0.5) == torch.round(x - 0.5)).all(-1)
        ok |= half & (torch.round(x.sum(-1)) % 2 == 0)
    return ok


def test_the_256_patterns_are_the_227_of_norm_at_most_10_and_29_of_norm_12():
    A = e8p.abs_patterns()
    n2 = (A * A).sum(-1)
    assert len({tuple(a.tolist()) for a in A}) == 256
    assert int((n2 <= 10).sum()) == 227 and int((n2 == 12).sum()) == 29


def test_every_code_decodes_to_a_distinct_codebook_point():
    T = e8p.decode_table()  # all 2^16 codes
    assert T.shape == (65536, 8)
    assert _in_shifted_d8_hat(T).all()
    assert len(torch.unique(T, dim=0)) == 65536  # the code is a bijection onto the codebook
    # |v ∓ ¼| is one of the 256 patterns for the shift the code names
    shift = torch.where((torch.arange(65536) >> 15).bool(), -0.25, 0.25)[:, None]
    keys = {tuple(a.tolist()) for a in e8p.abs_patterns()}
    sample = (T - shift).abs()[::97]
    assert all(tuple(r.tolist()) in keys for r in sample)


SEARCHES = {"cpu kernel": e8p.encode, "batched torch": e8p.encode_batched}


@pytest.mark.parametrize("search", SEARCHES)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.sampled_from([0.3, 1.0, 2.0, 4.0]))
def test_nearest_point_search_is_exact_against_brute_force(search, seed, size):
    """Against all 2^16 points, on Gaussian inputs of several sizes (large ones leave the
    fast path for the 256-pattern search); both searches: the C++ one `encode` runs on CPU and
    the batched one other devices run."""
    assert lattice_cpu.available()  # built here: the test must not pass without the kernel
    y = torch.randn(256, 8, generator=torch.Generator().manual_seed(seed)) * size
    T = e8p.decode_table()
    best = torch.cdist(y.double(), T.double()).min(-1).values
    got = (e8p.decode(SEARCHES[search](y)).double() - y.double()).norm(dim=-1)
    assert torch.allclose(got, best, atol=1e-6)


def test_cpu_search_picks_the_batched_searchs_points():
    """On 100k vectors over the sizes the lattice codes see, the C++ search and the batched
    one agree code for code except at ties (equal distances up to float32 rounding)."""
    y = torch.randn(100_000, 8, generator=torch.Generator().manual_seed(0)) * \
        torch.tensor([0.5, 1.0, 1.5, 3.0]).repeat_interleave(25_000)[:, None]
    a, b = e8p.encode(y), e8p.encode_batched(y)
    differ = a != b
    assert int(differ.sum()) <= 10
    da = (e8p.decode(a[differ]) - y[differ]).pow(2).sum(-1)
    db = (e8p.decode(b[differ]) - y[differ]).pow(2).sum(-1)
    assert torch.allclose(da, db, rtol=1e-5, atol=1e-5)


def test_encode_decode_round_trips_every_codebook_point():
    T = e8p.decode_table()
    codes = torch.randint(0, 65536, (4096,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(e8p.encode(T[codes]), codes)


def test_one_bit_e8_codebook_is_256_distinct_points_of_e8():
    P = e8p_residual.e8_1bit_points()
    assert len(torch.unique(P, dim=0)) == 256
    integer = (P == P.round()).all(-1)
    half = ((P - 0.5) == (P - 0.5).round()).all(-1)
    assert (integer | half).all() and (P.sum(-1).round() % 2 == 0).all()  # E8 = D8 ∪ D8 + ½
    assert ((P * P).sum(-1) <= 4).all()
    y = torch.randn(512, 8)
    best = torch.cdist(y, P).min(-1).values
    got = (e8p_residual.decode_e8_1bit(e8p_residual.encode_e8_1bit(y)) - y).norm(dim=-1)
    assert torch.allclose(got, best, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 300), st.integers(1, 12), st.integers(1, 40), st.integers(0, 10**6))
def test_cpu_nearest_point_is_the_exhaustive_argmin(M, d, P, seed):
    """`discq::nearest_cpu` (the 1-bit E8 stage on CPU) = argmin of the distances, any shape."""
    assert lattice_cpu.available()
    g = torch.Generator().manual_seed(seed)
    y, pts = torch.randn(M, d, generator=g), torch.randn(P, d, generator=g)
    got = lattice_cpu.nearest(y, pts)
    dist = torch.cdist(y.double(), pts.double())
    assert torch.allclose(dist.gather(1, got[:, None]).squeeze(1), dist.min(-1).values,
                          atol=1e-5)


def test_more_bits_code_gaussian_blocks_more_accurately():
    y = torch.randn(4096, 8, generator=torch.Generator().manual_seed(1))
    mse = {}
    for bits in (2, 3, 4):
        v, codes = e8p_residual.quantize(y, bits)
        assert torch.equal(e8p_residual.decode(codes, bits), v)
        mse[bits] = (v - y).pow(2).mean().item()
    # E8P alone: ~0.09 per coordinate at unit variance (QuIP# paper); each stage cuts it
    assert 0.07 < mse[2] < 0.11 and mse[3] < 0.5 * mse[2] and mse[4] < 0.5 * mse[3], mse


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([2, 3, 4]), st.integers(1, 6), st.integers(1, 5), st.integers(0, 10**6))
def test_pack_unpack_identity(bits, N, B, seed):
    g = torch.Generator().manual_seed(seed)
    stages = len(e8p_residual.STAGE_BITS[bits])
    hi = torch.tensor([2 ** b for b in e8p_residual.STAGE_BITS[bits]])
    codes = (torch.rand(N, B, stages, generator=g) * hi).long()
    q = pack_lattice_codes(codes, bits)
    assert q.dtype == torch.uint8 and q.shape == (N, B * bits)  # exactly `bits` bits a weight
    assert torch.equal(unpack_lattice_codes(q, bits), codes)


@pytest.mark.parametrize("n", [64, 192, 576])
def test_sign_vector_hadamard_rotation_is_orthogonal(n):
    s_in, q_in = rotation(n, 3)
    s_out, q_out = rotation(n, 4)
    R = rotate(torch.eye(n), s_in, q_in)  # row i: the rotation of e_i, i.e. R = T diag(s)ᵀ
    assert torch.allclose(R @ R.t(), torch.eye(n), atol=1e-5)
    assert torch.allclose(unrotate(R, s_in, q_in), torch.eye(n), atol=1e-5)
    W = torch.randn(n, n)
    Wt = rotate_weight(W, s_out, s_in, q_out, q_in)
    back = unrotate(unrotate(Wt, s_in, q_in).t(), s_out, q_out).t()
    assert torch.allclose(back, W, atol=1e-4)
    assert torch.allclose(Wt.norm(), W.norm(), rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lattice_linear_equals_its_dequantized_weight_and_compiles(bits):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = LatticeQuantizedTensor.from_hp(lin.weight.detach(), bits=bits, seed=1)
    x = torch.randn(3, 5, 64)
    ref = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
    lin.weight = torch.nn.Parameter(q, requires_grad=False)
    with torch.no_grad():
        assert torch.allclose(lin(x), ref, atol=1e-5)
        assert torch.allclose(torch.compile(lin, fullgraph=True)(x), ref, atol=1e-5)
        ep = torch.export.export(lin, (x,))
        assert torch.allclose(ep.module()(x), ref, atol=1e-5)


def test_lattice_model_saves_and_loads_bit_exactly(tmp_path):
    from tests.models import tiny_random_llama
    model = tiny_random_llama()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.weight = torch.nn.Parameter(LatticeQuantizedTensor.from_hp(m.weight.detach(), 2),
                                          requires_grad=False)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    discq.save_quantized(model, tmp_path / "m")
    again = discq.load_quantized(tmp_path / "m")
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        if isinstance(a, LatticeQuantizedTensor):
            assert isinstance(b, LatticeQuantizedTensor), n
            assert torch.equal(a.qdata, b.qdata) and torch.equal(a.s_in, b.s_in), n
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)


def test_bad_shapes_and_bits_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        LatticeQuantizedTensor.from_hp(torch.randn(8, 12))
    with pytest.raises(ValueError, match="2, 3 or 4"):
        LatticeQuantizedTensor.from_hp(torch.randn(8, 16), bits=5)
    with pytest.raises(ValueError, match="last dimension must be 8"):
        e8p.encode(torch.randn(3, 7))
