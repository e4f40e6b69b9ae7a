"""Transfer: video that follows structural control clips (edge, blur, depth, segmentation, world-scenario maps).

The numbers are those of diffusers' modular Cosmos 3 workflow (`diffusers/modular_pipelines/cosmos/`, transfer branch
of `Cosmos3OmniBlocks`, selected there by passing `control_videos`):

* **Hints** are RGB clips, resized to the canvas by the pipeline's `VideoProcessor` (PIL frames bilinear, arrays and
  tensors nearest) and taken in the order edge, blur, depth, seg, wsm whatever the order given. Each is VAE-encoded
  on its own and laid out before the target in the generation stream, every frame clean and at the target's own
  position ids (`Cosmos3Request.control`). The first hint sets the clip length (capped by `num_frames`); shorter
  hints are reflected in time (the last frame repeated once, then backwards).
* **Prompt**: verbatim under the transfer system prompt, no duration or resolution sentences.
* **Guidance**: `v = v_u + g ((v_nc + c (v_full - v_nc)) - v_u)` with `v_full` the prompt with the hints, `v_nc` the
  prompt without them (run only when `control_guidance` != 1) and `v_u` the negative prompt with the hints (run only
  when `guidance_scale` > 1); each scale applies only inside its `(low, high)` timestep interval when one is given.
* **Chunks**: a clip longer than `num_video_frames_per_chunk` (rounded up to `1 + 4k`) is generated window by window,
  each window seeded with the last `num_conditional_frames` decoded frames of the previous one (re-encoded, their
  latent frames pinned), with a fresh scheduler and fresh noise from the same generator; the first window can be
  seeded from `video`.

Where cosmos3 goes further than the reference, which takes one prompt and runs each guidance branch as its own
forward: every sample of a batch (lists of prompts, hints and generators, `num_videos_per_prompt`) and every
guidance branch run as one batched forward per step, and a list of generators gives each sample what it would get
alone. Sound is not generated with transfer (nor by the reference). Under `cosmos3.parallel.parallelize(pipe, cfg=2)`
that branch batch is split over two ranks (`branch_step_factory`), its velocities gathered once per step.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..conditioning import Cosmos3Request, keep_clean
from ..tokenizers.text import SYSTEM_PROMPT_TRANSFER
from ..tokenizers.vision import check_multiple, preprocess_video
from .common import Cosmos3PipelineBase, Cosmos3PipelineOutput, callback_results, check_generators
from .image_to_video import _per_prompt

HINTS = ("edge", "blur", "depth", "seg", "wsm")


def pad_time(frames: Tensor, num_frames: int) -> Tensor:
    """`[1, 3, T, H, W]` -> `num_frames` frames by reflection in time (the last frame repeated once, then backwards),
    as the reference pads hints and windows."""
    while frames.shape[2] < num_frames:
        k = min(frames.shape[2] - 1, num_frames - frames.shape[2])
        if k <= 0:
            return torch.cat([frames, frames[:, :, -1:].expand(-1, -1, num_frames - frames.shape[2], -1, -1)], dim=2)
        frames = torch.cat([frames, frames.flip(dims=[2])[:, :, :k]], dim=2)
    return frames


def chunk_geometry(total: int, window: int | None, conditional: int, temporal_factor: int = 4) -> tuple[int, int, int]:
    """`(window, stride, num_chunks)` of a `total`-frame clip: the window rounded up to `1 + 4k`, each later window
    starting `window - conditional` frames after the one before."""
    tf = temporal_factor
    frames = 1 if total == 1 else (window or total)
    frames = math.ceil((frames - 1) / tf) * tf + 1
    if total <= frames:
        return frames, frames, 1
    stride = frames - conditional
    if stride <= 0:
        raise ValueError(f"`num_conditional_frames`={conditional} leaves no new frames in a window of {frames} "
                         f"(`num_video_frames_per_chunk` rounded up to 1 + {tf}k); give fewer conditional frames.")
    return frames, stride, 1 + math.ceil((total - frames) / stride)


def _interval(name: str, value) -> tuple[float, float] | None:
    if value is None:
        return None
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value) or value[0] > value[1]):
        raise ValueError(f"`{name}` must be None or (low, high) timesteps with low <= high, got {value!r}.")
    return float(value[0]), float(value[1])


def _scale_at(scale: float, interval: tuple[float, float] | None, t: int) -> float:
    return scale if interval is None or interval[0] <= t <= interval[1] else 1.0


class _Sample:
    """One video of the call: its prompt ids, hints, seed clip and generator, and what its windows produced."""

    def __init__(self, cond_ids, uncond_ids, controls: list[Tensor], total: int, window: tuple[int, int, int],
                 video: Tensor | None, generator):
        self.cond_ids, self.uncond_ids, self.controls, self.total = cond_ids, uncond_ids, controls, total
        self.frames, self.stride, self.num_chunks = window
        self.video, self.generator = video, generator
        self.chunks: list[Tensor] = []
        self.previous: Tensor | None = None


class Cosmos3TransferPipeline(Cosmos3PipelineBase):
    r"""Generate videos that follow control clips (`control_videos={"edge": clip, "depth": clip, ...}`).

    Defaults as the reference's transfer call: 720x1280, 50 steps, guidance 6, control guidance 1 (no
    "no-control" pass), no chunking (one window over the whole clip), 1 conditional frame between windows.
    """

    # How a step runs the model on the branch batch (per-sample lists of latents): `factory(pipe, layout, inputs)`
    # returns `step(vision, t, sound, action)`, as `model_step_factory` does for the shared loop. Only the split
    # over devices (`cosmos3.parallel`, cfg) sets it; CUDA graphs and step caches take stacked batches, not lists.
    branch_step_factory = None

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        control_videos: Mapping | list[Mapping],
        negative_prompt: str | list[str] | None = None,
        video=None,
        num_frames: int | None = None,
        height: int = 720,
        width: int = 1280,
        fps: float = 24.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        control_guidance: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        control_guidance_interval: tuple[float, float] | None = None,
        num_video_frames_per_chunk: int | None = None,
        num_conditional_frames: int = 1,
        num_first_chunk_conditional_frames: int = 0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        use_system_prompt: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """One video per prompt x `num_videos_per_prompt`. `control_videos`: a dict of hint name -> clip (a list of
        PIL frames, a `[T, 3, H, W]` tensor or `[T, H, W, 3]` float array in [0, 1], or a video file path), shared by
        every prompt, or a list with one dict per prompt. `video`: frames seeding the first window (with
        `num_first_chunk_conditional_frames` > 0), one or one per prompt. Returns `Cosmos3PipelineOutput` with
        `frames` of `num_frames` (or the first hint's length) frames per video."""
        self.check_call(num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs)
        if output_type == "latent":
            raise ValueError("`output_type='latent'` is not available for transfer: windows are stitched in pixels.")
        for name, value in (("control_guidance", control_guidance),):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        intervals = _interval("guidance_interval", guidance_interval), _interval(
            "control_guidance_interval", control_guidance_interval)
        for name, value, low in (("num_conditional_frames", num_conditional_frames, 1),
                                 ("num_first_chunk_conditional_frames", num_first_chunk_conditional_frames, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
        for name, value in (("num_frames", num_frames), ("num_video_frames_per_chunk", num_video_frames_per_chunk)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be None or an int >= 1, got {value!r}.")
        sf = int(self.vae.config.scale_factor_spatial)
        check_multiple(height, sf, name="`height`")
        check_multiple(width, sf, name="`width`")
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"`fps` must be a positive number, got {fps!r}.")

        self.check_extent(1, height, width)
        prompts, negatives = self.expand_prompts(prompt, negative_prompt, 1)
        self.expand_prompts(prompts, None, num_videos_per_prompt)  # checks `num_videos_per_prompt` and the batch size
        hints = _per_prompt("control_videos", control_videos, len(prompts), 1, clips=True)
        seeds = _per_prompt("video", video, len(prompts), 1, clips=True)
        settings = self.prompt_settings(1, height, width, fps, use_system_prompt, add_resolution_template=False,
                                        add_duration_template=False)
        settings = dataclasses.replace(settings, system_prompt=SYSTEM_PROMPT_TRANSFER)
        # the negative prompt is "" when none is given, under the same system prompt
        cond, uncond = self.encode_prompt(prompts, negatives, settings)
        generators = check_generators(generator, len(prompts) * num_videos_per_prompt)
        samples = []
        for i, (c, u, h, v) in enumerate(zip(cond, uncond, hints, seeds)):
            h = _check_hints(h)
            controls = [self._preprocess_hint(name, h[name], height, width) for name in HINTS if name in h]
            total = max(1, min(controls[0].shape[2], num_frames or controls[0].shape[2]))
            window = chunk_geometry(total, num_video_frames_per_chunk, num_conditional_frames,
                                    int(self.vae.config.scale_factor_temporal))
            self.check_extent(max(total, window[0]), height, width)
            controls = [pad_time(x, max(total, window[0])) for x in controls]
            seed = None
            if v is not None and num_first_chunk_conditional_frames > 0:
                seed = preprocess_video(v, height, width)
                seed = seed.to(self._execution_device, self.vae.dtype)
            for k in range(num_videos_per_prompt):
                samples.append(_Sample(c, u, controls, total, window, seed,
                                       generators[i * num_videos_per_prompt + k]))

        self._guidance_scale = guidance_scale
        for c in range(max(s.num_chunks for s in samples)):
            active = [s for s in samples if c < s.num_chunks]
            self._denoise_window(active, c, num_inference_steps, guidance_scale, control_guidance, intervals,
                                 num_conditional_frames, num_first_chunk_conditional_frames, fps,
                                 callback_on_step_end, callback_on_step_end_tensor_inputs)

        videos = [torch.cat(s.chunks, dim=2)[:, :, : s.total] for s in samples]  # [1, 3, T, H, W] each
        frames = [self.video_processor.postprocess_video(v, output_type=output_type)[0] for v in videos]
        if output_type == "np" and len({f.shape for f in frames}) == 1:
            frames = np.stack(frames)
        elif output_type == "pt" and len({tuple(f.shape) for f in frames}) == 1:
            frames = torch.stack(frames)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames, None)
        return Cosmos3PipelineOutput(frames=frames)

    # ---------------------------------------------------------------------------------------------------------

    def _preprocess_hint(self, name: str, clip, height: int, width: int) -> Tensor:
        """One hint as `[1, 3, T, H, W]` in [-1, 1] in the transformer's dtype (as the reference rounds it)."""
        if isinstance(clip, str):
            from .. import io as cio

            clip = cio.read_video(clip).frames
        elif isinstance(clip, np.ndarray) and clip.dtype == np.uint8 and clip.ndim == 3:  # one frame
            clip = clip[None]
        if isinstance(clip, (np.ndarray, Tensor)) and len(clip) == 0:
            raise ValueError(f"`control_videos[{name!r}]` is empty: give at least one frame.")
        try:
            # uint8 frames go through PIL (the processor reads arrays as [0, 1]); frames must be RGB and >= 16 px
            frames = preprocess_video(clip, height, width, name=f"control_videos[{name!r}]")
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"`control_videos[{name!r}]` is not a clip (PIL frames, a [T, 3, H, W] tensor or "
                             f"[T, H, W, 3] array in [0, 1], or a video path): {e}") from None
        if frames.ndim != 5 or frames.shape[0] != 1 or frames.shape[1] != 3 or frames.shape[2] < 1:
            raise ValueError(f"`control_videos[{name!r}]` must be one RGB clip, got frames of shape "
                             f"{tuple(frames.shape)}.")
        return frames.to(self._execution_device, dtype=self.transformer.dtype)

    def _denoise_window(self, samples: list[_Sample], c: int, num_inference_steps: int, guidance_scale: float,
                        control_guidance: float, intervals, num_conditional: int, num_first_conditional: int,
                        fps: float, callback_on_step_end, callback_on_step_end_tensor_inputs) -> None:
        """Window `c` of every sample that has one: encode, noise, denoise, decode."""
        tokenizer, device = self.vision_tokenizer, self._execution_device
        tf = tokenizer.temporal_factor
        requests, latents, masks, schedulers, seeded = [], [], [], [], []
        for s in samples:
            start = c * s.stride
            control = torch.cat([tokenizer.encode(pad_time(x[:, :, start : min(start + s.frames, s.total)],
                                                           s.frames).contiguous()).contiguous().float()
                                 for x in s.controls])  # [N, C, T, h, w]
            target = torch.zeros(1, 3, s.frames, *s.controls[0].shape[-2:], device=device, dtype=self.vae.dtype)
            n = 0
            if c == 0 and s.video is not None:
                n = min(num_first_conditional, s.video.shape[2], s.frames)
                target[:, :, :n] = s.video[:, :, :n]
            elif c > 0:
                n = min(num_conditional, s.previous.shape[2], s.frames)
                target[:, :, :n] = s.previous[:, :, -n:].to(target)
            if 0 < n < s.frames:
                target[:, :, n:] = target[:, :, n - 1 : n]
            latent_shape = tuple(control.shape[1:])
            x0 = tokenizer.encode(target)[0].float() if n else torch.zeros(latent_shape, device=device)
            pinned = tuple(range((n - 1) // tf + 1)) if n else ()
            r = Cosmos3Request(s.cond_ids, vision=x0, vision_condition_frames=pinned, fps=float(fps),
                               negative_ids=s.uncond_ids, control=control)
            mask = r.clean_mask("vision", device)
            noise = randn_tensor((1, *latent_shape), generator=s.generator, device=device, dtype=torch.float32)[0]
            latents.append(keep_clean(noise, x0, mask))
            requests.append(r)
            masks.append(mask)
            scheduler = copy.deepcopy(self.scheduler)
            scheduler.set_timesteps(num_inference_steps, device=device)
            schedulers.append(scheduler)
            seeded.append(n)

        timesteps = schedulers[0].timesteps
        self._num_timesteps = len(timesteps)
        passes: dict[tuple[bool, bool], tuple] = {}
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                g = _scale_at(guidance_scale, intervals[0], int(t))
                cg = _scale_at(control_guidance, intervals[1], int(t))
                text_cfg, ctrl_cfg = g > 1.0, cg != 1.0  # as the reference: `>` for text, `!=` for control
                if (text_cfg, ctrl_cfg) not in passes:
                    passes[(text_cfg, ctrl_cfg)] = self._passes(requests, text_cfg, ctrl_cfg)
                model_step, branches = passes[(text_cfg, ctrl_cfg)]
                dtype = self.transformer.dtype
                vision = [requests[b].model_vision(latents[b], controls).to(dtype) for b, controls, _ in branches]
                out = model_step(vision, t, None, None)[0]
                velocity = {}
                for (b, _, name), o in zip(branches, out):
                    velocity[(b, name)] = o[:, -latents[b].shape[1] :].float()  # the target: the last frames
                for b, r in enumerate(requests):
                    full = velocity[(b, "full")]
                    v = full
                    if ctrl_cfg:
                        nc = velocity[(b, "no_control")]
                        v = nc + cg * (full - nc)
                    if text_cfg:
                        u = velocity[(b, "uncond")]
                        v = u + g * (v - u)
                    v = v.float() * (1.0 - masks[b])
                    stepped = schedulers[b].step(v[None], t, latents[b][None], return_dict=False)[0][0]
                    latents[b] = keep_clean(stepped, r.vision, masks[b])
                if callback_on_step_end is not None:
                    names = callback_on_step_end_tensor_inputs or []
                    same = len({tuple(x.shape) for x in latents}) == 1
                    tensors = {"latents": torch.stack(latents) if same else list(latents)} if "latents" in names else {}
                    edited = callback_results(callback_on_step_end(self, i, t, tensors)).pop("latents", None)
                    if edited is not None:
                        latents = [x.float() for x in edited]
                progress.update()

        for s, x, n in zip(samples, latents, seeded):
            decoded = tokenizer.decode(x[None]).float().clamp(-1.0, 1.0)  # [1, 3, F, H, W]
            s.chunks.append(decoded if c == 0 else decoded[:, :, n:])
            s.previous = decoded

    def _passes(self, requests: list[Cosmos3Request], text_cfg: bool, ctrl_cfg: bool):
        """The batch of one step: per sample the prompt with its hints, and (as the guidance needs them) the prompt
        without hints and the negative prompt with hints; its model step (the text cache in it), built once per
        window, and the branch of each row."""
        samples, branches = [], []
        for b, r in enumerate(requests):
            samples.append(r.to_sample())
            branches.append((b, True, "full"))
            if ctrl_cfg:
                samples.append(r.to_sample(controls=False))
                branches.append((b, False, "no_control"))
            if text_cfg:
                samples.append(r.to_sample(negative=True))
                branches.append((b, True, "uncond"))
        layout = self.transformer.build_layout(samples, temporal_compression=int(self.vae.config.scale_factor_temporal))
        factory = self.branch_step_factory or type(self).eager_model_step
        return factory(self, layout, (None, None, None)), branches


def _check_hints(hints) -> Mapping:
    if not isinstance(hints, Mapping) or not hints:
        raise ValueError(f"`control_videos` must be a non-empty dict of hint name -> clip with names among "
                         f"{list(HINTS)}, got {hints!r}.")
    unknown = [k for k in hints if k not in HINTS]
    if unknown:
        raise ValueError(f"`control_videos` has unknown hints {unknown}; valid: {list(HINTS)}.")
    missing = [k for k, v in hints.items() if v is None]
    if missing:
        raise ValueError(f"`control_videos` entries {missing} are None; give a clip or leave the hint out.")
    return hints
