"""RMSNorm, and the attention's q/k chain (per-head RMSNorm, then rotary embedding) fused in one kernel.

Eagerly, `apply_rope(norm_q(q), cos, sin)` is about ten elementwise passes over q: the fp32 upcast, the square,
the mean, the scaling, the cast back, the weight product, `x * cos`, the `_rotate_half` concatenation, its product
with sin, and the sum, each reading and writing an `[N, H, D]` tensor (and a launch each). The fused kernel reads q
once (plus the small weight and the `[N, D]` cos/sin rows) and writes the result once, for every q and k of every
layer and tower. `rms_norm` does the same for the hidden-state norms: one read and one write of `[N, hidden]` in
place of about six passes.

Numerics follow the model's modules exactly, including where they round: `Cosmos3RMSNorm` takes the variance in
fp32 and multiplies by the weight in the weight's dtype (half-precision weights get the normalised x cast to their
dtype first); `Cosmos3NemotronRMSNorm` stays in fp32 throughout and casts back to x's dtype (no `1 + weight`
offset in either). RoPE is the rotate-half convention of `apply_rope`, rounded to the output dtype after each
product and after the sum, as eager low-precision arithmetic does. What remains is the fp32 reduction order of the
mean square, so bf16/fp16 results agree to within one rounding step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.transformer_cosmos3 import apply_rope
from ._triton import can_launch, cdiv, check_eps, check_tensor, jit, next_power_of_2, round_to, tl

NORM_KINDS = ("rms", "nemotron")


# ---------------------------------------------------------------------------------------------------------------
# Eager references: what Cosmos3RMSNorm / Cosmos3NemotronRMSNorm and apply_rope compute
# ---------------------------------------------------------------------------------------------------------------


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, *, kind: str = "rms") -> Tensor:
    """`Cosmos3RMSNorm` (kind "rms") or `Cosmos3NemotronRMSNorm` (kind "nemotron") over the last dim of x."""
    if kind == "nemotron":
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return (weight.float() * x).to(dtype)
    variance = x.float().pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return x * weight


def rms_norm_rope_reference(
    x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, *, eps: float = 1e-6, kind: str = "rms"
) -> Tensor:
    """`apply_rope(norm(x), cos, sin)` for x `[N, H, D]`, cos/sin `[N, D]`; weight None skips the norm."""
    if weight is not None:
        x = rms_norm_reference(x, weight, eps, kind=kind)
    return apply_rope(x, cos, sin)


def _norm_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype, kind: str) -> torch.dtype:
    """The dtype the eager norm returns: x's for Nemotron; a half-precision weight's, else fp32, for RMS."""
    if kind == "nemotron":
        return x_dtype
    return weight_dtype if weight_dtype in (torch.float16, torch.bfloat16) else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _num_warps(block_elements: int) -> int:
    return 4 if block_elements <= 2048 else 8 if block_elements <= 8192 else 16


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@jit
def _normalize(x, rstd, w, NEMOTRON: tl.constexpr, NORM_DTYPE: tl.constexpr):
    """Rows of fp32 x scaled by rstd and w, rounded as the eager norm stores them; returned in fp32."""
    y = x * rstd[:, None]
    if NEMOTRON:
        y = w.to(tl.float32)[None, :] * y
    else:
        # Cosmos3RMSNorm casts the normalised x to a half-precision weight's dtype before the product (a no-op
        # for fp32 weights).
        y = round_to(y, w.dtype) * w.to(tl.float32)[None, :]
    return round_to(y, NORM_DTYPE)


@jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, n_rows, dim, stride_x, eps,
    NEMOTRON: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < dim)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < dim, other=0.0)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / dim + eps)
    y = _normalize(x, rstd, w, NEMOTRON, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * dim + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _rms_norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, heads, half, stride_xn, stride_xh, stride_cn, stride_sn, eps,
    HAS_NORM: tl.constexpr, NEMOTRON: tl.constexpr, NORM_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # One row is one (token, head); the two halves of head_dim are held apart because rotate-half pairs them.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    token, head = rows // heads, rows % heads
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < half
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    x_lo_ptr = x_ptr + (token * stride_xn + head * stride_xh)[:, None] + cols[None, :]
    x1 = tl.load(x_lo_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_lo_ptr + half, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = tl.math.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half) + eps)
        x1 = _normalize(x1, rstd, tl.load(w_ptr + cols, mask=col_mask, other=0.0), NEMOTRON, NORM_DTYPE)
        x2 = _normalize(x2, rstd, tl.load(w_ptr + half + cols, mask=col_mask, other=0.0), NEMOTRON, NORM_DTYPE)
    cos_lo_ptr = cos_ptr + (token * stride_cn)[:, None] + cols[None, :]
    sin_lo_ptr = sin_ptr + (token * stride_sn)[:, None] + cols[None, :]
    c1 = tl.load(cos_lo_ptr, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_lo_ptr + half, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_lo_ptr, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_lo_ptr + half, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; each product and the sum rounded like eager.
    out_dtype = out_ptr.dtype.element_ty
    o1 = round_to(round_to(x1 * c1, out_dtype) + round_to(-x2 * s1, out_dtype), out_dtype)
    o2 = round_to(round_to(x2 * c2, out_dtype) + round_to(x1 * s2, out_dtype), out_dtype)
    out_lo_ptr = out_ptr + rows[:, None] * (2 * half) + cols[None, :]
    tl.store(out_lo_ptr, o1.to(out_dtype), mask=mask)
    tl.store(out_lo_ptr + half, o2.to(out_dtype), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------------------------


def _check_kind(kind) -> None:
    if kind not in NORM_KINDS:
        raise ValueError(f"`kind` must be one of {NORM_KINDS}, got {kind!r}.")


def rms_norm(x: Tensor, weight: Tensor, eps: float, *, kind: str = "rms") -> Tensor:
    """RMSNorm over the last dim, as `Cosmos3RMSNorm` (kind "rms") or `Cosmos3NemotronRMSNorm` ("nemotron").

    Args:
        x: `[..., D]`, float32/bfloat16/float16.
        weight: `[D]`, any of those dtypes (the output dtype follows the eager module: see `rms_norm_reference`).
        eps: added to the mean square.
        kind: "rms" or "nemotron".

    Runs the Triton kernel on CUDA (or under `TRITON_INTERPRET=1`), the eager reference otherwise.
    """
    check_tensor("x", x)
    if x.ndim == 0:
        raise ValueError("`x` must have at least one dim (the normalised one), got a 0-D tensor.")
    check_tensor("weight", weight, ndim=1, device=x.device)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"`weight` has shape {tuple(weight.shape)} but x's last dim is {x.shape[-1]}.")
    check_eps(eps)
    _check_kind(kind)
    if not can_launch(_rms_norm_kernel, x):
        return rms_norm_reference(x, weight, eps, kind=kind)

    dim = x.shape[-1]
    out = torch.empty(x.shape, dtype=_norm_dtype(x.dtype, weight.dtype, kind), device=x.device)
    rows = x.reshape(-1, dim)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n_rows = rows.shape[0]
    if n_rows == 0 or dim == 0:
        return out
    block_d = next_power_of_2(dim)
    block_r = min(max(1, 4096 // block_d), next_power_of_2(n_rows))
    _rms_norm_kernel[(cdiv(n_rows, block_r),)](
        rows, weight, out, n_rows, dim, rows.stride(0), float(eps),
        NEMOTRON=kind == "nemotron", BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_num_warps(block_r * block_d),
    )
    return out


def rms_norm_rope(
    x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, *, eps: float = 1e-6, kind: str = "rms"
) -> Tensor:
    """`apply_rope(norm(x), cos, sin)` in one pass: the q/k chain of `Cosmos3Attention`.

    Args:
        x: queries or keys `[N, H, D]` (D even; any head count), float32/bfloat16/float16.
        weight: the per-head norm weight `[D]`, or None for rotary embedding alone (Edge's text q/k have no norm).
        cos, sin: `[N, D]` from `Cosmos3RotaryEmbedding` (rotate-half layout), one dtype for both.
        eps: the norm's epsilon. kind: "rms" (`Cosmos3RMSNorm`) or "nemotron" (`Cosmos3NemotronRMSNorm`).

    Returns `[N, H, D]` in the dtype eager code returns (the norm's output dtype promoted with cos's).
    """
    check_tensor("x", x, ndim=3)
    n, heads, dim = x.shape
    if dim % 2:
        raise ValueError(f"`x` head_dim must be even for rotate-half RoPE, got shape {tuple(x.shape)}.")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=2, device=x.device)
        if tuple(t.shape) != (n, dim):
            raise ValueError(f"`{name}` must have shape (N, D) = {(n, dim)} for x of shape {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}.")
    if cos.dtype != sin.dtype:
        raise TypeError(f"`cos` and `sin` must share a dtype, got {cos.dtype} and {sin.dtype}.")
    if weight is not None:
        check_tensor("weight", weight, ndim=1, device=x.device)
        if weight.shape[0] != dim:
            raise ValueError(f"`weight` has shape {tuple(weight.shape)} but x's head_dim is {dim}.")
        check_eps(eps)
        _check_kind(kind)
    if not can_launch(_rms_norm_rope_kernel, x):
        return rms_norm_rope_reference(x, weight, cos, sin, eps=eps, kind=kind)

    norm_dtype = x.dtype if weight is None else _norm_dtype(x.dtype, weight.dtype, kind)
    out = torch.empty(x.shape, dtype=torch.promote_types(norm_dtype, cos.dtype), device=x.device)
    n_rows, half = n * heads, dim // 2
    if n_rows == 0 or dim == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    block_h = next_power_of_2(half)
    block_r = min(max(1, 2048 // block_h), next_power_of_2(n_rows))
    _rms_norm_rope_kernel[(cdiv(n_rows, block_r),)](
        x, x if weight is None else weight, cos, sin, out, n_rows, heads, half, x.stride(0), x.stride(1),
        cos.stride(0), sin.stride(0), float(eps),
        HAS_NORM=weight is not None, NEMOTRON=kind == "nemotron", NORM_DTYPE=_tl_dtype(norm_dtype),
        BLOCK_R=block_r, BLOCK_H=block_h, num_warps=_num_warps(2 * block_r * block_h),
    )
    return out
