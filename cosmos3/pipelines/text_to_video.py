"""Text to video (with optional sound), and text to image as its one-frame case."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import BaseOutput

from .common import Cosmos3PipelineBase


class Cosmos3TextToVideoPipeline(Cosmos3PipelineBase):
    r"""Generate videos (and their sound, with `enable_sound=True`) from text prompts.

    Defaults follow the reference: 189 frames at 720x1280, 24 fps, 35 steps, guidance 6.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 189,
        height: int = 720,
        width: int = 1280,
        fps: float = 24.0,
        num_inference_steps: int = 35,
        guidance_scale: float = 6.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        enable_sound: bool = False,
        use_system_prompt: bool | None = None,
        add_resolution_template: bool = True,
        add_duration_template: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Generate one video per prompt x `num_videos_per_prompt`; see `Cosmos3PipelineOutput`. `latents`: the
        initial noise, `[B, C, T, h, w]` for the B samples (see `Cosmos3PipelineBase.prepare_latents`)."""
        self.check_call(num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs)
        requests = self.prepare_requests(
            prompt, negative_prompt, num_per_prompt=num_videos_per_prompt, num_frames=num_frames, height=height,
            width=width, fps=fps, enable_sound=enable_sound, use_system_prompt=use_system_prompt,
            add_resolution_template=add_resolution_template, add_duration_template=add_duration_template)
        return self._generate(
            requests, generator, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs), latents=latents,
        )


@dataclass
class Cosmos3ImagePipelineOutput(BaseOutput):
    """`images`: PIL images, `[B, H, W, 3]` (`np`) / `[B, 3, H, W]` (`pt`) in [0, 1], or latents `[B, C, 1, h, w]`."""

    images: list | np.ndarray | torch.Tensor


class Cosmos3TextToImagePipeline(Cosmos3PipelineBase):
    r"""Generate images from text prompts (a one-frame video; reference call defaults: 35 steps, guidance 6)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int = 720,
        width: int = 1280,
        num_inference_steps: int = 35,
        guidance_scale: float = 6.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        use_system_prompt: bool | None = None,
        add_resolution_template: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Generate one image per prompt x `num_images_per_prompt`; see `Cosmos3ImagePipelineOutput`. `latents`: the
        initial noise, `[B, C, 1, h, w]` for the B samples."""
        self.check_call(num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs)
        # The reference passes 24 fps for an image (no duration sentence is written for one frame).
        requests = self.prepare_requests(
            prompt, negative_prompt, num_per_prompt=num_images_per_prompt, num_frames=1, height=height, width=width,
            fps=24.0, use_system_prompt=use_system_prompt, add_resolution_template=add_resolution_template)
        frames, *_ = self._generate(
            requests, generator, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            output_type=output_type, return_dict=False, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs), latents=latents,
        )
        images = [f[0] for f in frames] if output_type == "pil" else frames if output_type == "latent" else frames[:, 0]
        if not return_dict:
            return (images,)
        return Cosmos3ImagePipelineOutput(images=images)
