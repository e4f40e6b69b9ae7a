"""Faster drop-ins for diffusers' Wan VAE modules (`AutoencoderKLWan`), swapped in from outside the model file.

`accelerate_wan_vae(vae)` re-classes each `WanCausalConv3d` and `WanRMS_norm` of the VAE in place to a subclass
with a faster forward; parameters, buffers, hooks, the state dict and the VAE's own encode/decode loops (causal
caches, tiling, slicing) are untouched, and `restore_wan_vae` puts the diffusers classes back. Nothing global
changes: other VAEs, and diffusers' functions, stay as they are. The outputs equal diffusers' up to float rounding
(max abs difference ~1e-6 on O(1) float32 outputs), and so do the gradients: both modules work under autograd.

* `FastWanCausalConv3d`: diffusers concatenates the cached frames and then zero-pads all three dims (two copies of
  the input) before an unpadded `F.conv3d`. On CPU, ATen runs that convolution on its slow unfold+matmul fallback
  (`slow_conv3d_forward`) for a batch of one with few channels (`N*C*D*H <= 20480`, and always for 1x1 spatial
  kernels on one thread) -- the whole of a small VAE's per-frame decode loop. Here only the time dim is built by
  hand (zeros, cache and input in one `torch.cat`), and for CPU float32 tensors, a spatial kernel and weights of
  at most 512x512x27 the oneDNN convolution (`torch.mkldnn_convolution`, which has a backward) is called directly,
  padding space itself (faster than padding first). Otherwise (CUDA, half precision, 1x1 spatial kernels, bigger
  weights, oneDNN disabled, autocast) `F.conv3d` picks its backend: on CUDA it pads space itself, on CPU it gets
  `F.pad`'s output as in diffusers (CPU bfloat16 oneDNN is slower padding itself).
* `FastWanRMS_norm`: diffusers' `F.normalize(x, dim=1) * scale * gamma + bias` reduces over the channel dim with
  `linalg_vector_norm`, which on CPU is slow for a reduction over a non-innermost dim, then makes four more full
  passes (divide, scale, gamma, a `+ 0.0` bias). Here `x * (gamma * scale) * inv`, with `inv = rsqrt(max(sum(x^2
  over C), eps^2))` on CPU (`max(sqrt(s), eps) == sqrt(max(s, eps^2))`: F.normalize's clamp at eps=1e-12 is kept)
  and `1 / max(vector_norm(x), eps)` elsewhere: two passes, the second in place when no gradient is needed.
  Half-precision inputs are normalized in float32, as diffusers does, and rounded once at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm
from torch import Tensor, nn

_NORMALIZE_EPS = 1e-12  # F.normalize's default, which WanRMS_norm uses
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Weights up to 512x512x3x3x3 ran faster on oneDNN than on ATen's slow path at every input size measured (one
# thread, 1.03x-9x); a 1024x1024x3x3x3 one (113 MB) on a 4x7 input ran 3x slower there, so ATen keeps those.
_MKLDNN_MAX_WEIGHT = 512 * 512 * 27


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _use_mkldnn(x: Tensor, weight: Tensor) -> bool:
    """Whether to call the oneDNN convolution directly: CPU float32 dense tensors, a spatial kernel, weights of at
    most `_MKLDNN_MAX_WEIGHT`, oneDNN on, no autocast (which would have cast `F.conv3d`'s inputs)."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.layout == torch.strided
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and tuple(weight.shape[-2:]) != (1, 1)  # ATen's choice for 1x1 spatial kernels is the faster one on 1 thread
        and weight.numel() <= _MKLDNN_MAX_WEIGHT  # bigger: oneDNN's per-call weight reorder can cost more than it saves
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    )


def _pads_inside(x: Tensor) -> bool:
    """Whether `F.conv3d` gets the spatial zero padding as its own argument (cuDNN pads inside the kernel)."""
    return x.device.type == "cuda"


