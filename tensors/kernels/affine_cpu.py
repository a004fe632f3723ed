"""discq's CPU kernels (`affine_cpu.cpp`, `gguf_cpu.cpp`, `trellis_cpu.cpp` with
`trellis_lanes.cpp`, `vq_cpu.cpp`, `lattice_cpu.cpp`, `e8p_linear_cpu.cpp`): one library, built
once, loaded on demand.

`discq::affine_linear_cpu` is declared here (schema and fake, so export and compile can trace
it), `discq::gguf_linear_cpu` in `gguf_cpu.py`, the trellis ops in `trellis_cpu.py`,
`discq::vq_linear_cpu` in `vq_cpu.py`, QuIP#'s lattice searches in `lattice_cpu.py`; all are
implemented in C++. The C++ files are compiled the first time a CPU kernel is wanted (about a
minute), with the system compiler (`$CXX`, default `c++`) against torch's headers, into
`$DISCQ_CACHE/kernels/` (default `~/.cache/discq/kernels/`) under a hash of the sources, flags
and torch version; later processes only load the cached library. Without a working compiler
callers fall back to the torch reference (the same results up to float rounding, slower) after
one warning; `DISCQ_CPU_KERNEL=0` switches the kernels off, `DISCQ_CPU_KERNEL=portable` builds
them without SIMD intrinsics, `DISCQ_CPU_KERNEL=avx2` without the VNNI dot product that CPUs
reporting AVX-VNNI or AVX512-VNNI otherwise get.
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..cache import cache_dir

SOURCES = [Path(__file__).with_name(n) for n in (
    "affine_cpu.cpp", "affine_q8_cpu.cpp", "gguf_cpu.cpp", "trellis_cpu.cpp", "trellis_lanes.cpp",
    "vq_cpu.cpp", "lattice_cpu.cpp", "e8p_linear_cpu.cpp", "kmeans_cpu.cpp")]
# part of the build's key
HEADERS = [Path(__file__).with_name(n) for n in ("simd.h", "shares.h", "trellis_lanes.h",
                                                 "hadamard_cpu.h")]
BITS = (2, 3, 4, 8)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_state: dict[str, bool] = {}

torch.library.define(
    "discq::affine_linear_cpu",
    "(Tensor x, Tensor qdata, Tensor scale, Tensor? zero_point, Tensor? bias, int bits, "
    "int group_size, int in_features) -> Tensor")


torch.library.define(
    "discq::affine_linear_q8_cpu",
    "(Tensor x, Tensor qdata, Tensor scale, Tensor? zero_point, Tensor? bias, int bits, "
    "int group_size, int in_features) -> Tensor")


@torch.library.register_fake("discq::affine_linear_cpu")
def _fake(x, qdata, scale, zero_point, bias, bits, group_size, in_features):
    return x.new_empty(x.shape[0], qdata.shape[0])


@torch.library.register_fake("discq::affine_linear_q8_cpu")
def _fake_q8(x, qdata, scale, zero_point, bias, bits, group_size, in_features):
    return x.new_empty(x.shape[0], qdata.shape[0])


def serves(x: Tensor) -> bool:
    """The trellis and vector-codebook kernels can take x: CPU floats with nothing to
    differentiate, and the library built or buildable."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    return x.device.type == "cpu" and x.dtype in FLOATS and not needs_grad and load()


def _flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    # AVX2 or wider (x86 with FMA and F16C); elsewhere, or with DISCQ_CPU_KERNEL=portable, the
    # portable loop
    if (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability().startswith("AVX")
            and os.environ.get("DISCQ_CPU_KERNEL") != "portable"):
        flags += ["-mavx2", "-mfma", "-mf16c", *_vnni_flags()]
    return flags


def _vnni_flags() -> list[str]:
    """The 8-bit dot-product instruction where this CPU has it (the build happens on the machine
    that runs it; the flags are part of the cached library's key): AVX-VNNI, or AVX512-VNNI
    with its 256-bit forms. `DISCQ_CPU_KERNEL=avx2` leaves it out."""
    if os.environ.get("DISCQ_CPU_KERNEL") == "avx2":
        return []
    from discq.machine import cpu_flags
    flags = cpu_flags()
    if "avx_vnni" in flags:
        return ["-mavxvnni"]
    if {"avx512_vnni", "avx512vl"} <= flags:
        return ["-mavx512vnni", "-mavx512vl"]
    return []


