"""What conditions a Cosmos 3 sample: one request type shared by the pipelines, training, distillation and the policy.

A sample is text (the prompt's ids, and its negative for guidance) plus generated streams (vision latents, sound,
actions), each with some positions *clean* (given, never noised, never predicted) and the rest *noisy*. Every task is
a choice of what is clean:

| task | clean vision latent frames | actions |
|---|---|---|
| text to image / video | none | none |
| image to video | frame 0 | none |
| video to video | the conditioning indexes | none |
| `policy` | frame 0 | all generated |
| `forward_dynamics` | frame 0 | all clean |
| `inverse_dynamics` | every frame | all generated |

`Cosmos3Request` says this once. A pipeline builds requests from its call arguments and samples them; the trainer
noises their clean latents at a random time; distillation simulates the student on them; the policy builds them from
observations. All of them lay a request out for the model with `to_sample()`, blend clean positions back with
`keep_clean`, and re-noise a distilled student's prediction with `renoise` — so what is clean means the same thing
everywhere.

Also here, because more than one caller needs exactly the same rule: the size rules of the Wan VAE (`check_video_size`),
the world-action canvas (`RESOLUTION_BINS`, `action_canvas`), which frames each world-action mode gives
(`action_mode_conditioning`), camera tiling (`tile_cameras`) and the causal conditioning encode (`encode_conditioning`).

This module sits between the model (`cosmos3.models`, `cosmos3.tokenizers`) and its users (`cosmos3.pipelines`,
`cosmos3.training`, `cosmos3.robotics`); it imports nothing above it (see the README's "Layers").
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import flow
from .models.layout import Cosmos3Sample
from .tokenizers.text import ACTION_MODES
from .tokenizers.vision import (
    Cosmos3VisionTokenizer,
    check_multiple,
    check_num_frames,
    check_video_size,
    preprocess_video,
)

# ---------------------------------------------------------------------------------------------------------------
# Size and device rules (the VAE's size rules live with the VAE, `cosmos3.tokenizers.vision`)
# ---------------------------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def resolve_device(device: str | torch.device | None, name: str = "device") -> torch.device:
    """The device a request runs on: `device`, or CUDA when there is one; a CUDA device on a machine without CUDA is
    refused here, before anything loads, rather than deep in the first kernel."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"`{name}` {device!r} is not a torch device: {e}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`{name}` {device!r}: CUDA is not available here (use 'cpu').")
    return resolved


# ---------------------------------------------------------------------------------------------------------------
# World-action canvases and modes
# ---------------------------------------------------------------------------------------------------------------

# Canvases (height, width) of each resolution tier by aspect ratio (height / width). 256-720 are the reference's;
# 64 and 128 are cosmos3's, for small models (Cosmos3-Tiny runs its policy at 64): every side a multiple of 32 (the
# VAE's 16x times the transformer's 2x2 patches), aspect buckets as close to the reference's as that allows.
RESOLUTION_BINS: dict[int, dict[str, tuple[int, int]]] = {
    64: {"1.0": (64, 64), "0.5": (64, 128), "2.0": (128, 64)},
    128: {"1.0": (128, 128), "0.8": (128, 160), "1.25": (160, 128), "0.6": (96, 160),
          "1.6666666666666667": (160, 96)},
    256: {"1.0": (256, 256), "0.8": (256, 320), "1.25": (320, 256), "0.6": (192, 320),
          "1.6666666666666667": (320, 192)},
    480: {"1.0": (640, 640), "0.7391304347826086": (544, 736), "1.3529411764705883": (736, 544),
          "0.5769230769230769": (480, 832), "1.7333333333333334": (832, 480)},
    704: {"1.0": (960, 960), "0.7647058823529411": (832, 1088), "1.3076923076923077": (1088, 832),
          "0.55": (704, 1280), "1.8181818181818181": (1280, 704)},
    720: {"1.0": (960, 960), "0.7536231884057971": (832, 1104), "1.3269230769230769": (1104, 832),
          "0.5625": (720, 1280), "1.7777777777777777": (1280, 720)},
}  # fmt: skip


