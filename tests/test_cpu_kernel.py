"""The C++ CPU kernel for affine matmuls (`kernels/affine_cpu.cpp`) against the torch reference:
a grid of bits x group size x rows x symmetry x dtypes with an SQNR floor, both of its paths
(fused up to 64 rows, dequantize-then-GEMM above), a hypothesis property over shapes, the
dispatch in eager and compiled code, and the fallbacks when the kernel is switched off, cannot
be built or its cached build is bad."""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import discq
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.grid import AffineGrid
from discq.tensors.kernels import affine_cpu
from discq.tensors.kernels.affine_ref import affine_linear_ref, dequantize_packed

SQNR_FLOOR_DB = 100.0  # fp32 sums in another order; bf16 rows are compared in their own dtype

pytestmark = pytest.mark.skipif(not affine_cpu.load(), reason="no C++ compiler for the kernel")


def sqnr_db(y, ref):
    err = (y.float() - ref.float()).pow(2).sum().clamp(min=1e-30)
    return float(10 * torch.log10(ref.float().pow(2).sum() / err))


def case(N, K, M, bits, g, sym, scale_dtype=torch.float16, x_dtype=torch.float32, bias=True,
         seed=0):
    torch.manual_seed(seed)
    W, x = torch.randn(N, K), torch.randn(M, K).to(x_dtype)
    b = torch.randn(N) if bias else None
    q = AffineQuantizedTensor.from_hp(W, AffineGrid(bits, g, sym, scale_dtype=scale_dtype))
    return x, (q.qdata, q.scale, q.zero_point, b, bits, q.group_size, K)