def library_path() -> Path:
    """Where the built kernel for this source, these flags and this torch lives."""
    key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES + HEADERS)
                         + " ".join(_flags()).encode()
                         + torch.__version__.encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"discq_cpu_{key}.so"


def _compile(out: Path) -> None:
    """Each source to an object file, as many at once as there are cores (the ATen headers make
    each take 10-20 s), then one link; built beside the target and renamed, so that a crash or a
    concurrent build never leaves a partial .so."""
    from torch.utils.cpp_extension import include_paths, library_paths
    out.parent.mkdir(parents=True, exist_ok=True)
    lib = library_paths()[0]
    cxx, flags = os.environ.get("CXX", "c++"), _flags()
    includes = [f"-I{p}" for p in include_paths()]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objects = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
        jobs = [[cxx, *flags, *includes, "-c", str(src), "-o", str(obj)]
                for src, obj in zip(SOURCES, objects)]
        _run_all(jobs, os.cpu_count() or 1)
        so = Path(tmp) / out.name
        _run_all([[cxx, *flags, *map(str, objects), "-o", str(so), f"-L{lib}",
                   f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu"]], 1)
        os.replace(so, out)


def _run_all(commands: list[list[str]], parallel: int) -> None:
    """Run the commands, `parallel` at a time; the first failure raises CalledProcessError
    (with the compiler's stderr) after the running ones have finished."""
    pending, running, failed = list(commands), [], None
    while pending or running:
        while pending and len(running) < parallel and failed is None:
            cmd = pending.pop(0)
            running.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, text=True)))
        cmd, proc = running.pop(0)
        stdout, stderr = proc.communicate()
        if proc.returncode and failed is None:
            failed = subprocess.CalledProcessError(proc.returncode, cmd, stdout, stderr)
        if failed is not None and not running:
            raise failed


def load(build: bool = True) -> bool:
    """Make `discq::affine_linear_cpu` runnable on CPU; True when it is. `build=False` only loads
    an existing build (what `import discq` does, so a saved AOTInductor package that calls the
    op runs in a fresh process). A cached build that does not load is rebuilt."""
    if "ok" in _state:
        return _state["ok"]
    if os.environ.get("DISCQ_CPU_KERNEL", "1") == "0":
        return False
    path = library_path()
    if path.exists() and _try_load(path):
        return True
    if not build:
        return False
    try:
        # once per machine and torch version: say why this call is slow
        print("discq: building the CPU kernels (once, about a minute)", file=sys.stderr)
        _compile(path)
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip()[-500:]
        warnings.warn(f"discq: could not build or load the CPU kernel ({detail}); quantized "
                      "matmuls use the slower torch reference", stacklevel=2)
        _state["ok"] = False
        return False
    _state["ok"] = True
    return True


def _try_load(path: Path) -> bool:
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError):  # truncated or foreign file: drop it, build again
        path.unlink(missing_ok=True)
        return False
    _state["ok"] = True
    return True


def supports(x: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, group_size: int,
             along_output: bool) -> bool:
    """Whether the kernel serves this call: CPU, input grouping, whole runs per group. Any
    number of rows, symbolic ones included (the kernel picks fused or dequantize-then-GEMM at
    run time)."""
    return (x.device.type == "cpu" and bits in BITS and not along_output and group_size % 8 == 0
            and (bits != 8 or x.shape[-1] % 8 == 0)  # 8-bit rows are not padded to runs
            and x.dtype in FLOATS and scale.dtype in FLOATS
            and (zero_point is None or zero_point.dtype == torch.uint8))


def supports_q8(x: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int,
                group_size: int, along_output: bool) -> bool:
    """Whether the 8-bit-activation kernel serves this call: as `supports`, and whole blocks of
    32 inputs in every group."""
    return (supports(x, scale, zero_point, bits, group_size, along_output)
            and x.shape[-1] % 32 == 0 and group_size % 32 == 0)


def affine_linear(x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor | None,
                  bias: Tensor | None, bits: int, group_size: int, in_features: int,
                  int8_activations: bool = False) -> Tensor:
    """x: [..., K] -> [..., N] through the C++ kernel (call `load()` first); with
    `int8_activations`, x rounded to 8 bits per block of 32 first (`affine_linear_q8_cpu`)."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    op = (torch.ops.discq.affine_linear_q8_cpu if int8_activations
          else torch.ops.discq.affine_linear_cpu)
    y = op(x2, qdata, scale, zero_point, bias, bits, group_size, in_features)
    return y.reshape(*x.shape[:-1], qdata.shape[0])
