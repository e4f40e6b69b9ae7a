"""Image to video: the first latent frame is the (encoded) image, kept clean; the rest is generated."""

from __future__ import annotations

import torch

from ..conditioning import encode_conditioning
from ..tokenizers.vision import preprocess_image
from .common import Cosmos3PipelineBase


def _per_prompt(name: str, value, num_prompts: int, per_prompt: int, clips: bool = False) -> list:
    """One conditioning input per prompt (a single one is shared), repeated for each sample of that prompt.

    With `clips`, a list of PIL frames is one video, not one input per prompt."""
    one = not isinstance(value, (list, tuple)) or (clips and _is_clip(value))
    values = [value] if one else list(value)
    if len(values) == 1:
        values = values * num_prompts
    if len(values) != num_prompts:
        raise ValueError(f"`{name}` has {len(values)} entries for {num_prompts} prompts (give one, or one per prompt).")
    return [v for v in values for _ in range(per_prompt)]


def _is_clip(value) -> bool:
    """A list of frames (PIL images, or `[H, W, 3]` arrays/tensors) is one video, not a list of inputs."""
    import numpy as np
    from PIL import Image

    if not isinstance(value, (list, tuple)) or not value:
        return False
    first = value[0]
    return isinstance(first, Image.Image) or (isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim == 3)


class Cosmos3ImageToVideoPipeline(Cosmos3PipelineBase):
    r"""Generate videos that start from a given image (resized to cover the canvas and centre-cropped)."""

    @torch.no_grad()
    def __call__(
        self,
        image,
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
        """`image`: a PIL image, `[H, W, 3]` array or `[3, H, W]` tensor, or a list with one per prompt. `latents`:
        the initial noise `[B, C, T, h, w]`; the image's latent frame is put in place over it."""
        self.check_call(num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs)
        if image is None:
            raise ValueError("`image` is required for image-to-video.")
        if isinstance(num_frames, int) and num_frames == 1:  # other bad values: the size check names them
            raise ValueError("`num_frames` must be > 1 for image-to-video (1 frame would just be the image).")
        requests = self.prepare_requests(
            prompt, negative_prompt, num_per_prompt=num_videos_per_prompt, num_frames=num_frames, height=height,
            width=width, fps=fps, enable_sound=enable_sound, use_system_prompt=use_system_prompt,
            add_resolution_template=add_resolution_template, add_duration_template=add_duration_template)
        num_prompts = len(requests) // num_videos_per_prompt
        images = _per_prompt("image", image, num_prompts, num_videos_per_prompt)
        tokenizer = self.vision_tokenizer
        device = self._execution_device
        latent_t = requests[0].vision_shape[1]
        encoded: dict[int, torch.Tensor] = {}
        for r, img in zip(requests, images):
            if id(img) not in encoded:  # samples of one prompt share their image's latents
                frame = preprocess_image(img, height, width).to(device)  # [1, 3, H, W]
                # The reference encodes the image repeated to `num_frames`; latent frame 0, the only one read, is the
                # image's own encoding.
                encoded[id(img)] = encode_conditioning(tokenizer, frame.unsqueeze(2), (0,), latent_t)
            r.vision, r.vision_condition_frames = encoded[id(img)], (0,)
        return self._generate(
            requests, generator, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs), latents=latents,
        )