def kernel_and_ref(x, args):
    qdata, scale, zero, b, bits, g, K = args
    y = torch.ops.discq.affine_linear_cpu(x, *args)
    ref = affine_linear_ref(x, qdata, scale, zero, b, bits, g, False, K)
    return y, ref


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kernel_matches_the_reference_on_a_grid(bits):
    # K = 136 is not a multiple of 64 or 128 (a short last group) and 100 not even of 8 (padding);
    # N = 42 leaves two rows after the one-row path's blocks of four
    low = {}
    for g, M, sym, K in itertools.product([8, 32, 64, 128], [1, 2, 3, 4, 5, 16], [False, True],
                                          [136, 100]):
        if bits == 8 and K % 8:
            continue  # unpadded 8-bit rows: the op takes the reference (see the routing test)
        x, args = case(42, K, M, bits, min(g, K // 8 * 8), sym)
        y, ref = kernel_and_ref(x, args)
        assert y.shape == (M, 42) and y.dtype == x.dtype
        if (db := sqnr_db(y, ref)) < SQNR_FLOOR_DB:
            low[(g, M, sym, K)] = db
    assert not low, low


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_dtypes(scale_dtype, x_dtype):
    x, args = case(24, 64, 3, 4, 32, False, scale_dtype, x_dtype)
    y = torch.ops.discq.affine_linear_cpu(x, *args)
    ref = kernel_and_ref(x.float(), args)[1]  # fp32 math on the same (rounded) activations
    assert y.dtype == x_dtype
    floor = SQNR_FLOOR_DB if x_dtype == torch.float32 else 40.0  # one rounding of the output
    assert sqnr_db(y, ref) > floor


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 70), runs=st.integers(1, 40), tail=st.integers(0, 7),
       M=st.integers(1, 9), bits=st.sampled_from([2, 3, 4, 8]), g_runs=st.integers(1, 8),
       sym=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
@example(N=1, runs=11, tail=3, M=1, bits=4, g_runs=1, sym=False, bias=False, seed=126)
def test_kernel_equals_reference_for_any_shape(N, runs, tail, M, bits, g_runs, sym, bias, seed):
    K = 8 * runs + (0 if bits == 8 else tail)
    x, args = case(N, K, M, bits, min(8 * g_runs, 8 * runs), sym, bias=bias, seed=seed)
    y, ref = kernel_and_ref(x, args)
    # fp32 sums in another order (the kernel may sum q·s·x and the zero point's z·s·Σx apart):
    # within a few ulps of the sum of |terms|, however much a single output's terms cancel (an
    # SQNR floor failed on one output of 0.057 made of terms ~1)
    W = dequantize_packed(*args[:3], bits, args[5], False, K, torch.float32)
    scale_of_terms = x.abs() @ (W.abs() + args[1].float().abs().amax() * 2 ** bits).t()
    assert bool(((y - ref).abs() <= 1e-6 * scale_of_terms + 1e-6).all())


@pytest.mark.parametrize("M", [65, 130])  # above 64 rows: dequantize once, one fp32 GEMM
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_many_rows_take_the_dequantize_and_gemm_path(bits, M):
    x, args = case(40, 136 if bits != 8 else 128, M, bits, 32, False)
    y, ref = kernel_and_ref(x, args)
    assert y.shape == (M, 40) and sqnr_db(y, ref) > SQNR_FLOOR_DB


def test_the_op_uses_the_kernel_where_it_can(monkeypatch):
    calls = []
    real = affine_cpu.affine_linear
    monkeypatch.setattr(affine_cpu, "affine_linear", lambda *a: calls.append(1) or real(*a))
    _, (qdata, scale, zero, b, bits, g, K) = case(24, 64, 1, 4, 32, False)
    for M in (1, 16, 100):
        x = torch.randn(2, M, K)[:1]  # 3-D and not contiguous, as a batch slice is
        y = torch.ops.discq.affine_linear(x, qdata, scale, zero, b, bits, g, False, K)
        ref = affine_linear_ref(x, qdata, scale, zero, b, bits, g, False, K)
        assert y.shape == (1, M, 24) and sqnr_db(y, ref) > SQNR_FLOOR_DB
    assert len(calls) == 3
    # not the kernel's layout (output grouping; unpadded 8-bit rows): the reference answers
    for bits, K, along in ((4, 64, "output"), (8, 100, "input")):
        q = AffineQuantizedTensor.from_hp(torch.randn(24, K), AffineGrid(bits, 32, False, along))
        x = torch.randn(3, K)
        y = torch.ops.discq.affine_linear(x, q.qdata, q.scale, q.zero_point, None, bits, 32,
                                          along == "output", K)
        assert torch.allclose(y, x @ q.dequantize().t(), atol=1e-4)
    assert len(calls) == 3


def test_compiled_linear_calls_the_kernel():
    from torch._inductor.utils import run_and_get_code
    lin = discq.quantize_(torch.nn.Sequential(torch.nn.Linear(96, 40)), discq.rtn_config(3, 32))
    x = torch.randn(1, 96)
    with torch.no_grad():
        eager = lin(x)
        torch._dynamo.reset()
        y, code = run_and_get_code(torch.compile(lin), x)
    assert "discq.affine_linear_cpu" in code[0]
    assert torch.allclose(y, eager, rtol=1e-5, atol=1e-6)


FALLBACK = textwrap.dedent("""
    import os, warnings, torch, discq
    from discq.tensors.kernels import affine_cpu
    if os.environ.get("PLANT_BAD_BUILD"):  # a truncated build in the cache
        affine_cpu.library_path().parent.mkdir(parents=True, exist_ok=True)
        affine_cpu.library_path().write_bytes(b"not a shared library")
        # "built again" by copying the suite's build: the compiler's run is tested elsewhere
        import shutil
        affine_cpu._compile = lambda out: shutil.copy(os.environ["GOOD_BUILD"], out)
    lin = discq.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 8)), discq.rtn_config(4, 32))
    x = torch.randn(1, 64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = lin(x)
    ref = x @ lin[0].weight.dequantize().t() + lin[0].bias
    print(affine_cpu._state.get("ok"), bool(torch.allclose(y, ref, atol=1e-5)),
          any("could not build or load the CPU kernel" in str(x.message) for x in w),
          sorted(p.suffix for p in affine_cpu.library_path().parent.glob("*")))
""")


@pytest.mark.parametrize("env, expect", [
    # switched off: the reference, quietly, nothing built
    ({"DISCQ_CPU_KERNEL": "0"}, "None True False []"),
    # no working compiler: one warning, the reference, no partial file left behind
    ({"CXX": "false"}, "False True True []"),
    # a bad cached build: dropped and built again
    ({"PLANT_BAD_BUILD": "1"}, "True True False ['.so']"),
])
def test_without_a_working_kernel_the_reference_answers(tmp_path, env, expect):
    assert affine_cpu.load()
    env = {**os.environ, "DISCQ_CACHE": str(tmp_path),
           "GOOD_BUILD": str(affine_cpu.library_path()), **env}
    done = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expect


@pytest.mark.parametrize("user_tag", ["", "mine"])
def test_compile_caches_are_keyed_by_the_lowering_code(user_tag):
    # a program cached under another discq must not be reused: it may call kernels that are gone
    env = {**os.environ, "TORCH_COMPILE_CACHE_KEY_TAG": user_tag}
    done = subprocess.run([sys.executable, "-c", "import discq, torch.compiler.config as c; "
                           "print(c.cache_key_tag)"], capture_output=True, text=True, env=env,
                          timeout=120)
    tag = done.stdout.strip().splitlines()[-1]
    assert tag == "mine" if user_tag else (tag.startswith("discq-") and len(tag) == 18)


def test_eager_inference_and_training_paths_agree():
    # inference calls the kernel directly; anything to differentiate goes through the custom op
    lin = discq.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 24)), discq.rtn_config(4, 32))
    x = torch.randn(2, 64)
    with torch.no_grad():
        y0 = lin(x)
    xg = x.clone().requires_grad_()
    y1 = lin(xg)
    y1.square().sum().backward()
    W = lin[0].weight.dequantize()
    assert torch.allclose(y0, y1.detach(), atol=1e-6)
    assert torch.allclose(xg.grad, 2 * y1.detach() @ W, atol=1e-4)
    assert lin[0].bias.grad is not None


