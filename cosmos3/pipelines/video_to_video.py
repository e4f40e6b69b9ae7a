"""Video to video: the leading (or trailing) frames of a clip condition the first latent frames."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..conditioning import encode_conditioning
from ..tokenizers.vision import preprocess_video
from .common import Cosmos3PipelineBase
from .image_to_video import _per_prompt


class Cosmos3VideoToVideoPipeline(Cosmos3PipelineBase):
    r"""Continue a video: latent frames `condition_frame_indexes` (default the first two, i.e. 5 pixel frames) are
    the encoded input frames, kept clean."""

    @torch.no_grad()
    def __call__(
        self,
        video,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        condition_frame_indexes: Sequence[int] = (0, 1),
        condition_video_keep: str = "first",
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
        """`video`: a list of PIL frames, `[T, H, W, 3]` array or tensor, or a list with one clip per prompt.
        `condition_video_keep`: use the `"first"` or `"last"` frames of the clip. `latents`: the initial noise
        `[B, C, T, h, w]`; the conditioning latent frames are put in place over it."""
        self.check_call(num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs)
        if video is None:
            raise ValueError("`video` is required for video-to-video.")
        if isinstance(num_frames, int) and num_frames == 1:  # other bad values: the size check names them
            raise ValueError("`num_frames` must be > 1 for video-to-video.")
        if condition_video_keep not in ("first", "last"):
            raise ValueError(f"`condition_video_keep` must be 'first' or 'last', got {condition_video_keep!r}.")
        indexes = condition_frame_indexes
        indexes = tuple(indexes) if isinstance(indexes, Sequence) and not isinstance(indexes, (str, bytes)) else ()
        if not indexes or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indexes):
            raise ValueError(
                "`condition_frame_indexes` must be a non-empty list of non-negative ints, "
                f"got {condition_frame_indexes!r}."
            )
        requests = self.prepare_requests(
            prompt, negative_prompt, num_per_prompt=num_videos_per_prompt, num_frames=num_frames, height=height,
            width=width, fps=fps, enable_sound=enable_sound, use_system_prompt=use_system_prompt,
            add_resolution_template=add_resolution_template, add_duration_template=add_duration_template)
        latent_t = requests[0].vision_shape[1]
        if max(indexes) >= latent_t:
            raise ValueError(f"`condition_frame_indexes` {list(indexes)} reach past the {latent_t} latent frames of "
                             f"num_frames={num_frames} (valid: 0..{latent_t - 1}).")
        num_prompts = len(requests) // num_videos_per_prompt
        clips = _per_prompt("video", video, num_prompts, num_videos_per_prompt, clips=True)
        tcf = int(self.vae.config.scale_factor_temporal)
        keep = max(indexes) * tcf + 1  # the pixel frames the conditioning latents cover
        tokenizer, device = self.vision_tokenizer, self._execution_device
        condition_frames = tuple(sorted(set(indexes)))
        encoded: dict[int, torch.Tensor] = {}
        for r, clip in zip(requests, clips):
            if id(clip) not in encoded:
                frames = preprocess_video(clip, height, width).to(device)  # [1, 3, F, H, W]
                frames = frames[:, :, :keep] if condition_video_keep == "first" else frames[:, :, -keep:]
                # A short clip's last frame repeated (as the reference, which repeats it to the full length; the
                # latents read here only see the first `keep` frames).
                frames = torch.cat([frames, frames[:, :, -1:].expand(-1, -1, keep - frames.shape[2], -1, -1)], dim=2)
                encoded[id(clip)] = encode_conditioning(tokenizer, frames, condition_frames, latent_t)
            r.vision, r.vision_condition_frames = encoded[id(clip)], condition_frames
        return self._generate(
            requests, generator, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs), latents=latents,
        )