def _inverse_norm(x: Tensor, cpu_reduction: bool) -> Tensor:
    """`1 / max(||x||_2 over dim 1, eps)` in float32 or float64, keepdim (F.normalize's denominator, inverted).

    On CPU the channel reduction is `sum(x * x)`, `linalg_vector_norm` being slow over a non-innermost dim there; on
    other devices it is `linalg_vector_norm`, one fused pass (computing half-precision inputs in float32).
    """
    if cpu_reduction:
        xf = x.float() if x.dtype in _LOW_PRECISION else x
        sum_sq = (xf * xf).sum(dim=1, keepdim=True)
        return sum_sq.clamp_min(_NORMALIZE_EPS * _NORMALIZE_EPS).rsqrt()  # max(sqrt(s), eps) == sqrt(max(s, eps^2))
    dtype = torch.float32 if x.dtype in _LOW_PRECISION else None
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=dtype)
    return norm.clamp_min(_NORMALIZE_EPS).reciprocal()


class FastWanCausalConv3d(WanCausalConv3d):
    """`WanCausalConv3d` with one copy for the causal time padding and, on CPU float32, the oneDNN convolution."""

    def forward(self, x: Tensor, cache_x: Tensor | None = None) -> Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or any(self.padding):
            return super().forward(x, cache_x)
        pad_w, _, pad_h, _, pad_t, _ = self._padding  # (w, w, h, h, 2 * t, 0): symmetric in space, causal in time
        if cache_x is not None and pad_t > 0:
            cache_x = cache_x.to(x.device)
            pad_t -= cache_x.shape[2]
            parts = [cache_x, x]
        else:
            parts = [x]
        if pad_t > 0:
            parts.insert(0, x.new_zeros((x.shape[0], x.shape[1], pad_t, *x.shape[3:])))
        if len(parts) > 1:
            x = torch.cat(parts, dim=2)
        if pad_t < 0:  # F.pad crops with a negative pad; diffusers never gets here, but keep its meaning
            x = x[:, :, -pad_t:]
        if _use_mkldnn(x, self.weight):
            padding = [0, pad_h, pad_w]
            return torch.mkldnn_convolution(
                x.contiguous(), self.weight, self.bias, padding, list(self.stride), list(self.dilation), self.groups
            )
        if _pads_inside(x):
            return F.conv3d(x, self.weight, self.bias, self.stride, (0, pad_h, pad_w), self.dilation, self.groups)
        if pad_h or pad_w:  # CPU bfloat16 oneDNN and ATen's slow path are no faster with the conv's own padding
            x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
        return F.conv3d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FastWanRMS_norm(WanRMS_norm):  # noqa: N801 (diffusers' name, suffixed)
    """`WanRMS_norm` as `x * (gamma * scale) * (1 / max(||x||, eps))`: a fast channel reduction, two passes."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.channel_first or x.dtype not in (torch.float32, torch.float64, *_LOW_PRECISION):
            return super().forward(x)
        bias = self.bias
        out_dtype = torch.promote_types(x.dtype, self.gamma.dtype)
        if isinstance(bias, Tensor):
            out_dtype = torch.promote_types(out_dtype, bias.dtype)
        inv_norm = _inverse_norm(x, cpu_reduction=x.device.type == "cpu")
        weight = (self.gamma * self.scale).to(inv_norm.dtype)  # half-precision x: normalized in float32, as diffusers
        if _needs_grad(x, self.gamma, bias):
            out = x * weight * inv_norm
        else:
            out = (x * weight).mul_(inv_norm)
        if isinstance(bias, Tensor) or bias != 0.0:
            out = out + bias
        return out.to(out_dtype)


_FAST = {WanCausalConv3d: FastWanCausalConv3d, WanRMS_norm: FastWanRMS_norm}
_EAGER = {fast: eager for eager, fast in _FAST.items()}


def _swap(vae: nn.Module, classes: dict, fn_name: str) -> nn.Module:
    if not isinstance(vae, AutoencoderKLWan):
        raise TypeError(f"`{fn_name}` takes a diffusers AutoencoderKLWan, got {type(vae).__name__}.")
    for module in vae.modules():
        # Exact types only: a user subclass may override what the fast class would bypass.
        if type(module) in classes:
            module.__class__ = classes[type(module)]
    return vae


def accelerate_wan_vae(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """Swap the VAE's causal convolutions and RMS norms for the faster versions above, in place.

    Idempotent; returns `vae`. Outputs (and gradients) equal diffusers' up to float rounding. Undo with
    `restore_wan_vae`.
    """
    return _swap(vae, _FAST, "accelerate_wan_vae")


def restore_wan_vae(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """Restore the diffusers classes swapped in by `accelerate_wan_vae`, in place; returns `vae`."""
    return _swap(vae, _EAGER, "restore_wan_vae")