PORTABLE = textwrap.dedent("""
    import itertools, torch, discq
    from discq.tensors.affine import AffineQuantizedTensor
    from discq.tensors.grid import AffineGrid
    from discq.tensors.kernels import affine_cpu
    from discq.tensors.kernels.affine_ref import affine_linear_ref, round_activations
    assert "-mavx2" not in affine_cpu._flags() and affine_cpu.load()
    worst = 1e9
    for bits, M, sym in itertools.product([2, 3, 4, 8], [1, 5, 70], [False, True]):
        K = 136 if bits != 8 else 128
        q = AffineQuantizedTensor.from_hp(torch.randn(24, K), AffineGrid(bits, 32, sym))
        x, b = torch.randn(M, K), torch.randn(24)
        args = (q.qdata, q.scale, q.zero_point, b, bits, 32)
        y = torch.ops.discq.affine_linear_cpu(x, *args, K)
        ref = affine_linear_ref(x, *args, False, K)
        worst = min(worst, float(10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum())))
        # the 8-bit-activation kernel (affine_q8_cpu.cpp) on whole blocks of 32 inputs
        x = x[:, :128]
        q = AffineQuantizedTensor.from_hp(torch.randn(24, 128), AffineGrid(bits, 32, sym))
        args = (q.qdata, q.scale, q.zero_point, b, bits, 32)
        y = torch.ops.discq.affine_linear_q8_cpu(x, *args, 128)
        ref = affine_linear_ref(round_activations(x), *args, False, 128)
        worst = min(worst, float(10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum())))
    # QTIP's and QuIP#'s whole 2-bit linears (their scalar loops), few rows and many
    from discq.tensors import hadamard, trellis
    from discq.tensors.kernels import lattice_cpu, trellis_cpu
    from discq.tensors.kernels.e8p_ref import e8p_linear_ref
    from discq.tensors.qtip import TrellisQuantizedTensor
    s_in, s_out, q_in, q_out = hadamard.layer_rotation(48, 80, seed=0)
    rot = (s_in.half(), s_out.half(), q_in, q_out)
    codes = torch.randint(0, 256, (48, 20), dtype=torch.uint8)
    bits = torch.randint(-2**31, 2**31, (3, 5, 16)).to(torch.int32)
    for M, code in itertools.product([1, 5, 70], ["hyb", "3inst"]):
        x, b = torch.randn(M, 80), torch.randn(48)
        w = TrellisQuantizedTensor(bits, torch.tensor(0.5), *rot, 2, code, 16, (48, 80),
                                   torch.float32)
        y = trellis_cpu.qtip_linear(x, bits, w.scale, *rot, None, b, 2, code)
        ref = x @ w.dequantize().t() + b
        worst = min(worst, float(10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum())))
        y = lattice_cpu.e8p_linear(x, codes, torch.tensor(0.5), *rot, b)
        ref = e8p_linear_ref(x, codes, torch.tensor(0.5), *rot, b, 2)
        worst = min(worst, float(10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum())))
    print(worst)
""")


def test_the_portable_build_matches_the_reference(tmp_path):
    # the loop machines without AVX2/FMA compile (no SIMD intrinsics), built and checked here
    env = {**os.environ, "DISCQ_CACHE": str(tmp_path), "DISCQ_CPU_KERNEL": "portable"}
    done = subprocess.run([sys.executable, "-c", PORTABLE], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) > SQNR_FLOOR_DB
