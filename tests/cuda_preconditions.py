"""What a CUDA run imposes that the CPU run would not, emulated on the CPU.

The first run on a real GPU (docs/design.md section 10) failed 77 tests
for two reasons the interpreter and CPU kernels hid:

1. The Triton compiler specializes an integer kernel argument equal to 1 into a
   compile-time constant: inside the kernel it is a plain Python int, not a tensor
   (`C.to(...)` then fails to compile). The interpreter wraps every integer in a
   tensor. `specialize_ones_like_the_compiler` makes the interpreter pass integers
   equal to 1 as plain ints, so every C = 1, H*W = 1, N = 1 or one-block launch in the
   CPU suite runs the kernel body the compiler would build.

2. aten's CUDA `native_batch_norm_backward` asserts that save_mean and save_invstd
   are defined, also in eval mode; the CPU kernel accepts them undefined.
   `CudaArgumentChecks` is a dispatch mode that raises where the CUDA kernel would.

Both are on for the whole CPU suite (conftest.py); a test that exists to show one of
them also asserts it is active.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_STATE = {"saved_cvt": None}


def specialize_ones_like_the_compiler():
    """Make the Triton interpreter pass integer arguments equal to 1 as plain ints."""
    from triton.runtime import interpreter

    if _STATE["saved_cvt"] is not None:
        return
    original = interpreter._implicit_cvt

    def cvt(arg):
        if type(arg) is int and arg == 1:  # bool is a subclass of int: excluded by `is`
            return 1
        return original(arg)

    _STATE["saved_cvt"] = original
    interpreter._implicit_cvt = cvt


def ones_are_specialized() -> bool:
    return _STATE["saved_cvt"] is not None


class CudaArgumentChecks(TorchDispatchMode):
    """Raise where an aten op's CUDA kernel rejects arguments its CPU kernel accepts."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is torch.ops.aten.native_batch_norm_backward:
            save_mean, save_invstd = args[5], args[6]
            if save_mean is None or save_invstd is None:
                raise RuntimeError(
                    "native_batch_norm_backward called with undefined save_mean/save_invstd: "
                    "the CUDA kernel asserts 'save_mean should always be defined' "
                    "(emulated on CPU by tests/cuda_preconditions.py)")
        return func(*args, **kwargs)
