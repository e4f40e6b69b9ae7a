"""Optional Triton, and the checks every kernel wrapper shares.

Triton is an optional dependency: without it (or on a CPU tensor with the interpreter off) each wrapper runs its
eager reference, so the library works everywhere and the kernels are a pure speed-up where they can launch.
Whether the interpreter is on is fixed when a function is decorated (Triton reads `TRITON_INTERPRET` then: for its
own library when Triton is first imported, which importing torch's compiler or diffusers already does), so it is
read off the decorated objects, not the environment; set `TRITON_INTERPRET=1` before starting Python.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def jit(fn):
    """`triton.jit`, or the bare function when Triton is missing (then it is never launched)."""
    return fn if triton is None else triton.jit(fn)


@jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x rounded to `dtype` (round to nearest even), returned in fp32.

    bfloat16 is rounded by hand because Triton's interpreter truncates fp32 -> bf16 casts; compiled kernels round
    to nearest even anyway, so kernels give torch's roundings in both modes.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype).to(tl.float32)


def interpreted(kernel) -> bool:
    """Whether `kernel` was decorated with Triton's CPU interpreter on (`TRITON_INTERPRET=1` before the import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    # The kernels call Triton's own jitted library (`tl.sum`, `tl.sigmoid`), decorated when Triton was first
    # imported: it must be in interpreter mode too, or the launch fails.
    return isinstance(kernel, InterpretedFunction) and isinstance(tl.sum, InterpretedFunction)


def can_launch(kernel, x: Tensor) -> bool:
    """Whether `kernel` can run on `x`: compiled kernels need CUDA; the interpreter takes any device."""
    return triton is not None and (x.is_cuda or interpreted(kernel))


def check_tensor(name: str, x, *, ndim: int | None = None, dtypes=SUPPORTED_DTYPES, device=None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.dtype not in dtypes:
        raise TypeError(f"`{name}` has dtype {x.dtype}; supported: {', '.join(str(d) for d in dtypes)}.")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {tuple(x.shape)}.")
    if device is not None and x.device != device:
        raise ValueError(f"`{name}` is on {x.device} but the input is on {device}; put both on one device.")


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"`eps` must be a positive finite number, got {eps!r}.")


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
