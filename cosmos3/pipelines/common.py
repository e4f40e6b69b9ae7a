"""What every Cosmos 3 pipeline shares: components, loading, prompts, initial noise, the denoising loop, decoding.

The task pipelines (one file each) only turn their inputs into `_Request`s (prompt ids, clean conditioning latents,
masks) and pick their outputs; everything numerical lives here, once:

* **Same numbers as the reference** (`diffusers.Cosmos3OmniPipeline`) for one sample: identical prompt ids, the
  initial noise drawn with the sample's generator in the same order and shapes (vision, then sound, then actions),
  the same UniPC steps, guidance `v_u + g (v_c - v_u)` in float32, the same decode.
* **Batches**: every prompt x `num_*_per_prompt` sample and, with guidance, its negative, run through the
  transformer as one batch; the text tower runs once per request (`encode_text`), each step runs only the
  generation tower. A list of generators gives each sample exactly what it would get alone.
* Loads a published folder (`model_index.json` of `Cosmos3OmniPipeline`) with our `Cosmos3Transformer`;
  `save_pretrained` writes a folder both this library and the reference load.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from torch import Tensor

from ..models.layout import Cosmos3Sample
from ..models.transformer_cosmos3 import Cosmos3Transformer
from ..optimize import CUDAGraphStep, offload_text_tower
from ..tokenizers.sound import Cosmos3SoundTokenizer
from ..tokenizers.text import PromptSettings, encode_prompts
from ..tokenizers.vision import Cosmos3VisionTokenizer

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


CALL_DEFAULTS_FILE = "call_defaults.json"
CALL_DEFAULT_KEYS = {"height": int, "width": int, "num_frames": int, "fps": float, "num_inference_steps": int,
                     "guidance_scale": float}


def read_call_defaults(folder: str) -> dict:
    """The call settings a model folder recommends (`call_defaults.json`: e.g. Cosmos3-Tiny was trained at 64x64,
    9 frames), used by `cosmos3 generate` and the demo where the user gives none. {} when the file is absent."""
    import json
    import os

    path = os.path.join(folder, CALL_DEFAULTS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or set(data) - set(CALL_DEFAULT_KEYS):
        raise ValueError(f"{path}: expected an object with keys among {sorted(CALL_DEFAULT_KEYS)}, got {data!r}.")
    for key, kind in CALL_DEFAULT_KEYS.items():
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
                                  or (kind is int and not float(value).is_integer())):
            raise ValueError(f"{path}: `{key}` must be a positive {kind.__name__}, got {value!r}.")
        if value is not None:
            data[key] = kind(value)
    return data


@dataclass
class Cosmos3PipelineOutput(BaseOutput):
    """`frames`: per sample, a list of PIL images (`pil`), or `[B, T, H, W, 3]` (`np`) / `[B, T, 3, H, W]` (`pt`)
    arrays in [0, 1], or latents `[B, C, T, h, w]` (`latent`). `sound`: `[B, 2, N]` waveforms or None. `action`:
    per sample `[chunk, raw_dim]` tensors or None."""

    frames: list | np.ndarray | Tensor
    sound: Tensor | None = None
    action: list[Tensor] | None = None
    sample_rate: int | None = None

    def save(self, path: str, fps: float, index: int = 0) -> None:
        """Write sample `index` as an mp4/webm (with its sound, resampled to 48 kHz for AAC/Opus), atomically."""
        from .. import io as cio
        from ..tokenizers.sound import resample

        frames = self.frames[index]
        if isinstance(frames, list):  # PIL frames
            frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
        elif isinstance(frames, Tensor):
            if frames.ndim != 4 or frames.shape[1] != 3:
                raise ValueError("`save` needs decoded frames (output_type pil, np or pt), not latents.")
            frames = frames.permute(0, 2, 3, 1).float().cpu().numpy()
        if frames.dtype != np.uint8:
            frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
        audio = rate = None
        if self.sound is not None:
            rate = 48000
            audio = resample(self.sound[index].float().cpu(), self.sample_rate, rate).numpy()
        cio.write_video(path, frames, fps, audio=audio, sample_rate=rate)


@dataclass
class _Request:
    """One sample to generate: its prompt ids and what is clean at the start."""

    cond_ids: list[int]
    uncond_ids: list[int]
    generator: torch.Generator | None
    latent_shape: tuple[int, int, int, int]  # (C, T, h, w)
    # [C, T, h, w] clean vision latents, read only at `condition_frames` (see `encode_conditioning`); None: nothing
    x0: Tensor | None = None
    condition_frames: tuple[int, ...] = ()
    sound_length: int = 0
    fps: float | None = None
    # actions: clean values `[chunk, action_dim]` (zeros where generated), which tokens are clean, the embodiment
    action_x0: Tensor | None = None
    action_condition: tuple[int, ...] = ()
    action_domain_id: int = 0
    raw_action_dim: int | None = None


def encode_conditioning(
    tokenizer: Cosmos3VisionTokenizer, clip: Tensor, condition_frames: tuple[int, ...], latent_frames: int
) -> Tensor:
    """Clean latents `[C, latent_frames, h, w]` of `clip` `[1, 3, F, H, W]` at `condition_frames`, zeros after the last.

    The Wan VAE is causal in time: latent frame k depends on pixel frames 0..4k only, and equals what encoding just
    those frames gives (to float rounding: the convolutions may pick other kernels for other input strides). So only
    the pixels up to the last conditioning frame are encoded (`clip` needs no more than those): one frame for
    image-to-video, a policy or forward dynamics, where the reference encodes the whole clip. The latent frames past
    it are never read (`_generate` blends `x0` in through the conditioning mask) and are left zero.
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


