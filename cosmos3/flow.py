"""Rectified flow as Cosmos 3 trains it (velocity prediction).

    x_t = t * noise + (1 - t) * x0          t in [0, 1], t = 1 is pure noise
    v   = noise - x0                         the regression target

Training timesteps come from a base distribution (`logitnormal` for images, sound and actions, `waver` for video)
and are then shifted toward noise with `shift_timesteps`, by an amount that grows with resolution
(`RESOLUTION_SHIFT`). Losses are masked: clean conditioning frames/tokens and zero-padded action channels carry
no loss, and the modalities are weighted (`LOSS_WEIGHTS`, times `LOSS_SCALE`).

Everything random takes a `torch.Generator`; nothing here touches the global RNG state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Shift by resolution tier (the short-side class of the canvas): 256p -> 3, 480p -> 5, 720p -> 10.
RESOLUTION_SHIFT: dict[int, float] = {256: 3.0, 480: 5.0, 720: 10.0}
# Canvas sizes of each tier (width x height at 16:9), used to classify an arbitrary canvas by pixel count.
RESOLUTION_TIER_PIXELS: dict[int, int] = {256: 320 * 192, 480: 832 * 480, 720: 1280 * 720}
# Per-modality loss weights and the global scale of the Cosmos 3 recipe.
LOSS_WEIGHTS: dict[str, float] = {"vision": 1.0, "sound": 2.0, "action": 10.0}
LOSS_SCALE = 10.0
TIMESTEP_DISTRIBUTIONS = ("logitnormal", "waver", "uniform")


def _broadcast(t: Tensor, like: Tensor) -> Tensor:
    """`[B]` (or scalar) -> `[B, 1, ...]` matching `like`'s rank."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.shape[0] != like.shape[0]:
        raise ValueError(f"`t` has {t.shape[0]} values but the batch has {like.shape[0]} samples.")
    return t.view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, t: Tensor | float, clean_mask: Tensor | None = None) -> Tensor:
    """`x_t = t * noise + (1 - t) * x0`, leaving positions where `clean_mask` is 1 at `x0` (conditioning).

    `t` is a scalar or one value per sample (`[B]`); `clean_mask` broadcasts against `x0`.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"`noise` shape {tuple(noise.shape)} must equal `x0` shape {tuple(x0.shape)}.")
    t = _broadcast(t, x0)
    x_t = t * noise + (1 - t) * x0
    if clean_mask is not None:
        x_t = torch.where(clean_mask.bool(), x0, x_t)
    return x_t


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity the model regresses: `noise - x0` (so `x0 = x_t - t * v`)."""
    return noise - x0


def predict_x0(x_t: Tensor, velocity: Tensor, t: Tensor | float) -> Tensor:
    """Invert the interpolation with a predicted velocity: `x0 = x_t - t * v`."""
    return x_t - _broadcast(t, x_t) * velocity


def sample_timesteps(
    n: int,
    distribution: str = "logitnormal",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> Tensor:
    """Draw `n` training timesteps in (0, 1) from `distribution`.

    * `logitnormal`: `sigmoid(N(logit_mean, logit_std))`;
    * `waver`: `t = 1 - u - 1.29 * (cos^2(pi u / 2) - 1 + u)` with `u ~ U(0, 1)`: symmetric about 1/2, with
      about half as many samples in each outer quarter as uniform (used for video);
    * `uniform`: `U(0, 1)`.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive int, got {n!r}.")
    if distribution == "logitnormal":
        if logit_std <= 0:
            raise ValueError(f"`logit_std` must be > 0, got {logit_std}.")
        z = torch.randn(n, generator=generator, device=device) * logit_std + logit_mean
        return torch.sigmoid(z)
    u = torch.rand(n, generator=generator, device=device)
    if distribution == "uniform":
        return u
    if distribution == "waver":
        return (1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)).clamp(0.0, 1.0)
    raise ValueError(f"Unknown timestep `distribution` {distribution!r}; valid: {list(TIMESTEP_DISTRIBUTIONS)}.")


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """`s * t / (1 + (s - 1) * t)`: moves timesteps toward noise for `s > 1` (larger canvases need more noise)."""
    if not shift > 0:
        raise ValueError(f"`shift` must be > 0, got {shift!r}.")
    return shift * t / (1 + (shift - 1) * t)


def resolution_tier(height: int, width: int) -> int:
    """The resolution tier (256, 480 or 720) whose canvas is closest in pixel count (log scale)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"`height` and `width` must be positive, got ({height}, {width}).")
    pixels = height * width
    return min(RESOLUTION_TIER_PIXELS, key=lambda tier: abs(math.log(pixels / RESOLUTION_TIER_PIXELS[tier])))


def resolution_shift(height: int, width: int) -> float:
    """The timestep shift the recipe uses for a `height x width` canvas."""
    return RESOLUTION_SHIFT[resolution_tier(height, width)]


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over the positions where `mask` is 1, averaged per sample then over the batch.

    `mask` broadcasts against `pred` (e.g. `[B, 1, T, 1, 1]` for noisy frames, `[B, T, D]` for actions with
    padded channels). A sample with nothing to predict contributes nothing.
    """
    if pred.shape != target.shape:
        raise ValueError(f"`pred` shape {tuple(pred.shape)} must equal `target` shape {tuple(target.shape)}.")
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.flatten(1).mean(1).mean()
    mask = torch.broadcast_to(mask.to(err.dtype), err.shape)
    per_sample = (err * mask).flatten(1).sum(1)
    counts = mask.flatten(1).sum(1)
    has_any = counts > 0
    if not has_any.any():
        return err.sum() * 0.0
    return (per_sample[has_any] / counts[has_any]).mean()


def flow_matching_loss(
    losses: dict[str, Tensor], weights: dict[str, float] | None = None, scale: float = LOSS_SCALE
) -> Tensor:
    """Combine per-modality losses: `scale * sum(weights[m] * losses[m])`."""
    weights = LOSS_WEIGHTS if weights is None else weights
    unknown = sorted(set(losses) - set(weights))
    if unknown:
        raise ValueError(f"No loss weight for modalities {unknown}; weights are given for {sorted(weights)}.")
    return scale * sum(weights[name] * loss for name, loss in losses.items())
