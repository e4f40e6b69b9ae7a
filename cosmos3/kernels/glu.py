"""The SiLU gate of `Cosmos3MLP`: `silu(gate) * up` in one pass.

Eagerly the gate costs three passes over `[N, intermediate]` tensors, the widest activations in the layer (3x
hidden): `silu` reads `gate` and writes its activation, and the product reads that and `up` and writes the result.
Fused, `gate` and `up` are read once and the product written once; the `[N, intermediate]` activation in between
never reaches memory. Numerics follow eager: SiLU in fp32, rounded to the input dtype, then the product rounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import can_launch, cdiv, check_tensor, jit, round_to, tl

BLOCK = 1024


def silu_glu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """`F.silu(gate) * up`, as `Cosmos3MLP` (hidden_act "silu") forms it before `down_proj`."""
    return F.silu(gate) * up


@jit
def _silu_glu_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    # `F.silu` returns the gate's dtype, so its value is rounded before the product, as eager stores it.
    act = round_to(gate * tl.sigmoid(gate), out_dtype)
    tl.store(out_ptr + offsets, round_to(act * up, out_dtype).to(out_dtype), mask=mask)


def silu_glu(gate: Tensor, up: Tensor) -> Tensor:
    """`silu(gate) * up` for the `gate_proj` / `up_proj` outputs of `Cosmos3MLP` (same shape and dtype).

    Runs the Triton kernel on CUDA (or under `TRITON_INTERPRET=1`), the eager reference otherwise.
    """
    check_tensor("gate", gate)
    check_tensor("up", up, device=gate.device)
    if gate.shape != up.shape:
        raise ValueError(f"`gate` and `up` must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}.")
    if gate.dtype != up.dtype:
        raise TypeError(f"`gate` and `up` must share a dtype, got {gate.dtype} and {up.dtype}.")
    if not can_launch(_silu_glu_kernel, gate):
        return silu_glu_reference(gate, up)

    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _silu_glu_kernel[(cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=4)
    return out