def action_mode_conditioning(mode: str, latent_frames: int, chunk_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(clean vision latent frames, clean action tokens)` of a world-action mode (the module docstring's table)."""
    if mode not in ACTION_MODES:
        raise ValueError(f"`mode` must be one of {list(ACTION_MODES)}, got {mode!r}.")
    vision = tuple(range(latent_frames)) if mode == "inverse_dynamics" else (0,)
    actions = tuple(range(chunk_size)) if mode == "forward_dynamics" else ()
    return vision, actions


def action_canvas(clip, tier: int, num_frames: int, *, name: str = "video") -> tuple[Tensor, int, int, int, int]:
    """Place a clip on its tier's canvas: returns `[1, 3, num_frames, H, W]`, canvas `(H, W)`, content `(h, w)`.

    The canvas is the tier's bucket closest in aspect ratio; the clip is downscaled to fit (never upscaled; bicubic,
    antialiased), padded right/bottom, and too short a clip holds its last frame, as the reference does."""
    from diffusers.video_processor import VideoProcessor

    if tier not in RESOLUTION_BINS:
        raise ValueError(f"`resolution_tier` must be one of {sorted(RESOLUTION_BINS)}, got {tier!r}.")
    frames = preprocess_video(clip, name=name)  # [1, 3, F, H, W] in [-1, 1]
    source_h, source_w = frames.shape[-2:]
    height, width = VideoProcessor.classify_height_width_bin(source_h, source_w, ratios=RESOLUTION_BINS[tier])
    if frames.shape[2] < num_frames:  # too short: hold the last frame
        frames = torch.cat([frames, frames[:, :, -1:].expand(-1, -1, num_frames - frames.shape[2], -1, -1)], dim=2)
    frames = frames[:, :, :num_frames]
    scale = min(width / source_w, height / source_h, 1.0)
    content_h, content_w = max(1, int(scale * source_h + 0.5)), max(1, int(scale * source_w + 0.5))
    flat = frames.permute(0, 2, 1, 3, 4).reshape(-1, 3, source_h, source_w)  # [F, 3, H, W]
    if (content_h, content_w) != (source_h, source_w):
        flat = F.interpolate(flat, size=(content_h, content_w), mode="bicubic", align_corners=False, antialias=True)
    pad_right, pad_bottom = width - content_w, height - content_h
    if pad_right or pad_bottom:
        # reflect needs a pad smaller than the content; wider gaps are filled by repeating the edge
        mode = "replicate" if pad_right >= content_w or pad_bottom >= content_h else "reflect"
        flat = F.pad(flat, (0, pad_right, 0, pad_bottom), mode=mode)
    canvas = flat.reshape(1, num_frames, 3, height, width).permute(0, 2, 1, 3, 4)
    return canvas, height, width, content_h, content_w


def tile_cameras(frames: Mapping[str, np.ndarray], cameras: Sequence[str] | None = None) -> np.ndarray:
    """The cameras' uint8 `[T, H, W, 3]` clips side by side (left to right in `cameras` order) as one clip.

    The world-action model reads one clip; several views go in as one wide frame (the `concat_view` caption), the
    same way in training (`ExampleEncoder`) and in the policy (`Cosmos3Policy`). Cameras of another height are resized
    (aspect kept, bilinear, antialiased) to the first one's height. Names are feature keys or their last part
    (`"front"` for `"observation.images.front"`).
    """
    keys = list(frames) if cameras is None else [_camera_key(frames, c) for c in cameras]
    if not keys:
        raise ValueError("The sample has no camera frames.")
    clips = [np.asarray(frames[k]) for k in keys]
    for k, clip in zip(keys, clips):
        if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
            raise ValueError(f"Camera {k!r}: frames must be uint8 [T, H, W, 3], got {clip.dtype} {clip.shape}.")
    lengths = {len(c) for c in clips}
    if len(lengths) > 1:
        raise ValueError(f"Cameras {keys} have different frame counts {[len(c) for c in clips]}.")
    if len(clips) == 1:
        return clips[0]
    height = clips[0].shape[1]
    out = []
    for clip in clips:
        if clip.shape[1] != height:
            width = max(1, round(clip.shape[2] * height / clip.shape[1]))
            x = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
            clip = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out.append(clip)
    return np.concatenate(out, axis=2)


def _camera_key(frames: Mapping, camera: str) -> str:
    matches = [k for k in frames if k == camera or k.rsplit(".", 1)[-1] == camera]
    if len(matches) != 1:
        raise ValueError(f"`cameras` entry {camera!r} names {len(matches)} of the sample's cameras {list(frames)}.")
    return matches[0]


# ---------------------------------------------------------------------------------------------------------------
# Conditioning latents
# ---------------------------------------------------------------------------------------------------------------


def encode_conditioning(
    tokenizer: Cosmos3VisionTokenizer, clip: Tensor, condition_frames: tuple[int, ...], latent_frames: int
) -> Tensor:
    """Clean latents `[C, latent_frames, h, w]` of `clip` `[1, 3, F, H, W]` at `condition_frames`, zeros after the last.

    The Wan VAE is causal in time: latent frame k depends on pixel frames 0..4k only, and equals what encoding just
    those frames gives (to float rounding: the convolutions may pick other kernels for other input strides). So only
    the pixels up to the last conditioning frame are encoded (`clip` needs no more than those): one frame for
    image-to-video, a policy or forward dynamics, where the reference encodes the whole clip. The latent frames past
    it are never read (`keep_clean` reads only the clean frames) and are left zero.
    """
    tf = tokenizer.temporal_factor
    last = max(condition_frames)
    if min(condition_frames) < 0 or last >= latent_frames:
        raise ValueError(f"condition frames {list(condition_frames)} are outside the {latent_frames} latent frames "
                         f"(valid: 0..{latent_frames - 1}).")
    if clip.shape[2] < 1 + tf * last:
        raise ValueError(f"latent frame {last} needs {1 + tf * last} pixel frames, the clip has {clip.shape[2]}.")
    prefix = tokenizer.encode(clip[:, :, : 1 + tf * last].contiguous())[0]  # [C, last + 1, h, w]
    return torch.cat([prefix, prefix.new_zeros(prefix.shape[0], latent_frames - 1 - last, *prefix.shape[2:])], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Cosmos3Request:
    """One sample: its prompt and, per generated stream, the clean values and which positions are clean.

    Args:
        text_ids: the prompt's token ids (chat-templated, as `cosmos3.tokenizers.text.encode_prompts` builds them).
        vision: clean vision latents `[C, T, h, w]`. Training reads every frame (the loss target); sampling reads
            only `vision_condition_frames` (other frames may be anything, e.g. zeros). None: nothing clean.
        vision_condition_frames: latent frames given clean (no timestep, no prediction, no loss).
        fps: the clip's frame rate (position ids and prompt); None for images.
        sound: clean sound latents `[C_s, T_s]` (training), or None.
        action: actions `[N, action_dim]` padded to the model's width: clean values at `action_condition_frames`
            (training: everywhere), zeros elsewhere. None: no action stream.
        action_condition_frames: action tokens given clean (forward dynamics).
        action_domain_id: the embodiment's domain id.
        raw_action_dim: the embodiment's unpadded width: channels past it carry no loss and are held at zero.
        negative_ids: the negative prompt's ids (the unconditional pass of guidance); None: no negative pass.
        vision_shape: the latent shape `(C, T, h, w)`; taken from `vision` when that is given.
        sound_length: sound latent frames to generate; taken from `sound` when that is given.
        control: transfer's control latents `[N, C, T, h, w]` (one clip per hint: edge, blur, ...), laid out before
            the target, every frame clean, each at the target's own positions; None: no control clips.
    """

    text_ids: Sequence[int]
    vision: Tensor | None = None
    vision_condition_frames: tuple[int, ...] = ()
    fps: float | None = None
    sound: Tensor | None = None
    action: Tensor | None = None
    action_condition_frames: tuple[int, ...] = ()
    action_domain_id: int = 0
    raw_action_dim: int | None = None
    negative_ids: Sequence[int] | None = None
    vision_shape: tuple[int, int, int, int] | None = None
    sound_length: int = 0
    control: Tensor | None = None

    def __post_init__(self):
        if self.vision is not None:
            if not isinstance(self.vision, Tensor) or self.vision.ndim != 4:
                got = tuple(self.vision.shape) if isinstance(self.vision, Tensor) else type(self.vision).__name__
                raise ValueError(f"`vision` must be clean latents [C, T, h, w], got {got}.")
            if self.vision_shape is not None and tuple(self.vision_shape) != tuple(self.vision.shape):
                raise ValueError(f"`vision_shape` {tuple(self.vision_shape)} differs from `vision`'s shape "
                                 f"{tuple(self.vision.shape)}.")
            self.vision_shape = tuple(self.vision.shape)
        if self.vision_shape is None or len(self.vision_shape) != 4 or not all(
                _is_int(n) and n > 0 for n in self.vision_shape):
            raise ValueError(f"`vision_shape` must be 4 positive ints (C, T, h, w) (or give `vision`), got "
                             f"{self.vision_shape!r}.")
        self.vision_shape = tuple(int(n) for n in self.vision_shape)
        self.vision_condition_frames = tuple(self.vision_condition_frames)
        self.action_condition_frames = tuple(self.action_condition_frames)
        if self.vision_condition_frames and self.vision is None:
            raise ValueError("`vision_condition_frames` needs `vision`, the clean latents of those frames.")
        if self.sound is not None:
            if self.sound.ndim != 2:
                raise ValueError(f"`sound` must be latents [C_s, T_s], got shape {tuple(self.sound.shape)}.")
            self.sound_length = int(self.sound.shape[1])
        if not _is_int(self.sound_length) or self.sound_length < 0:
            raise ValueError(f"`sound_length` must be an int >= 0, got {self.sound_length!r}.")
        if self.action is not None and self.action.ndim != 2:
            raise ValueError(f"`action` must be [N, action_dim], got shape {tuple(self.action.shape)}.")
        if self.action_condition_frames and self.action is None:
            raise ValueError("`action_condition_frames` needs `action`, the clean values of those tokens.")
        if self.control is not None and (self.control.ndim != 5 or tuple(self.control.shape[1:]) != self.vision_shape):
            raise ValueError(f"`control` must be [N, *vision_shape] = [N, {', '.join(map(str, self.vision_shape))}], "
                             f"got shape {tuple(self.control.shape)}.")

    @property
    def action_length(self) -> int:
        return 0 if self.action is None else int(self.action.shape[0])

    def to_sample(self, negative: bool = False, controls: bool = True) -> Cosmos3Sample:
        """The model's static description of this sample (`Cosmos3Layout.build` input); with `negative`, the
        guidance pass's twin reading `negative_ids`; without `controls`, transfer's "no control" pass (the hints
        dropped). With control clips the vision segment is `[control_1 | ... | control_N | target]`."""
        if negative and self.negative_ids is None:
            raise ValueError("This request has no `negative_ids` for the guidance pass.")
        _, T, h, w = self.vision_shape
        items = 1 if self.control is None or not controls else self.control.shape[0] + 1
        offset = (items - 1) * T  # the control frames come first and are all clean
        return Cosmos3Sample(
            text_ids=list(self.negative_ids if negative else self.text_ids), vision_shape=(items * T, h, w),
            fps=self.fps, vision_condition_frames=(*range(offset), *(offset + f for f in self.vision_condition_frames)),
            sound_length=self.sound_length, action_length=self.action_length,
            action_condition_frames=self.action_condition_frames, action_domain_id=self.action_domain_id,
            vision_items=items,
        )

    def model_vision(self, x: Tensor, controls: bool = True) -> Tensor:
        """The vision input of `to_sample(controls=controls)` for target latents `x` `[C, T, h, w]`: the control
        clips (in `x`'s dtype) before it along time."""
        if self.control is None or not controls:
            return x
        return torch.cat([*self.control.to(x), x], dim=1)

    def clean_mask(self, stream: str, device: torch.device | str | None = None) -> Tensor:
        """1 at clean positions, 0 at noisy ones, shaped to broadcast against the stream's latents: vision
        `[1, T, 1, 1]` (against `[C, T, h, w]`), sound `[1, T_s]`, action `[N, 1]`."""
        if stream == "vision":
            mask = torch.zeros(1, self.vision_shape[1], 1, 1, device=device)
            mask[:, list(self.vision_condition_frames)] = 1.0
        elif stream == "sound":
            mask = torch.zeros(1, self.sound_length, device=device)
        elif stream == "action":
            mask = torch.zeros(self.action_length, 1, device=device)
            mask[list(self.action_condition_frames)] = 1.0
        else:
            raise ValueError(f"`stream` must be 'vision', 'sound' or 'action', got {stream!r}.")
        return mask

    def loss_mask(self, stream: str) -> Tensor:
        """Where the stream carries loss: its noisy positions, and for actions only the `raw_action_dim` channels."""
        x0 = {"vision": self.vision, "sound": self.sound, "action": self.action}[stream]
        mask = (1.0 - self.clean_mask(stream)).expand_as(x0).clone()
        if stream == "action" and self.raw_action_dim is not None:
            mask[:, self.raw_action_dim :] = 0.0  # padded channels carry no loss
        return mask


# ---------------------------------------------------------------------------------------------------------------
# Clean positions and re-noising
# ---------------------------------------------------------------------------------------------------------------


def keep_clean(x: Tensor, clean: Tensor | None, mask: Tensor) -> Tensor:
    """`x` with the clean values put back where `mask` is 1 (`mask * clean + (1 - mask) * x`, so a mask of zeros
    returns `x` unchanged whatever `clean` holds)."""
    if clean is None:
        return x
    mask = mask.to(x)
    return mask * clean.to(x) + (1.0 - mask) * x


def renoise(x: Tensor, velocity: Tensor, sigma: float, next_sigma: float, noise: Tensor) -> Tensor:
    """One step of the distilled students' sampler: predict `x0 = x - sigma * v`, then noise it afresh to
    `next_sigma` (`(1 - s') x0 + s' noise`), as `FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)` steps.
    The caller puts clean positions back (`keep_clean`): re-noising touches every position."""
    return flow.add_noise(flow.predict_x0(x, velocity, sigma), noise, next_sigma)


def guide(conditional: Tensor, unconditional: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance `v_u + g (v_c - v_u)`."""
    return unconditional + guidance_scale * (conditional - unconditional)


__all__ = [
    "ACTION_MODES",
    "RESOLUTION_BINS",
    "Cosmos3Request",
    "action_canvas",
    "action_mode_conditioning",
    "check_multiple",
    "check_num_frames",
    "check_video_size",
    "encode_conditioning",
    "guide",
    "keep_clean",
    "renoise",
    "resolve_device",
    "tile_cameras",
]
