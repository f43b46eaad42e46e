"""adamx: a fused Adam/AdamW optimizer step for PyTorch.

``adamx.Adam`` and ``adamx.AdamW`` drop in for ``torch.optim.Adam`` / ``AdamW``; each step
is one compiled pass over memory (a SIMD, multithreaded CPU kernel; a multi-tensor CUDA
kernel). ``adamx.functional.adam`` is the stateless step, ``torch.ops.adamx.adam_`` the op
behind both, and ``adamx.reference.seed_adam`` the tutorial loop adamx reproduces.
"""

from . import _ops, functional, reference
from ._ops import is_compiled
from .optimizer import COMPACT_MIN_NUMEL, Adam, AdamW, state_bytes, to_torch_state_dict

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "functional", "reference", "is_compiled", "build_info",
           "state_bytes", "to_torch_state_dict", "COMPACT_MIN_NUMEL",
           "cpu_capability", "set_cpu_capability", "supported_cpu_capabilities"]


def cpu_capability() -> str:
    """The SIMD instruction set the CPU kernel uses: 'avx512', 'avx2' or 'default'."""
    _ops.require_compiled()
    return _ops._C.cpu_capability()


def set_cpu_capability(name: str) -> None:
    """Run the CPU kernel compiled for ``name`` (one of supported_cpu_capabilities()).

    The environment variable ADAMX_CPU_CAPABILITY does the same at import time.
    """
    _ops.require_compiled()
    _ops._C.set_cpu_capability(name)


def supported_cpu_capabilities() -> list:
    """The instruction sets this machine can run, narrowest first."""
    _ops.require_compiled()
    return list(_ops._C.supported_cpu_capabilities())


def build_info() -> dict:
    """What was compiled and what runs here: ``torch`` is the torch installed,
    ``built_for_torch`` the one the compiled module was built against (None when the build
    did not record it); when they differ the module is not loaded (``compiled`` False) and
    ``not_loaded`` says why and how to rebuild."""
    import torch

    info = {"version": __version__, "compiled": is_compiled(), "torch": torch.__version__,
            "built_for_torch": _ops.built_for_torch()}
    if not is_compiled():
        try:
            _ops.require_compiled()
        except RuntimeError as e:
            info["not_loaded"] = str(e)
    if is_compiled():
        info.update(cpu_capability=cpu_capability(),
                    supported_cpu_capabilities=supported_cpu_capabilities(),
                    cuda=bool(_ops._C.built_with_cuda()),
                    cuda_available=torch.cuda.is_available())
    return info
