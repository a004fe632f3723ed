"""GPTVQ: the vector-codebook layout, k-means, the column loop with Hessian feedback, the codebook
update, the CPU kernel, the method on the trained fixture, DiscQuant over the codebooks, config
checks."""
import copy

import pytest
import torch
from discq.passes import disc_config, gptvq_config
from discq.passes.gptq import gptq_config, gptq_layer, proxy_loss
from discq.passes.gptvq import gptvq_layer
from discq.passes.gptvq_core import VQLayout, gptvq_quantize, update_codebooks
from discq.passes.kl import forward_kl
from discq.tensors import kmeans, vq
from discq.tensors.gptvq import VectorQuantizedTensor, from_groups, to_groups
from discq.tensors.kernels import kmeans_cpu, vq_cpu
from hypothesis import given, settings
from hypothesis import strategies as st

import discq

SETTINGS = [(2, 1), (3, 1), (4, 1), (2, 2), (3, 2), (4, 2), (2, 4)]  # every bits·dim <= 8


def _hessian(K: int, seed: int = 0) -> torch.Tensor:
    """A correlated, positive definite H = XᵀX / n."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * K, K, generator=g) @ (torch.eye(K) + torch.randn(K, K, generator=g) / K**.5)
    return X.t() @ X / X.shape[0]


def _random_weight(bits, dim, N=12, K=48, GR=3, GC=2, sb=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = vq.entries(bits, dim)
    idx = torch.randint(0, E, (N, K // dim), generator=g)
    cb = torch.randint(-127, 128, (GR, GC, E, dim), generator=g).to(torch.int8)
    scale = (torch.rand(GR, GC, generator=g) + 0.1).half()
    e = torch.randint(0, 16, (N, K // sb), generator=g).to(torch.uint8) if sb else None
    return VectorQuantizedTensor.from_indices(idx, cb, scale, bits, dim, torch.float32, e, sb), \
        idx, cb, scale, e


# ---- layout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,dim", SETTINGS)
@pytest.mark.parametrize("sb", [0, 8])
def test_every_index_decodes_to_its_codeword(bits, dim, sb):
    q, idx, cb, scale, e = _random_weight(bits, dim, sb=sb)
    W = q.dequantize()
    N, K = q.shape
    for n in range(N):
        for v in range(K // dim):
            r, c = n // (N // cb.shape[0]), v * dim // (K // cb.shape[1])
            want = cb[r, c, idx[n, v]].float() * float(scale[r, c])
            if sb:
                want = want * 2 ** (-float(e[n, v * dim // sb]) / 2)
            torch.testing.assert_close(W[n, v * dim:(v + 1) * dim], want, rtol=1e-6, atol=0)
    assert torch.equal(q.indices(), idx)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 5), st.integers(1, 40), st.integers(0, 10**6))
def test_pack_unpack_identity(index_bits, N, V, seed):
    idx = torch.randint(0, 2**index_bits, (N, V), generator=torch.Generator().manual_seed(seed))
    packed = vq.pack_codes(idx, index_bits)
    assert packed.shape == (N, vq.packed_width(V, index_bits))
    assert torch.equal(vq.unpack_codes(packed, index_bits, V).long(), idx)


def test_groups_round_trip_and_tile_the_weight():
    W = torch.arange(12 * 48, dtype=torch.float32).view(12, 48)
    X = to_groups(W, 4, 16, 2)  # [3·3, 32, 2]
    assert X.shape == (9, 32, 2) and torch.equal(X[1, 0], W[0, 16:18])
    assert torch.equal(from_groups(X[..., 0], 12, 48, 4, 16, 2), W[:, ::2])
    assert vq.group_shape(576, 576, 2, 2048) == (32, 64)  # exactly 2048 weights
    R, C = vq.group_shape(192, 1536, 2, 8192)
    assert 1536 % C == 0 and C <= 256 and 192 % R == 0 and 0.7 < R * C / 8192 < 1.4


# ---- k-means and the codebook update ---------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(st.sampled_from([1, 2, 4]), st.integers(2, 5), st.integers(0, 10**6))
def test_kmeans_never_increases_the_weighted_distortion(d, log_e, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3, 64, d, generator=g) * torch.rand(3, 1, d, generator=g)
    w = torch.rand(3, 64, d, generator=g) + 0.01
    C = kmeans.mahalanobis_init(X, 2**log_e)
    a = kmeans.assign(X, w, C)
    last = kmeans.distortion(X, w, C, a)
    for _ in range(8):
        C = kmeans.update(X, w, a, C)
        mid = kmeans.distortion(X, w, C, a)
        a = kmeans.assign(X, w, C)
        now = kmeans.distortion(X, w, C, a)
        assert (mid <= last * (1 + 1e-5) + 1e-6).all() and (now <= mid * (1 + 1e-5) + 1e-6).all()
        last = now


def test_assignment_is_the_weighted_nearest_codeword():
    g = torch.Generator().manual_seed(1)
    X, w, C = torch.randn(2, 50, 2, generator=g), torch.rand(2, 50, 2, generator=g), \
        torch.randn(2, 16, 2, generator=g)
    brute = (w[:, :, None] * (X[:, :, None] - C[:, None]) ** 2).sum(-1).argmin(-1)
    assert torch.equal(kmeans.assign(X, w, C), brute)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 700), st.integers(1, 6),
       st.sampled_from([1, 7, 8, 64, 256]), st.integers(0, 10**6))
def test_cpu_argmin_of_the_product_is_the_exhaustive_argmin(G, P, k, E, seed):
    """`discq::argmin_bmm_cpu` (k-means assignment on CPU; E a multiple of 8 takes the AVX2
    loop, others the portable one) picks a minimum of A @ B for every row, the first on ties."""
    assert kmeans_cpu.serves(torch.zeros(1, 1, 1))
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(G, P, k, generator=g), torch.randn(G, k, E, generator=g)
    got = kmeans_cpu.argmin_bmm(A, B)
    D = A.double() @ B.double()  # [G, P, E]
    assert got.shape == (G, P) and got.dtype == torch.int64
    assert torch.allclose(D.gather(2, got[..., None]).squeeze(2), D.min(-1).values, atol=1e-5)
    tied = torch.cat([B, B], 2)  # every minimum twice: the first copy is the answer
    assert torch.equal(kmeans_cpu.argmin_bmm(A, tied), got)


def test_assignment_without_the_cpu_kernel_is_the_same(monkeypatch):
    """The torch path (other devices, no compiler) assigns the same codewords as the kernel."""
    g = torch.Generator().manual_seed(2)
    X, w, C = torch.randn(3, 3000, 2, generator=g), torch.rand(3, 1, 2, generator=g), \
        torch.randn(3, 256, 2, generator=g)
    fast = kmeans.assign(X, w, C)
    monkeypatch.setattr(kmeans_cpu, "serves", lambda A: False)
    assert torch.equal(kmeans.assign(X, w, C), fast)


@pytest.mark.parametrize("seed", range(3))
def test_codebook_update_never_increases_the_proxy_loss(seed):
    torch.manual_seed(seed)
    W, H = torch.randn(32, 64), _hessian(64, seed)
    layout = VQLayout(2, 2, 16, 32)
    res, W0 = gptvq_quantize(W, H, layout, fit=lambda X, w, E: kmeans.kmeans(X, w, E, 10)[0])
    before = proxy_loss(W0, res.weight(64, 0), H)
    for lr in (1e-3, 0.05, 5.0):  # a rate far too large must not hurt either
        new = update_codebooks(W0, H, res, 0, steps=10, lr=lr)
        assert torch.equal(new.idx, res.idx) and new.codebook.dtype == torch.int8
        assert proxy_loss(W0, new.weight(64, 0), H) <= before
    assert proxy_loss(W0, update_codebooks(W0, H, res, 0, lr=0.05).weight(64, 0), H) < before


# ---- the column loop --------------------------------------------------------------------------

def test_identity_hessian_dim_one_uniform_codebook_is_rtn():
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    levels = torch.tensor([-127.0, -63.0, 1.0, 65.0]) / 64  # evenly spaced, exact in int8

    def uniform(X, w, E):  # the same evenly spaced levels for every group
        return levels.view(1, E, 1).expand(X.shape[0], E, 1).clone()

    res, _ = gptvq_quantize(W, torch.eye(64), VQLayout(2, 1, 4, 16), fit=uniform)
    stored = vq.codebook_values(res.codebook, res.scale)[0, 0, :, 0]  # int8 levels
    step = float(stored[1] - stored[0])
    rtn = stored[0] + step * torch.clamp(torch.round((W - stored[0]) / step), 0, 3)
    torch.testing.assert_close(res.weight(64, 0), rtn, rtol=0, atol=1e-6)


def test_feedback_beats_nearest_codeword_and_gptq_at_fewer_bits():
    torch.manual_seed(0)
    W, H = torch.randn(64, 128) * 0.05, _hessian(128)
    q = gptvq_layer(W, H, gptvq_config(2, 2, kmeans_iters=20))
    near = VectorQuantizedTensor.from_hp(W, 2, 2, kmeans_iters=20)
    g64 = gptq_layer(W, H, gptq_config(2, 64))
    bpw = q.storage_bits() / q.numel()
    assert bpw < g64.storage_bits() / g64.numel()
    loss = proxy_loss(W, q.dequantize(), H)
    assert loss < 0.8 * proxy_loss(W, near.dequantize(), H)
    assert loss < proxy_loss(W, g64.dequantize(), H)


def test_block_scales_follow_the_rows_magnitudes():
    torch.manual_seed(0)
    W = torch.randn(32, 64) * torch.logspace(-2, 0, 32)[:, None]  # rows 100x apart, one codebook
    H = torch.eye(64)  # the weight's own error
    plain = gptvq_layer(W, H, gptvq_config(2, 1, group_size=2048, kmeans_iters=10))
    scaled = gptvq_layer(W, H, gptvq_config(2, 1, group_size=2048, kmeans_iters=10,
                                             scale_block=16))
    assert scaled.scale_block == 16 and scaled.block_scale is not None
    err = lambda q: float(((q.dequantize() - W).norm(dim=1) / W.norm(dim=1)).mean())  # noqa
    assert err(scaled) < 0.6 * err(plain)
    assert scaled.storage_bits() - plain.storage_bits() == 32 * 64 // 16 * 4


@pytest.mark.parametrize("bits,dim", SETTINGS)
def test_bits_per_weight_is_bits_plus_codebooks(bits, dim):
    q, *_ = _random_weight(bits, dim, N=16, K=64, GR=2, GC=2)
    per_group = 8 * vq.entries(bits, dim) * dim + 16
    assert q.storage_bits() == 16 * 64 * bits + 4 * per_group


# ---- the kernel -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,dim,dtype", [*((b, d, torch.float32) for b, d in SETTINGS),
                                            (2, 2, torch.bfloat16), (3, 1, torch.bfloat16)])
@pytest.mark.parametrize("sb", [0, 8])
@pytest.mark.parametrize("M", [1, 5])  # one row: codeword tables; more: decoded rows
def test_cpu_kernel_equals_decode_then_matmul(bits, dim, dtype, sb, M):
    if not vq_cpu.affine_cpu.load():
        pytest.skip("no C++ compiler: the reference serves")
    # ragged last run; 140 rows: more than one 64-row tile of a row group
    q, *_ = _random_weight(bits, dim, N=140, K=72, GR=2, GC=3, sb=sb)
    x = torch.randn(M, 72).to(dtype)
    got = vq_cpu.vq_linear(x, q.qdata, q.codebook, q.scale, q.block_scale, bits, dim, sb)
    want = (x.float() @ q.dequantize().t()).to(dtype)
    torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-3)


def test_activation_and_bias_gradients():
    q, *_ = _random_weight(2, 2, N=8, K=16, GR=1, GC=1)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    q64 = q.to(torch.float64)
    torch.autograd.gradcheck(lambda x, b: torch.nn.functional.linear(x, q64, b), (x, b))


# ---- the method ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gptvq_tiny(tiny_llama, tiny_calibration):
    model = copy.deepcopy(tiny_llama[0])
    discq.quantize_(model, gptvq_config(2, 2, calibration=tiny_calibration, kmeans_iters=20))
    return model


def test_two_bit_gptvq_on_the_trained_fixture(tiny_llama, tiny_windows, gptvq_tiny):
    from discq.eval import perplexity
    fp = perplexity(tiny_llama[0], tiny_windows, progress=False)
    rtn = copy.deepcopy(tiny_llama[0])
    discq.quantize_(rtn, discq.rtn_config(2, 64))
    p_rtn = perplexity(rtn, tiny_windows, progress=False)
    p = perplexity(gptvq_tiny, tiny_windows, progress=False)
    assert p < fp + 0.5 * (p_rtn - fp), (fp, p, p_rtn)
    ws = [m.weight for m in gptvq_tiny.modules() if isinstance(m, torch.nn.Linear)
          and isinstance(m.weight, VectorQuantizedTensor)]
    assert ws and all(w.bits == 2 and w.vector_dim == 2 for w in ws)
    assert discq.bits_per_weight(gptvq_tiny) < 2.375


def test_discquant_over_gptvq_codebooks(tiny_llama, tiny_calibration):
    from discq.passes.disc_vq import RelaxedVectorLinear
    model, _ = tiny_llama
    ids = torch.cat(tiny_calibration)[:4, :64]
    near, q = copy.deepcopy(model), copy.deepcopy(model)
    base = dict(calibration=tiny_calibration, codebook="gptvq", init="rtn", batch_size=2,
                warmup=4, gradient_checkpointing=False)
    discq.quantize_(near, disc_config(2, steps=1, kl_weight=0, **base))
    discq.quantize_(q, disc_config(2, steps=40, lr=0.05, **base))
    for name, m in model.named_modules():  # zero KL weight: every vector's nearest codeword
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            layer = RelaxedVectorLinear(m, 2, 2, vq.default_group_size(2, 2), "rtn", None)
            got = near.get_submodule(name).weight
            assert isinstance(got, VectorQuantizedTensor), name
            assert torch.equal(got.indices(), layer.down.long()), name
    with torch.no_grad():
        t = model(ids).logits
        assert forward_kl(t, q(ids).logits) < forward_kl(t, near(ids).logits)


def test_config_checks():
    with pytest.raises(ValueError, match="group_size"):
        gptvq_config(2, 2, group_size=64)  # 4.25 bits of codebook a weight
    with pytest.raises(ValueError, match="dim"):
        gptvq_config(3, 4)  # 4096-point codebooks
    with pytest.raises(ValueError, match="bits"):
        gptvq_config(8, 1)
    with pytest.raises(ValueError, match="scale_block"):
        gptvq_config(2, 2, scale_block=15)
    with pytest.raises(ValueError, match="codebook_bits"):
        gptvq_config(2, 2, codebook_bits=4)
    with pytest.raises(ValueError, match="codebook_group_size"):
        disc_config(2, codebook="gptvq", codebook_group_size=32)
    with pytest.raises(ValueError, match="in_features"):
        VectorQuantizedTensor.from_hp(torch.randn(8, 30), 2, 4)
    assert gptvq_config(2, 2).to_dict()["dim"] == 2
