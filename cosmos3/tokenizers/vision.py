"""Vision tokenizer: the Wan 2.2 VAE (16x16 spatial, 4x temporal, 48 channels) as Cosmos 3 uses it.

* Latents are normalized per channel with the VAE's `latents_mean` / `latents_std`, computed in the VAE's dtype
  exactly as the reference pipeline does (`(mu - mean) * (1 / std)`), from the posterior mode (no sampling).
* Sizes are checked, never rounded: frames must be `1 + 4k` (the causal VAE encodes the first frame alone, then
  groups of 4; other counts would silently lose frames), height and width multiples of 16.
* `iter_decode` decodes one latent frame at a time, carrying the causal convolution cache, so a long video decodes
  with memory bounded by one chunk (1 frame, then 4 per latent frame) instead of the whole clip; the frames are
  identical to a one-shot `decode`. `decode(tiled=True)` additionally tiles spatially (the VAE's own tiling).
* Conditioning images are resized preserving aspect ratio to cover the canvas, then centre-cropped (as the
  reference); videos go through diffusers' `VideoProcessor` exactly as the reference pipeline calls it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from PIL import Image
from torch import Tensor

from .fast_wan import accelerate_wan_vae


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_num_frames(num_frames, temporal_factor: int = 4, *, name: str = "`num_frames`") -> None:
    """Refuse a frame count the causal VAE would cut: `1 + tf*k` (the first frame alone, then groups of `tf`).
    `name` is how the message calls the value (the demo says "Frames")."""
    if not _is_int(num_frames) or num_frames < 1:
        raise ValueError(f"{name} must be a positive int, got {num_frames!r}.")
    tf = temporal_factor
    if (num_frames - 1) % tf:
        lower = (num_frames - 1) // tf * tf + 1
        raise ValueError(f"{name} must be 1 + {tf}k, got {num_frames} (nearest: {lower}, {lower + tf}).")


def check_multiple(value, factor: int = 16, *, name: str) -> None:
    """Refuse a side the VAE would round: a positive multiple of `factor`, naming the nearest valid ones."""
    if not _is_int(value) or value < factor or value % factor:
        lower = max(factor, (value // factor) * factor) if _is_int(value) else factor
        raise ValueError(f"{name} must be a multiple of {factor}, got {value!r} (nearest: {lower}, {lower + factor}).")


def check_video_size(num_frames, height, width, *, temporal_factor: int = 4, spatial_factor: int = 16) -> None:
    """Refuse a pixel size the VAE would round: frames `1 + tf*k`, height and width multiples of `spatial_factor`
    (the nearest valid values are named, never picked silently)."""
    if not _is_int(num_frames) or num_frames < 1:
        raise ValueError(f"`num_frames` must be a positive int, got {num_frames!r}.")
    check_multiple(height, spatial_factor, name="`height`")
    check_multiple(width, spatial_factor, name="`width`")
    check_num_frames(num_frames, temporal_factor)


def preprocess_image(image, height: int, width: int) -> Tensor:
    """One RGB image (PIL, `[H, W, 3]` array, or `[3, H, W]` tensor) -> `[1, 3, height, width]` in [-1, 1].

    Integer input is read as 0..255; float input as [-1, 1] when it has negative values, [0, 1] when its maximum is
    at most 1, else 0..255. The image is resized (bilinear, antialiased) to cover the canvas, centre-cropped, and
    quantized to 8 bits, as the reference does.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        image = torch.from_numpy(np.array(image.convert("RGB"), copy=True)).permute(2, 0, 1).unsqueeze(0)
    elif isinstance(image, np.ndarray):
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise ValueError(f"`image` as an array must be [H, W, 3] RGB, got shape {image.shape}.")
        image = torch.from_numpy(image)
        image = (image.unsqueeze(0) if image.ndim == 3 else image).permute(0, 3, 1, 2)
    elif isinstance(image, Tensor):
        image = image.unsqueeze(0) if image.ndim == 3 else image
    else:
        raise TypeError(f"`image` must be a PIL image, numpy array or tensor, got {type(image).__name__}.")
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3 or min(image.shape[-2:]) < 1:
        raise ValueError(f"`image` must be one non-empty RGB image, got shape {tuple(image.shape)}.")
    integer = not image.is_floating_point()
    image = image.to(torch.float32)
    if not integer:
        if image.min() < 0:
            image = (image + 1.0) * 127.5
        elif image.max() <= 1.0:
            image = image * 255.0
    src_h, src_w = image.shape[-2:]
    scale = max(width / src_w, height / src_h)
    resized_h, resized_w = math.ceil(scale * src_h), math.ceil(scale * src_w)
    image = F.interpolate(image, size=(resized_h, resized_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = round((resized_h - height) / 2), round((resized_w - width) / 2)
    image = image[:, :, top : top + height, left : left + width]
    return image.round().clamp(0, 255) / 127.5 - 1.0


def preprocess_video(video, height: int | None = None, width: int | None = None, *, name: str = "video") -> Tensor:
    """A clip (PIL frames, uint8 `[T, H, W, 3]` frames, float ones in [0, 1], or a tensor) -> `[1, 3, T, H, W]`
    in [-1, 1].

    The reference pipeline runs diffusers' `VideoProcessor(vae_scale_factor=16, resample="bilinear")` on
    conditioning videos; we call it the same way so the conditioning frames are identical.
    """
    from diffusers.video_processor import VideoProcessor

    # diffusers reads numpy frames as floats in [0, 1]: uint8 frames (what decoders and simulators give) would come
    # out 255x too bright, so they go through PIL like the reference's PIL inputs
    if isinstance(video, np.ndarray) and video.dtype == np.uint8:
        video = list(video)
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError(f"`{name}` is empty: give at least one frame.")
        for i, frame in enumerate(video):
            if not isinstance(frame, (np.ndarray, Tensor, Image.Image)):
                raise TypeError(f"`{name}` frame {i} must be a PIL image, numpy array or tensor, got "
                                f"{type(frame).__name__}.")
            rgb = isinstance(frame, (np.ndarray, Tensor)) and frame.ndim == 3 and 3 in (frame.shape[-1], frame.shape[0])
            if isinstance(frame, (np.ndarray, Tensor)) and not rgb:
                raise ValueError(f"`{name}` frame {i} must be an RGB image ([H, W, 3] or [3, H, W]), got shape "
                                 f"{tuple(frame.shape)} (grayscale and RGBA images: convert them to RGB).")
            size = frame.size if isinstance(frame, Image.Image) else (
                frame.shape[:2] if frame.shape[-1] == 3 else frame.shape[1:])
            if min(size) < 16:
                raise ValueError(f"`{name}` frame {i} is {size[0]}x{size[1]} pixels; frames must be at least 16x16 "
                                 "(the VAE's 16x downsampling).")
        if all(isinstance(f, np.ndarray) and f.dtype == np.uint8 for f in video):
            video = [Image.fromarray(np.ascontiguousarray(f)) for f in video]
        # grayscale, palette or RGBA PIL images are read as RGB, as image-to-video reads them (RGB ones are unchanged)
        video = [f.convert("RGB") if isinstance(f, Image.Image) and f.mode != "RGB" else f for f in video]
    return VideoProcessor(vae_scale_factor=16, resample="bilinear").preprocess_video(video, height=height, width=width)


def postprocess_video(video: Tensor) -> np.ndarray:
    """`[B, 3, T, H, W]` in [-1, 1] -> uint8 `[B, T, H, W, 3]`."""
    video = ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu().numpy()


class Cosmos3VisionTokenizer:
    """Pixels <-> normalized latents with a diffusers `AutoencoderKLWan` (Wan 2.2 layout: `patch_size=2`)."""

    def __init__(self, vae):
        if isinstance(vae, AutoencoderKLWan):
            # Same outputs, faster convolutions and norms (cosmos3.tokenizers.fast_wan), for every user of the VAE
            # through this class: pipelines, training data, evaluation. In place: `restore_wan_vae(vae)` undoes it.
            accelerate_wan_vae(vae)
        self.vae = vae
        self.spatial_factor = int(vae.config.scale_factor_spatial)
        self.temporal_factor = int(vae.config.scale_factor_temporal)
        self.latent_channels = int(vae.config.z_dim)

    def _stats(self, device) -> tuple[Tensor, Tensor]:
        # In the VAE's dtype, inverse included, like the reference: bf16 VAEs get bf16 statistics.
        dtype = self.vae.dtype
        mean = torch.tensor(self.vae.config.latents_mean, dtype=dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std, dtype=dtype)
        return mean.to(device).view(1, -1, 1, 1, 1), inv_std.to(device).view(1, -1, 1, 1, 1)

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        """Raise unless `num_frames` is `1 + tf*k` and `height`/`width` are multiples of the spatial factor."""
        check_video_size(num_frames, height, width, temporal_factor=self.temporal_factor,
                         spatial_factor=self.spatial_factor)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, T, H, W)` of the latents of a `num_frames x height x width` clip."""
        self.check_size(num_frames, height, width)
        tf, sf = self.temporal_factor, self.spatial_factor
        return self.latent_channels, (num_frames - 1) // tf + 1, height // sf, width // sf

    def normalize(self, raw: Tensor) -> Tensor:
        mean, inv_std = self._stats(raw.device)
        return (raw - mean) * inv_std

    def denormalize(self, latents: Tensor) -> Tensor:
        mean, inv_std = self._stats(latents.device)
        return latents.to(self.vae.dtype) / inv_std + mean

    @torch.no_grad()
    def encode(self, video: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """`[B, 3, T, H, W]` in [-1, 1] -> normalized latents `[B, C, T', H/16, W/16]` in the input dtype.

        The posterior mode by default (as the reference); `sample=True` draws from the posterior with `generator`.
        """
        if not isinstance(video, Tensor) or video.ndim != 5 or video.shape[1] != 3 or not video.is_floating_point():
            got = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
            raise ValueError(f"`video` must be a float tensor [B, 3, T, H, W] in [-1, 1], got {got}.")
        self.check_size(video.shape[2], video.shape[3], video.shape[4])
        posterior = self.vae.encode(video.to(self.vae.dtype)).latent_dist
        raw = posterior.sample(generator) if sample else posterior.mode()
        return self.normalize(raw).to(video.dtype)

    def _check_latents(self, latents: Tensor) -> None:
        if not isinstance(latents, Tensor) or latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"`latents` must be [B, {self.latent_channels}, T, H, W], got {got}.")

    @torch.no_grad()
    def decode(self, latents: Tensor, *, tiled: bool = False) -> Tensor:
        """Normalized latents `[B, C, T', h, w]` -> video `[B, 3, 1 + 4(T'-1), 16h, 16w]` in [-1, 1]."""
        self._check_latents(latents)
        was_tiling = getattr(self.vae, "use_tiling", False)
        if tiled:
            self.vae.enable_tiling()
        try:
            return self.vae.decode(self.denormalize(latents)).sample.to(latents.dtype)
        finally:
            if tiled and not was_tiling:
                self.vae.disable_tiling()

    @torch.no_grad()
    def iter_decode(self, latents: Tensor) -> Iterator[Tensor]:
        """Decode one latent frame at a time: yields `[B, 3, t, H, W]` pixel chunks (t = 1, then 4, 4, ...).

        Runs the VAE decoder's causal loop with its feature cache carried between chunks, so the concatenated chunks
        equal `decode(latents)` while memory holds one chunk at a time.
        """
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify as wan_unpatchify

        self._check_latents(latents)
        vae = self.vae
        x = vae.post_quant_conv(self.denormalize(latents))  # a 1x1x1 conv: per frame, cheap to do at once
        # This stream's own causal cache (not the VAE's shared one): other decodes and streams on the same VAE,
        # interleaved with this one, neither corrupt it nor are corrupted by it.
        cache = [None] * vae._cached_conv_counts["decoder"]
        for i in range(x.shape[2]):
            out = vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
            if vae.config.patch_size is not None:
                out = wan_unpatchify(out, patch_size=vae.config.patch_size)
            yield out.clamp(-1.0, 1.0).to(latents.dtype)
