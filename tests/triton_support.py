"""Triton is a test dependency where its wheels exist (Linux x86-64, pyproject's `test` extra):
there its kernel tests must run, not skip; elsewhere they are skipped, saying why."""
import platform
import sys

import pytest

TRITON_PLATFORM = sys.platform == "linux" and platform.machine() == "x86_64"


def require_triton() -> None:
    if not TRITON_PLATFORM:
        pytest.skip("triton has no wheels for this platform; its kernels are tested on "
                    "Linux x86-64", allow_module_level=True)
    import triton  # noqa: F401  (missing here = a broken test install: fail, do not skip)
