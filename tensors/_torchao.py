"""Import torchao quietly (`discq.quiet`): the CPU build of torch cannot load torchao's CUDA
extension libraries, and torchao logs a warning per library on import; expected here, and
nothing a user can act on."""
from __future__ import annotations

from discq.quiet import quiet_dependencies

with quiet_dependencies():
    import torchao  # noqa: F401
    from torch.utils._python_dispatch import return_and_correct_aliasing
    from torchao.utils import TorchAOBaseTensor

__all__ = ["TorchAOBaseTensor", "return_and_correct_aliasing"]
