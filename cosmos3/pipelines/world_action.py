"""World-action inference: robot policy, forward dynamics and inverse dynamics.

A chunk of N actions is the N transitions between N + 1 video frames. The mode only decides what is clean:

| mode | clean (given) | generated |
|---|---|---|
| `policy` | the first frame | the future frames and the actions |
| `forward_dynamics` | the first frame and the actions | the future frames |
| `inverse_dynamics` | every frame | the actions |

The conditioning clip is placed on the resolution tier's canvas whose aspect ratio is closest to it: downscaled
(never upscaled, bicubic, antialiased), padded right/bottom, and the latents cropped back to the content, as the
reference does. The prompt becomes the structured action caption the action models were trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import (
    ACTION_MODES,
    RESOLUTION_BINS,
    Cosmos3Request,
    action_canvas,
    action_mode_conditioning,
    encode_conditioning,
)
from ..tokenizers.action import EMBODIMENT_TO_DOMAIN_ID, EMBODIMENT_TO_RAW_ACTION_DIM
from ..tokenizers.text import ACTION_VIEWPOINTS
from .common import Cosmos3PipelineBase


@dataclass(frozen=True)
class ActionRequest:
    """What one world-action sample needs besides its instruction.

    Args:
        mode: one of `ACTION_MODES`.
        chunk_size: N actions (the clip has N + 1 frames).
        domain_name: embodiment (see `cosmos3.tokenizers.action.EMBODIMENT_TO_RAW_ACTION_DIM`).
        image / video: the first frame (policy, forward dynamics) or the whole clip (inverse dynamics).
        actions: `[T, raw_dim]` actions for forward dynamics (shorter: last one repeated; longer: truncated).
        resolution_tier: 256, 480, 704 or 720 as the reference (match the input's native resolution); 64 or
            128 for small models.
        view_point: the caption's framing (a key of `ACTION_VIEWPOINTS`).
        action_dim: the unpadded action width; required for domains whose width depends on the dataset
            (`libero`, `no_action`: e.g. a robot fine-tuned into the libero slot), otherwise the domain's own.
    """

    mode: str
    chunk_size: int
    domain_name: str
    image: object = None
    video: object = None
    actions: torch.Tensor | None = None
    resolution_tier: int = 480
    view_point: str = "ego_view"
    action_dim: int | None = None

    def __post_init__(self):
        if self.mode not in ACTION_MODES:
            raise ValueError(f"`mode` must be one of {list(ACTION_MODES)}, got {self.mode!r}.")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"`chunk_size` must be an int >= 1, got {self.chunk_size!r}.")
        if self.domain_name not in EMBODIMENT_TO_DOMAIN_ID:
            raise ValueError(f"Unknown `domain_name` {self.domain_name!r}; valid: {sorted(EMBODIMENT_TO_DOMAIN_ID)}.")
        fixed = EMBODIMENT_TO_RAW_ACTION_DIM.get(self.domain_name)
        if self.action_dim is None and fixed is None:
            raise ValueError(f"`domain_name` {self.domain_name!r} has no fixed action width: give `action_dim`.")
        if self.action_dim is not None and (not isinstance(self.action_dim, int) or isinstance(self.action_dim, bool)
                                            or self.action_dim < 1 or (fixed is not None and self.action_dim != fixed)):
            valid = f"{fixed} (the domain's width)" if fixed is not None else "an int >= 1"
            raise ValueError(f"`action_dim` must be {valid}, got {self.action_dim!r}.")
        if self.resolution_tier not in RESOLUTION_BINS:
            tiers = sorted(RESOLUTION_BINS)
            raise ValueError(f"`resolution_tier` must be one of {tiers}, got {self.resolution_tier!r}.")
        if self.view_point not in ACTION_VIEWPOINTS:
            raise ValueError(f"`view_point` must be one of {sorted(ACTION_VIEWPOINTS)}, got {self.view_point!r}.")
        if (self.image is None) == (self.video is None):
            raise ValueError("Give exactly one of `image` and `video`.")
        if self.mode == "inverse_dynamics" and self.video is None:
            raise ValueError("`mode='inverse_dynamics'` needs `video` (the clip whose actions are inferred).")
        raw = self.raw_action_dim
        if self.mode == "forward_dynamics":
            a = self.actions
            if not isinstance(a, torch.Tensor) or a.ndim != 2 or a.shape[0] < 1 or a.shape[1] != raw:
                got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(f"`actions` for forward dynamics must be a tensor [T >= 1, {raw}] "
                                 f"({self.domain_name}), got {got}.")
        elif self.actions is not None:
            raise ValueError(f"`actions` are generated in mode {self.mode!r}; pass them only for forward_dynamics.")

    @property
    def raw_action_dim(self) -> int:
        return self.action_dim if self.action_dim is not None else EMBODIMENT_TO_RAW_ACTION_DIM[self.domain_name]


class Cosmos3WorldActionPipeline(Cosmos3PipelineBase):
    r"""Robot policy (actions and future frames from a first frame), forward dynamics (future frames from a first
    frame and actions) and inverse dynamics (actions from a clip), with one request or a batch of them.

    Defaults as the reference call (30 steps, guidance 1: no negative pass). Returns `Cosmos3PipelineOutput` with
    `frames` (the generated or reconstructed clip on the content area) and `action` (policy and inverse dynamics:
    `[chunk, raw_dim]` per sample).
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        action: ActionRequest | list[ActionRequest],
        negative_prompt: str | list[str] | None = None,
        fps: float = 24.0,
        num_inference_steps: int = 30,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        use_system_prompt: bool | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """One sample per (prompt, action request); a single request or prompt is shared by the others."""
        self.check_call(num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs)
        if not self.transformer.config.action_gen:
            raise ValueError("This checkpoint's transformer has no action heads (`action_gen=False`).")
        requests_in = [action] if isinstance(action, ActionRequest) else list(action)
        if not requests_in or not all(isinstance(a, ActionRequest) for a in requests_in):
            raise TypeError(f"`action` must be an ActionRequest or a list of them, got {action!r}.")
        prompts, negatives = self.expand_prompts(prompt, negative_prompt, 1)
        n = max(len(prompts), len(requests_in))
        if len(prompts) not in (1, n) or len(requests_in) not in (1, n):
            raise ValueError(f"{len(prompts)} prompts and {len(requests_in)} action requests: give one, or as many.")
        prompts, negatives = (prompts * n)[:n], (negatives * n)[:n]
        requests_in = (requests_in * n)[:n]
        action_dim = self.transformer.config.action_dim
        tokenizer, device = self.vision_tokenizer, self._execution_device
        tcf, sf = int(self.vae.config.scale_factor_temporal), int(self.vae.config.scale_factor_spatial)

        requests = []
        for prompt_i, negative_i, req in zip(prompts, negatives, requests_in):
            if req.raw_action_dim > action_dim:
                raise ValueError(f"{req.domain_name} actions are {req.raw_action_dim} wide, over the model's "
                                 f"action_dim={action_dim}.")
            num_frames = req.chunk_size + 1
            self.check_extent(num_frames, 16, 16)  # the canvas is the tier's; the chunk is the caller's
            latent_t = (num_frames - 1) // tcf + 1
            condition_frames, action_condition = action_mode_conditioning(req.mode, latent_t, req.chunk_size)
            # Only the frames the conditioning latents depend on are placed and encoded (the first one, but for
            # inverse dynamics); the canvas's leading frames do not depend on its length.
            clip = [req.image] if req.image is not None else req.video
            canvas, height, width, content_h, content_w = action_canvas(
                clip, req.resolution_tier, 1 + tcf * max(condition_frames),
                name="image" if req.image is not None else "video")
            settings = self.prompt_settings(num_frames, height, width, fps, use_system_prompt, True, True,
                                            action_mode=req.mode, action_view_point=req.view_point)
            (cond,), (uncond,) = self.encode_prompt([prompt_i], [negative_i], settings)
            x0 = encode_conditioning(tokenizer, canvas.to(device).float(), condition_frames, latent_t)
            x0 = x0[:, :, : max(content_h // sf, 1), : max(content_w // sf, 1)].contiguous()  # drop the padding
            actions = torch.zeros(req.chunk_size, action_dim)
            if req.mode == "forward_dynamics":
                given = req.actions.float()
                given = torch.cat([given, given[-1:].expand(max(0, req.chunk_size - given.shape[0]), -1)])
                actions[:, : req.raw_action_dim] = given[: req.chunk_size]
            requests.append(Cosmos3Request(
                cond, vision=x0, vision_condition_frames=condition_frames, fps=float(fps), action=actions,
                action_condition_frames=action_condition, action_domain_id=EMBODIMENT_TO_DOMAIN_ID[req.domain_name],
                raw_action_dim=req.raw_action_dim, negative_ids=uncond,
            ))
        shapes = {r.vision_shape for r in requests}
        if len(shapes) > 1:
            raise ValueError(f"A batch of action requests must share one latent shape (chunk size, canvas and "
                             f"content size); got {sorted(shapes)}. Run them in separate calls.")
        out = self._generate(
            requests, generator, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
        )
        generated = {"policy", "inverse_dynamics"}
        keep = [r.mode in generated for r in requests_in]
        if return_dict:
            out.action = [a if k else None for a, k in zip(out.action, keep)]
            return out
        frames, sound, actions = out
        return frames, sound, [a if k else None for a, k in zip(actions, keep)]