def _check_generators(generator, batch: int) -> list[torch.Generator | None]:
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"`generator` is a list of {len(generator)} but the batch has {batch} samples.")
        if not all(isinstance(g, torch.Generator) for g in generator):
            kinds = [type(g).__name__ for g in generator]
            raise TypeError(f"`generator` list entries must be torch.Generator, got {kinds}.")
        return generator
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator, a list of them, or None; got {type(generator)}.")
    return [generator] * batch


def _as_prompt_list(name: str, value, allow_none: bool) -> list | None:
    if value is None and allow_none:
        return None
    if name == "prompt" and (value == "" or isinstance(value, (list, tuple)) and any(v == "" for v in value)):
        raise ValueError("`prompt` must not be empty (describe what to generate; use `negative_prompt` for the rest).")
    if isinstance(value, str):
        return [value]
    valid = (str, type(None)) if allow_none else str
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, valid) for v in value):
        return list(value)
    raise TypeError(f"`{name}` must be a str or a non-empty list of str, got {value!r}.")


class Cosmos3PipelineBase(DiffusionPipeline):
    """Components and shared machinery of the Cosmos 3 pipelines (component names as in the reference layout)."""

    _optional_components = ["sound_tokenizer", "safety_checker"]
    model_cpu_offload_seq = "transformer->vae->sound_tokenizer"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: Cosmos3Transformer,
        text_tokenizer,
        vae,
        scheduler,
        sound_tokenizer=None,
        safety_checker=None,
        enable_safety_checker: bool = False,
        default_use_system_prompt: bool = True,
        use_native_flow_schedule: bool = False,
        distilled_sigmas: list[float] | None = None,
    ):
        super().__init__()
        if safety_checker is not None or enable_safety_checker:
            raise ValueError(
                "The Cosmos guardrail (`safety_checker`) is not supported by cosmos3 pipelines: its package pulls "
                "torchvision and downloads models at run time. Build the pipeline with `enable_safety_checker=False`."
            )
        self.register_to_config(
            enable_safety_checker=False,
            default_use_system_prompt=default_use_system_prompt,
            use_native_flow_schedule=use_native_flow_schedule,
            distilled_sigmas=[float(s) for s in distilled_sigmas] if distilled_sigmas else None,
        )
        self.register_modules(
            transformer=transformer, text_tokenizer=text_tokenizer, vae=vae, scheduler=scheduler,
            sound_tokenizer=sound_tokenizer, safety_checker=None,
        )
        self.video_processor = VideoProcessor(vae_scale_factor=16, resample="bilinear")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder in the reference layout; the transformer is always our `Cosmos3Transformer`."""
        import os

        if "transformer" not in kwargs:
            sub = os.path.join(str(pretrained_model_name_or_path), "transformer")
            dtype = kwargs.get("torch_dtype")
            kwargs["transformer"] = Cosmos3Transformer.from_pretrained(sub, torch_dtype=dtype)
        kwargs.setdefault("enable_safety_checker", False)
        kwargs.setdefault("safety_checker", None)
        # Distilled (few-step) checkpoints carry their fixed schedule in `modular_model_index.json`.
        modular = os.path.join(str(pretrained_model_name_or_path), "modular_model_index.json")
        if "distilled_sigmas" not in kwargs and os.path.exists(modular):
            import json

            with open(modular) as f:
                sigmas = json.load(f).get("distilled_sigmas")
            if sigmas:
                kwargs["distilled_sigmas"] = sigmas
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Save in the reference layout: `model_index.json` names the reference classes (our transformer's weights
        and config are the reference's), so the folder loads in `Cosmos3OmniPipeline` as well as here."""
        import json
        import os

        super().save_pretrained(save_directory, **kwargs)
        path = os.path.join(save_directory, "model_index.json")
        with open(path) as f:
            index = json.load(f)
        index["_class_name"] = "Cosmos3OmniPipeline"
        index["transformer"] = ["diffusers", "Cosmos3OmniTransformer"]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        os.replace(tmp, path)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    # ---------------------------------------------------------------------------------------------------------
    # Speed and memory switches (see cosmos3.optimize)
    # ---------------------------------------------------------------------------------------------------------

    def enable_cuda_graphs(self, enabled: bool = True, *, capture: bool = True) -> None:
        """Replay each denoising step from a CUDA graph captured at the request's first step.

        Worth it where launches dominate: few-step (distilled) sampling and action chunks. The captured step is kept
        while requests repeat the same prompts and shapes (a policy's control loop), which then also skip the text
        tower. `capture=False` runs the same path without a graph (for testing on CPU).
        """
        self._cuda_graphs = bool(enabled)
        self._graph_capture = bool(capture)
        self._graph_step = None

    def enable_text_tower_offload(self, offload_device: str | torch.device = "cpu") -> None:
        """Keep the understanding tower in host memory, streamed to the GPU module by module when a request's text
        cache is built (`cosmos3.optimize.offload_text_tower`). Call after moving the pipeline to its device."""
        self.disable_text_tower_offload()
        self._text_offload = offload_text_tower(self.transformer, offload_device)

    def disable_text_tower_offload(self) -> None:
        if getattr(self, "_text_offload", None) is not None:
            self._text_offload.remove()
        self._text_offload = None

    def _step_runner(self, layout, vision: Tensor, sound: Tensor | None, action: Tensor | None):
        """The captured step for this request: the previous one when the layout (prompts, shapes, conditioning) and
        inputs are the same, else a new capture (with its own text cache)."""
        if vision.device.type != "cuda" and self._graph_capture:
            raise ValueError(f"CUDA graphs are enabled but the pipeline runs on {vision.device}; call "
                             "enable_cuda_graphs(False) or move the pipeline to a GPU.")
        key = (repr(layout.samples), self.transformer.attention_backend,
               *((None, None) if x is None else (tuple(x.shape), x.dtype, x.device) for x in (vision, sound, action)))
        if self._graph_step is None or self._graph_step[0] != key:
            self._graph_step = None  # free the old graph's memory pool before capturing
            text_kv = self.transformer.encode_text(layout)
            step = CUDAGraphStep(self.transformer, layout, text_kv, vision, sound, action,
                                 capture=self._graph_capture)
            self._graph_step = (key, step)
        return self._graph_step[1]

    # ---------------------------------------------------------------------------------------------------------
    # Pieces the task pipelines use
    # ---------------------------------------------------------------------------------------------------------

    @property
    def vision_tokenizer(self) -> Cosmos3VisionTokenizer:
        return Cosmos3VisionTokenizer(self.vae)

    def encode_prompt(self, prompts: list[str], negatives: list[str | None], settings: PromptSettings):
        """Prompt and negative token ids for each prompt (see `cosmos3.tokenizers.text.encode_prompts`)."""
        return encode_prompts(self.text_tokenizer, prompts, negatives, settings)

    def _prompt_settings(self, num_frames, height, width, fps, use_system_prompt, add_resolution_template,
                         add_duration_template, action_mode=None, action_view_point=None) -> PromptSettings:
        if use_system_prompt is None:
            use_system_prompt = self.config.default_use_system_prompt
        return PromptSettings(
            num_frames=num_frames, height=height, width=width, fps=fps, use_system_prompt=use_system_prompt,
            add_resolution_template=add_resolution_template, add_duration_template=add_duration_template,
            action_mode=action_mode, action_view_point=action_view_point,
        )

    def _expand_prompts(self, prompt, negative_prompt, per_prompt: int):
        prompts = _as_prompt_list("prompt", prompt, allow_none=False)
        negatives = _as_prompt_list("negative_prompt", negative_prompt, allow_none=True)
        if negatives is not None and len(negatives) not in (1, len(prompts)):
            raise ValueError(f"`negative_prompt` has {len(negatives)} entries for {len(prompts)} prompts.")
        if negatives is None:
            negatives = [None] * len(prompts)
        elif len(negatives) == 1:
            negatives = negatives * len(prompts)
        if not isinstance(per_prompt, int) or per_prompt < 1:
            raise ValueError(f"`num_*_per_prompt` must be a positive int, got {per_prompt!r}.")
        prompts = [p for p in prompts for _ in range(per_prompt)]
        negatives = [n for n in negatives for _ in range(per_prompt)]
        return prompts, negatives

    def _check_common(self, num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs):
        sigmas = self.config.distilled_sigmas
        if sigmas:
            # A distilled student: its steps and its (baked-in) guidance are fixed by the checkpoint.
            if num_inference_steps != len(sigmas):
                raise ValueError(f"This is a distilled checkpoint with a fixed {len(sigmas)}-step schedule; "
                                 f"`num_inference_steps` must be {len(sigmas)}, got {num_inference_steps!r}.")
            if guidance_scale != 1.0:
                raise ValueError("This is a distilled checkpoint (guidance is baked in); `guidance_scale` must be "
                                 f"1.0, got {guidance_scale!r}.")
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}.")
        if (not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool)
                or not math.isfinite(guidance_scale) or guidance_scale < 0):
            raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {guidance_scale!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        bad = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` {bad} are not in {self._callback_tensor_inputs}.")

    def _check_size(self, num_frames: int, height: int, width: int) -> None:
        if not isinstance(num_frames, numbers.Integral) or isinstance(num_frames, bool) or num_frames < 1:
            raise ValueError(f"`num_frames` must be a positive int, got {num_frames!r}.")
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 16 or value % 16:
                lower = max(16, (value // 16) * 16) if isinstance(value, numbers.Integral) else 16
                raise ValueError(f"`{name}` must be a multiple of 16, got {value!r} (nearest: {lower}, {lower + 16}).")
        tf = int(self.vae.config.scale_factor_temporal)
        if (num_frames - 1) % tf:
            lower = (num_frames - 1) // tf * tf + 1
            raise ValueError(f"`num_frames` must be 1 + {tf}k, got {num_frames} (nearest: {lower}, {lower + tf}).")

    def _latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return self.vision_tokenizer.latent_shape(num_frames, height, width)

    def _renoise_step(self, velocity: Tensor, latents: Tensor, i: int, requests: list[_Request], masks) -> Tensor:
        """One step of the distilled students' sampler: predict x0, re-noise it to the next sigma with fresh noise
        (each sample from its own generator, drawn as the scheduler's stochastic step draws it), and put the clean
        conditioning frames back (re-noising touches every position)."""
        sigma, next_sigma = self.scheduler.sigmas[i].item(), self.scheduler.sigmas[i + 1].item()
        x0 = latents - sigma * velocity
        out = []
        for b, r in enumerate(requests):
            noise = randn_tensor((1, 1, *x0.shape[1:]), generator=r.generator, device=x0.device, dtype=x0.dtype)
            step = (1.0 - next_sigma) * x0[b] + next_sigma * noise[0, 0]
            if r.condition_frames:
                step = masks[b] * r.x0.to(step) + (1.0 - masks[b]) * step
            out.append(step)
        return torch.stack(out)

    # ---------------------------------------------------------------------------------------------------------
    # The denoising loop
    # ---------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _generate(
        self,
        requests: list[_Request],
        *,
        num_inference_steps: int,
        guidance_scale: float,
        output_type: str,
        return_dict: bool,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        device = self._execution_device
        dtype = self.transformer.dtype
        B = len(requests)
        cfg = guidance_scale != 1.0  # as the reference: any other scale runs the negative pass
        self._guidance_scale = guidance_scale

        # 1. Initial noise, per sample with its own generator, in the reference's order: vision, then sound.
        latents, sound_latents, actions, masks = [], [], [], []
        for r in requests:
            noise = randn_tensor((1, *r.latent_shape), generator=r.generator, device=device, dtype=torch.float32)[0]
            mask = torch.zeros(r.latent_shape[1], 1, 1, device=device)
            if r.condition_frames:
                mask[list(r.condition_frames)] = 1.0
                noise = mask * r.x0.to(device, torch.float32) + (1.0 - mask) * noise
            latents.append(noise)
            masks.append(mask)
            if r.sound_length:
                shape = (self.transformer.config.sound_dim, r.sound_length)
                sound_latents.append(randn_tensor(shape, generator=r.generator, device=device, dtype=torch.float32))
            if r.action_x0 is not None:
                x0 = r.action_x0.to(device, torch.float32)
                noise = randn_tensor(tuple(x0.shape), generator=r.generator, device=device, dtype=torch.float32)
                clean = torch.zeros(x0.shape[0], 1, device=device)
                clean[list(r.action_condition)] = 1.0
                noise = clean * x0 + (1.0 - clean) * noise
                noise[:, r.raw_action_dim :] = 0  # padded channels stay zero
                actions.append(noise)
        latents = torch.stack(latents)  # [B, C, T, h, w]
        sound = torch.stack(sound_latents) if sound_latents else None  # [B, C_s, T_s]
        action = torch.stack(actions) if actions else None  # [B, chunk, action_dim]
        if action is not None:
            padded = torch.zeros_like(action[0, 0], dtype=torch.bool).repeat(B, 1)
            for b, r in enumerate(requests):
                padded[b, r.raw_action_dim :] = True
            padded = padded[:, None, :]  # [B, 1, action_dim]
            any_noisy = [len(r.action_condition) < r.action_x0.shape[0] for r in requests]

        # 2. The batch layout (conditional samples, then their negatives) and the text cache, once.
        def sample(r: _Request, ids: list[int]) -> Cosmos3Sample:
            return Cosmos3Sample(
                text_ids=ids, vision_shape=r.latent_shape[1:], fps=r.fps, vision_condition_frames=r.condition_frames,
                sound_length=r.sound_length, action_length=0 if r.action_x0 is None else r.action_x0.shape[0],
                action_condition_frames=r.action_condition, action_domain_id=r.action_domain_id,
            )

        samples = [sample(r, r.cond_ids) for r in requests]
        if cfg:
            samples += [sample(r, r.uncond_ids) for r in requests]
        layout = self.transformer.build_layout(samples, temporal_compression=int(self.vae.config.scale_factor_temporal))
        repeat = 2 if cfg else 1

        def step_inputs():  # the transformer's vision, sound and action inputs (twice over with guidance)
            return (latents.to(dtype).repeat(repeat, 1, 1, 1, 1),
                    None if sound is None else sound.to(dtype).repeat(repeat, 1, 1),
                    None if action is None else action.to(dtype).repeat(repeat, 1, 1))

        runner = None
        if getattr(self, "_cuda_graphs", False):
            runner = self._step_runner(layout, *step_inputs())
        else:
            text_kv = self.transformer.encode_text(layout)

        # 3. Steps.
        distilled = bool(self.config.distilled_sigmas)
        if distilled and (sound is not None or action is not None):
            raise ValueError("Sound and actions are not supported with a distilled (few-step) checkpoint yet; the "
                             "released students are text-to-image and image-to-video.")
        if distilled:
            self.scheduler.set_timesteps(sigmas=self.config.distilled_sigmas, device=device)
        elif self.config.use_native_flow_schedule:
            n_train = self.scheduler.config.num_train_timesteps
            sigmas = np.linspace(1.0 - 1.0 / n_train, 0.0, num_inference_steps + 1)[:-1]
            self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        sound_scheduler = copy.deepcopy(self.scheduler) if sound is not None else None
        action_scheduler = copy.deepcopy(self.scheduler) if action is not None else None
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                vision_in, sound_in, action_in = step_inputs()
                if runner is not None:
                    # the graph's outputs are overwritten by the next replay: the scheduler gets its own copy
                    out = [None if o is None else o.clone() for o in runner(vision_in, t, sound_in, action_in)]
                else:
                    out = self.transformer(layout, vision_in, t.item(), sound=sound_in, action=action_in,
                                           text_kv_cache=text_kv, return_dict=False)
                v = out[0].float()
                v_sound = out[1].float() if sound is not None else None
                v_action = None
                if action is not None:
                    v_action = out[2].float().masked_fill(padded.repeat(repeat, 1, 1), 0.0)
                if cfg:
                    v = v[B:] + guidance_scale * (v[:B] - v[B:])
                    if v_sound is not None:
                        v_sound = v_sound[B:] + guidance_scale * (v_sound[:B] - v_sound[B:])
                    if v_action is not None:
                        v_action = v_action[B:] + guidance_scale * (v_action[:B] - v_action[B:])
                if distilled:
                    latents = self._renoise_step(v, latents, i, requests, masks)
                else:
                    latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
                if sound is not None:
                    sound = sound_scheduler.step(v_sound, t, sound, return_dict=False)[0]
                if action is not None and any(any_noisy):
                    # The reference skips the action step when every token is clean (forward dynamics).
                    stepped = action_scheduler.step(v_action, t, action, return_dict=False)[0]
                    keep = torch.tensor(any_noisy, device=device)[:, None, None]
                    action = torch.where(keep, stepped, action).masked_fill(padded, 0.0)
                if callback_on_step_end is not None:
                    names = callback_on_step_end_tensor_inputs or []
                    outputs = callback_on_step_end(self, i, t, {k: v for k, v in (("latents", latents),) if k in names})
                    latents = outputs.pop("latents", latents).float()
                progress.update()

        # 4. Decode.
        waveform = None
        if sound is not None:
            waveform = Cosmos3SoundTokenizer(self.sound_tokenizer).decode(sound)
        if output_type == "latent":
            frames = latents
        else:
            decoded = self.vision_tokenizer.decode(latents)
            frames = self.video_processor.postprocess_video(decoded, output_type=output_type)
        actions = None
        if action is not None:
            actions = [a[:, : r.raw_action_dim].cpu() for a, r in zip(action, requests)]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames, waveform) if actions is None else (frames, waveform, actions)
        rate = int(self.sound_tokenizer.config.sampling_rate) if waveform is not None else None
        return Cosmos3PipelineOutput(frames=frames, sound=waveform, action=actions, sample_rate=rate)
