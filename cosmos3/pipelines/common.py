"""What every Cosmos 3 pipeline shares: components, loading, prompts, initial noise, the denoising loop, decoding.

The task pipelines (one file each) only turn their inputs into `cosmos3.conditioning.Cosmos3Request`s (prompt ids,
clean conditioning latents and which positions are clean) and pick their outputs; everything numerical lives here,
once, in named stages (`prepare_latents`, `prepare_model`, `set_schedule`, `guided_velocity`, `advance`, `decode`):

* **Same numbers as the reference** (`diffusers.Cosmos3OmniPipeline`) for one sample: identical prompt ids, the
  initial noise drawn with the sample's generator in the same order and shapes (vision, then sound, then actions),
  the same UniPC steps, guidance `v_u + g (v_c - v_u)` in float32, the same decode.
* **Batches**: every prompt x `num_*_per_prompt` sample and, with guidance, its negative, run through the
  transformer as one batch; the text tower runs once per request (`encode_text`), each step runs only the
  generation tower. A list of generators gives each sample exactly what it would get alone.
* Loads a published folder (`model_index.json` of `Cosmos3OmniPipeline`) with our `Cosmos3Transformer`;
  `save_pretrained` writes a folder both this library and the reference load (without warnings: flags the reference
  does not take live in `modular_model_index.json`). `from_pipe` works between our pipelines and from the reference.
* diffusers habits: `latents=` (the initial vision noise), `pipe._interrupt = True` in a callback, `variant=`,
  `enable_vae_tiling()`.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLWan, Cosmos3AVAEAudioTokenizer, DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from torch import Tensor

from ..conditioning import Cosmos3Request, check_video_size, guide, keep_clean, renoise
from ..models.layout import Cosmos3Layout
from ..models.transformer_cosmos3 import Cosmos3RotaryEmbedding, Cosmos3Transformer
from ..optimize import CUDAGraphStep, offload_text_tower
from ..step_cache import cached_step_factory, enable_pipeline_step_cache
from ..tokenizers.sound import Cosmos3SoundTokenizer
from ..tokenizers.text import PromptSettings, encode_prompts
from ..tokenizers.vision import Cosmos3VisionTokenizer

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


MODULAR_INDEX_FILE = "modular_model_index.json"
# Pipeline config keys `Cosmos3OmniPipeline.__init__` does not take: kept out of model_index.json (the reference warns
# twice about each), in the modular index instead, where the released distilled students carry them.
MODULAR_CONFIG_KEYS = ("distilled_sigmas",)

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


def read_modular_index(folder: str) -> dict:
    """The folder's `modular_model_index.json` (where the distilled students keep `distilled_sigmas`), {} if none."""
    import json
    import os

    path = os.path.join(folder, MODULAR_INDEX_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def as_our_transformer(reference) -> Cosmos3Transformer:
    """Our `Cosmos3Transformer` on a `diffusers.Cosmos3OmniTransformer`'s own tensors (same config and state-dict
    names, loaded strictly), without a copy: the two models share their weights, so train or quantize neither."""
    with torch.device("meta"):
        model = Cosmos3Transformer.from_config(reference.config)
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    # the rotary tables are the only tensors outside the state dict; cheap to build where the weights are
    cfg, device = model.config, reference.proj_in.weight.device
    model.rotary_emb = Cosmos3RotaryEmbedding(cfg.head_dim, cfg.rope_theta, list(cfg.rope_axes_dim)).to(device)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"as_our_transformer left tensors unset: {leftover}")
    return model.train(reference.training)


def _adopt_reference_transformer(pipeline, kwargs: dict) -> dict:
    """`from_pipe` kwargs with a reference pipeline's transformer as ours: diffusers would drop it (not our class)."""
    from diffusers import Cosmos3OmniTransformer

    transformer = getattr(pipeline, "transformer", None)
    if "transformer" not in kwargs and isinstance(transformer, Cosmos3OmniTransformer):
        kwargs = {**kwargs, "transformer": as_our_transformer(transformer)}
    return kwargs


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


@dataclass(frozen=True)
class CallLimits:
    """What one call may ask for, so a typo or a hostile request fails at once instead of running for hours.
    Override per pipeline: `pipe.limits = CallLimits(max_prompt_tokens=16384)`.

    Args:
        max_prompt_tokens: prompt ids after chat templating and the metadata sentences (the text tower's cost and
            positions grow with them; published prompts are a few hundred tokens).
        max_inference_steps: denoising steps (the reference's defaults are 35-50).
        max_new_tokens: tokens `Cosmos3TextGenerationPipeline` may generate per prompt.
        max_batch_size: samples of one call (prompts x `num_*_per_prompt`).
        max_frames: pixel frames of one generated clip or transfer window (the reference's longest is 189);
            `height x width` is bounded by `max_pixels`.
        max_pixels: pixels of one frame (720p is 0.92 M).
    """

    max_prompt_tokens: int = 4096
    max_inference_steps: int = 1000
    max_new_tokens: int = 8192
    max_batch_size: int = 256
    max_frames: int = 2049
    max_pixels: int = 4096 * 4096


def check_prompt_ids(ids: list[list[int]], limits: CallLimits, name: str = "prompt") -> None:
    """Refuse prompts longer than `limits.max_prompt_tokens` tokens, naming which and by how much."""
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    if len(ids[longest]) > limits.max_prompt_tokens:
        raise ValueError(f"`{name}` {longest} is {len(ids[longest])} tokens after templating, over the limit of "
                         f"{limits.max_prompt_tokens} (`pipe.limits = CallLimits(max_prompt_tokens=...)` raises it).")


# Integer and float settings that are sizes or counts: zero or less is never valid, and fails late and deep.
_POSITIVE_SUFFIXES = ("_dim", "_channels", "_size", "timesteps", "base_dim", "z_dim")
_POSITIVE_PREFIXES = ("num_", "scale_factor_")


def check_component_configs(folder: str, skip: set[str] = frozenset()) -> None:
    """Check the diffusers components' configs of a pipeline folder (the VAE, the scheduler, the sound tokenizer)
    against their classes before anything is built: a wrong type or a non-positive size is a ValueError naming the
    file and the key (diffusers would fail later, deep in a layer or at the first call). Unknown keys are logged
    and ignored, as diffusers does."""
    import inspect
    import json
    import logging
    import os

    import diffusers

    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        return  # diffusers' own error names the missing file
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except ValueError as e:  # not JSON, or not text at all
        raise ValueError(f"{index_path} is not valid JSON: {e}") from None
    if not isinstance(index, dict):
        raise ValueError(f"{index_path} must hold a JSON object, got {type(index).__name__}.")
    for name, entry in index.items():
        if name in skip or name == "transformer" or not isinstance(entry, list) or entry[:1] != ["diffusers"]:
            continue
        cls = getattr(diffusers, str(entry[1]), None)
        if cls is None:
            continue
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        path = os.path.join(folder, name, file)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}.")
        parameters = inspect.signature(cls.__init__).parameters
        unknown = sorted(k for k in config if not k.startswith("_") and k not in parameters)
        if unknown:
            logging.getLogger(__name__).warning("%s: keys %s are not %s arguments; ignored.", path, unknown,
                                                cls.__name__)
        for key, value in config.items():
            parameter = parameters.get(key)
            if parameter is None or parameter.default is inspect.Parameter.empty or parameter.default is None:
                continue
            _check_config_value(path, key, value, parameter.default)


def _check_config_value(path: str, key: str, value, default) -> None:
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind in (list, tuple):
        ok = isinstance(value, (list, tuple))
    elif kind is str:
        ok = isinstance(value, str)
    else:
        return
    if not ok:
        raise ValueError(f"{path}: `{key}` must be a {kind.__name__} (default {default!r}), got {value!r}.")
    sized = key.startswith(_POSITIVE_PREFIXES) or key.endswith(_POSITIVE_SUFFIXES)
    if sized and kind in (int, float) and default > 0 and value <= 0:
        raise ValueError(f"{path}: `{key}` must be > 0, got {value!r}.")
    if sized and kind in (list, tuple) and any(isinstance(v, (int, float)) and v <= 0 for v in value):
        raise ValueError(f"{path}: `{key}` must hold positive numbers, got {value!r}.")


def callback_results(value) -> dict:
    """What a `callback_on_step_end` returned: a dict of edited tensors; None (a callback that only watches, as
    diffusers users often write them) means no change."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"`callback_on_step_end` must return a dict of tensors (or None for no change), got "
                        f"{type(value).__name__}.")
    return value


def component_dtype(dtype, torch_dtype, component: str):
    """The dtype diffusers' `from_pretrained` gives `component`: `dtype` (or the deprecated `torch_dtype`), a dict
    looked up by component name, then its "default" (float32 when neither is there)."""
    if dtype is not None and torch_dtype is not None:
        raise ValueError("You have passed both `dtype` and `torch_dtype`. Please only pass `dtype`, "
                         "`torch_dtype` is deprecated.")
    dtype = torch_dtype if dtype is None else dtype
    if isinstance(dtype, dict):
        dtype = dtype.get(component, dtype.get("default", torch.float32))
    return dtype


def check_generators(generator, batch: int) -> list[torch.Generator | None]:
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

    # The model components' annotations are what diffusers' `from_pipe` carries a component over by (exact class).
    def __init__(
        self,
        transformer: Cosmos3Transformer,
        text_tokenizer,
        vae: AutoencoderKLWan,
        scheduler,
        sound_tokenizer: Cosmos3AVAEAudioTokenizer | None = None,
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
        """Load a folder in the reference layout; the transformer is always our `Cosmos3Transformer`.

        `variant="bf16"` reads `diffusion_pytorch_model.bf16.safetensors` (as `save_pretrained(variant=...)` names
        them) for every component, ours included. Flags the reference does not take (`distilled_sigmas`) are read
        from `modular_model_index.json` first, then from `model_index.json` where older folders kept them.
        """
        import os

        if "transformer" not in kwargs:
            # diffusers loads every other component; our transformer must get the dtype and variant it would get
            dtype = component_dtype(kwargs.get("dtype"), kwargs.get("torch_dtype"), "transformer")
            sub = os.path.join(str(pretrained_model_name_or_path), "transformer")
            kwargs["transformer"] = Cosmos3Transformer.from_pretrained(sub, dtype=dtype, variant=kwargs.get("variant"))
        kwargs.setdefault("enable_safety_checker", False)
        kwargs.setdefault("safety_checker", None)
        if kwargs.get("use_safetensors") is False:
            raise ValueError("cosmos3 loads safetensors only (`use_safetensors=False` would unpickle weights).")
        kwargs["use_safetensors"] = True  # diffusers would fall back to unpickling a .bin when a file is missing
        check_component_configs(str(pretrained_model_name_or_path), skip=set(kwargs))
        modular = read_modular_index(str(pretrained_model_name_or_path))
        for key in MODULAR_CONFIG_KEYS:
            if key not in kwargs and modular.get(key):
                kwargs[key] = modular[key]
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' `from_pipe`: a pipeline of this class on `pipeline`'s component objects and config flags.

        From any of our pipelines, and from a reference `Cosmos3OmniPipeline`, whose transformer becomes our
        `Cosmos3Transformer` on the reference's own weight tensors (no copy). As in diffusers, the new pipeline is
        cast to `dtype` (default float32), shared modules included: pass the pipeline's dtype to keep it.

        The reverse, `Cosmos3OmniPipeline.from_pipe(ours)`, needs the transformer passed:
        `transformer=cosmos3.testing.reference_transformer(ours.transformer, share_weights=True)`. diffusers carries
        over a model component only when its class is exactly the one its signature names, and otherwise drops it
        and raises that the transformer is missing; nothing on our side can change that.
        """
        kwargs = _adopt_reference_transformer(pipeline, kwargs)
        return super().from_pipe(pipeline, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Save in the reference layout: `model_index.json` names the reference classes (our transformer's weights
        and config are the reference's) and holds only flags the reference takes, so the folder loads in
        `Cosmos3OmniPipeline` as well as here, without warnings. `distilled_sigmas` goes to
        `modular_model_index.json` (with `is_distilled`, as the released students carry it)."""
        import json
        import os

        from ..io import atomic_write_json

        super().save_pretrained(save_directory, **kwargs)
        path = os.path.join(save_directory, "model_index.json")
        with open(path) as f:
            index = json.load(f)
        index["_class_name"] = "Cosmos3OmniPipeline"
        index["transformer"] = ["diffusers", "Cosmos3OmniTransformer"]
        moved = {key: index.pop(key, None) for key in MODULAR_CONFIG_KEYS}
        atomic_write_json(path, index, sort_keys=True)

        modular_path = os.path.join(save_directory, MODULAR_INDEX_FILE)
        modular = read_modular_index(str(save_directory))
        # A folder saved over an older one must not keep that one's schedule.
        modular = {k: v for k, v in modular.items() if k not in MODULAR_CONFIG_KEYS and k != "is_distilled"}
        modular.update({k: v for k, v in moved.items() if v})
        if moved["distilled_sigmas"]:
            modular["is_distilled"] = True
        if modular:
            atomic_write_json(modular_path, modular)
        elif os.path.exists(modular_path):
            os.remove(modular_path)

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. in `callback_on_step_end`) to skip the remaining steps: the call then
        decodes the latents as they are, as diffusers pipelines do. Reset at the start of each call."""
        return getattr(self, "_interrupt", False)

    @property
    def current_timestep(self):
        """The timestep being denoised (None outside the loop), as diffusers pipelines report it."""
        return getattr(self, "_current_timestep", None)

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
        self._graph_capture = bool(capture)
        self._graph_step = None
        self.model_step_factory = type(self).graph_model_step if enabled else None

    def enable_step_cache(self, config="balanced") -> None:
        """Reuse the generation tower's residual on steps where the latents barely changed (cosmos3.step_cache).

        `config`: a preset, "quality", "balanced" (diffusers' default SeaCache) or "fast", a `SeaCacheConfig` or a
        `FirstBlockCacheConfig` (diffusers' classes), or None to turn caching off. Each sample of a batch decides
        for itself. Call after `enable_cuda_graphs(capture=False)` if both are wanted (captured graphs cannot skip).
        """
        enable_pipeline_step_cache(self, config)

    def enable_vae_tiling(self, tile_sample_min_height: int | None = None, tile_sample_min_width: int | None = None,
                          tile_sample_stride_height: int | None = None,
                          tile_sample_stride_width: int | None = None) -> None:
        """Decode (and encode conditioning frames) in overlapping spatial tiles: `AutoencoderKLWan.enable_tiling`,
        which keeps the VAE's current sizes (256-pixel tiles every 192 unless set before) for those not given.

        Memory for large frames, at a price in fidelity near the seams: Wan's decoder attends over the whole frame
        in its middle block, so tiled frames are close to the whole-frame decode, never equal.
        """
        if not hasattr(self.vae, "enable_tiling"):
            raise TypeError(f"VAE tiling needs a VAE with `enable_tiling` (AutoencoderKLWan), got "
                            f"{type(self.vae).__name__}.")
        factor = int(self.vae.config.scale_factor_spatial)
        sizes = dict(tile_sample_min_height=tile_sample_min_height, tile_sample_min_width=tile_sample_min_width,
                     tile_sample_stride_height=tile_sample_stride_height,
                     tile_sample_stride_width=tile_sample_stride_width)
        for name, value in sizes.items():
            # the VAE floors sizes to whole latents: any other value would blend tiles at the wrong offsets
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0
                                      or value % factor):
                raise ValueError(f"`{name}` must be a positive multiple of {factor} (the VAE's spatial factor), "
                                 f"got {value!r}.")
        for axis in ("height", "width"):
            size = sizes[f"tile_sample_min_{axis}"] or getattr(self.vae, f"tile_sample_min_{axis}")
            stride = sizes[f"tile_sample_stride_{axis}"] or getattr(self.vae, f"tile_sample_stride_{axis}")
            if stride > size:  # tiles would leave gaps
                raise ValueError(f"`tile_sample_stride_{axis}` {stride} must not exceed `tile_sample_min_{axis}` "
                                 f"{size}.")
        self.vae.enable_tiling(**sizes)

    def disable_vae_tiling(self) -> None:
        """Decode whole frames again (the default)."""
        self.vae.disable_tiling()

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
    # Requests: call arguments -> what is clean and what is noisy (cosmos3.conditioning)
    # ---------------------------------------------------------------------------------------------------------

    @property
    def vision_tokenizer(self) -> Cosmos3VisionTokenizer:
        return Cosmos3VisionTokenizer(self.vae)

    limits = CallLimits()

    def encode_prompt(self, prompts: list[str], negatives: list[str | None], settings: PromptSettings):
        """Prompt and negative token ids for each prompt (see `cosmos3.tokenizers.text.encode_prompts`), each at most
        `self.limits.max_prompt_tokens` long."""
        cond, uncond = encode_prompts(self.text_tokenizer, prompts, negatives, settings)
        check_prompt_ids(cond, self.limits, "prompt")
        check_prompt_ids(uncond, self.limits, "negative_prompt")
        return cond, uncond

    def prompt_settings(self, num_frames, height, width, fps, use_system_prompt=None, add_resolution_template=True,
                        add_duration_template=True, action_mode=None, action_view_point=None) -> PromptSettings:
        """The prompt sentences a call with these arguments gets (`use_system_prompt=None`: the folder's default)."""
        if use_system_prompt is None:
            use_system_prompt = self.config.default_use_system_prompt
        return PromptSettings(
            num_frames=num_frames, height=height, width=width, fps=fps, use_system_prompt=use_system_prompt,
            add_resolution_template=add_resolution_template, add_duration_template=add_duration_template,
            action_mode=action_mode, action_view_point=action_view_point,
        )

    def expand_prompts(self, prompt, negative_prompt, per_prompt: int) -> tuple[list[str], list[str | None]]:
        """Prompts and their negatives, each repeated `per_prompt` times (one negative may serve every prompt)."""
        prompts = _as_prompt_list("prompt", prompt, allow_none=False)
        negatives = _as_prompt_list("negative_prompt", negative_prompt, allow_none=True)
        if negatives is not None and len(negatives) not in (1, len(prompts)):
            raise ValueError(f"`negative_prompt` has {len(negatives)} entries for {len(prompts)} prompts.")
        if negatives is None:
            negatives = [None] * len(prompts)
        elif len(negatives) == 1:
            negatives = negatives * len(prompts)
        if not isinstance(per_prompt, int) or isinstance(per_prompt, bool) or per_prompt < 1:
            raise ValueError(f"`num_*_per_prompt` must be a positive int, got {per_prompt!r}.")
        if len(prompts) * per_prompt > self.limits.max_batch_size:
            raise ValueError(f"{len(prompts)} prompts x `num_*_per_prompt`={per_prompt} is over the limit of "
                             f"{self.limits.max_batch_size} samples per call (`pipe.limits = "
                             "CallLimits(max_batch_size=...)` raises it).")
        prompts = [p for p in prompts for _ in range(per_prompt)]
        negatives = [n for n in negatives for _ in range(per_prompt)]
        return prompts, negatives

    def check_call(self, num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs):
        """The sampler arguments every task takes, checked before anything runs."""
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
        if num_inference_steps > self.limits.max_inference_steps:
            raise ValueError(f"`num_inference_steps`={num_inference_steps} is over the limit of "
                             f"{self.limits.max_inference_steps} (`pipe.limits = CallLimits(max_inference_steps=...)` "
                             "raises it).")
        if (not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool)
                or not math.isfinite(guidance_scale) or guidance_scale < 0):
            raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {guidance_scale!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        bad = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` {bad} are not in {self._callback_tensor_inputs}.")

    def check_extent(self, num_frames: int, height: int, width: int) -> None:
        """Refuse clips larger than `self.limits` allows before any tensor of that size is made."""
        if num_frames > self.limits.max_frames:
            raise ValueError(f"`num_frames`={num_frames} is over the limit of {self.limits.max_frames} "
                             "(`pipe.limits = CallLimits(max_frames=...)` raises it).")
        if height * width > self.limits.max_pixels:
            raise ValueError(f"{height}x{width} is over the limit of {self.limits.max_pixels} pixels per frame "
                             "(`pipe.limits = CallLimits(max_pixels=...)` raises it).")

    def prepare_requests(self, prompt, negative_prompt=None, *, num_per_prompt: int = 1, num_frames: int,
                         height: int, width: int, fps: float = 24.0, enable_sound: bool = False,
                         use_system_prompt: bool | None = None, add_resolution_template: bool = True,
                         add_duration_template: bool = True) -> list[Cosmos3Request]:
        """The text-conditioned requests of a text/image/video-to-video call (nothing clean yet: the image and video
        tasks add their conditioning latents). Also what distillation trains a student on (`pipeline_prompts`)."""
        check_video_size(num_frames, height, width, temporal_factor=int(self.vae.config.scale_factor_temporal),
                         spatial_factor=int(self.vae.config.scale_factor_spatial))
        self.check_extent(num_frames, height, width)
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"`fps` must be a positive number, got {fps!r}.")
        if enable_sound and (self.sound_tokenizer is None or not self.transformer.config.sound_gen):
            raise ValueError("`enable_sound=True` needs a `sound_tokenizer` and a transformer with sound_gen=True.")
        prompts, negatives = self.expand_prompts(prompt, negative_prompt, num_per_prompt)
        settings = self.prompt_settings(num_frames, height, width, fps, use_system_prompt, add_resolution_template,
                                        add_duration_template)
        cond, uncond = self.encode_prompt(prompts, negatives, settings)
        shape = self.vision_tokenizer.latent_shape(num_frames, height, width)
        sound_length = Cosmos3SoundTokenizer(self.sound_tokenizer).latent_length(num_frames, fps) if enable_sound else 0
        return [Cosmos3Request(c, negative_ids=u, vision_shape=shape, fps=float(fps), sound_length=sound_length)
                for c, u in zip(cond, uncond)]

    # ---------------------------------------------------------------------------------------------------------
    # The denoising loop, in stages: prepare latents, schedule, one guided step, decode. `model_step_factory`
    # replaces how a step runs the model (a captured graph, a split over devices, a step cache) and nothing else.
    # ---------------------------------------------------------------------------------------------------------

    model_step_factory = None

    def prepare_latents(self, requests: list[Cosmos3Request], generators: list[torch.Generator | None],
                        latents: Tensor | None = None) -> DenoisingState:
        """The initial noise, per sample with its own generator in the reference's order (vision, then sound, then
        actions), with the clean positions already in place.

        `latents` (`[B, C, T, h, w]`, any float dtype) replace the vision noise, which is then not drawn (the
        generators still draw sound and actions, as the reference's). Unlike the reference, which starts from them
        as they are, the clean frames are put in place over them, so the conditioning cannot be lost; latents that
        hold them already (the reference's own initial noise) give the reference's result.
        """
        device = self._execution_device
        given = self.check_latents(latents, requests)
        vision, sounds, actions = [], [], []
        for b, (r, g) in enumerate(zip(requests, generators)):
            if given is None:
                noise = randn_tensor((1, *r.vision_shape), generator=g, device=device, dtype=torch.float32)[0]
            else:
                noise = given[b].to(device=device, dtype=torch.float32)
            vision.append(keep_clean(noise, r.vision, r.clean_mask("vision", device)) if r.vision_condition_frames
                          else noise)
            if r.sound_length:
                shape = (self.transformer.config.sound_dim, r.sound_length)
                sounds.append(randn_tensor(shape, generator=g, device=device, dtype=torch.float32))
            if r.action is not None:
                noise = randn_tensor(tuple(r.action.shape), generator=g, device=device, dtype=torch.float32)
                noise = keep_clean(noise, r.action.float(), r.clean_mask("action", device))
                noise[:, _raw_width(r) :] = 0  # padded channels stay zero
                actions.append(noise)
        state = DenoisingState(requests=requests, generators=generators, vision=torch.stack(vision),
                               sound=torch.stack(sounds) if sounds else None,
                               action=torch.stack(actions) if actions else None)
        if state.action is not None:
            padded = torch.zeros_like(state.action[:, 0], dtype=torch.bool)  # [B, action_dim]
            for b, r in enumerate(requests):
                padded[b, _raw_width(r) :] = True
            state.action_padded = padded[:, None, :]  # [B, 1, action_dim]
            state.action_noisy = [len(r.action_condition_frames) < r.action_length for r in requests]
        return state

    def check_latents(self, latents, requests: list[Cosmos3Request]) -> Tensor | None:
        """`latents` if they fit `requests` (one `[C, T, h, w]` per sample, stacked), else a clear error."""
        if latents is None:
            return None
        if not isinstance(latents, Tensor) or not latents.is_floating_point():
            got = f"a {latents.dtype} tensor" if isinstance(latents, Tensor) else type(latents).__name__
            raise TypeError(f"`latents` must be a floating-point torch.Tensor, got {got}.")
        shapes = {r.vision_shape for r in requests}
        if len(shapes) > 1:
            raise ValueError(f"`latents` needs one latent shape for the batch; its samples have {sorted(shapes)}.")
        expected = (len(requests), *shapes.pop())
        if tuple(latents.shape) != expected:
            raise ValueError(f"`latents` must be [{', '.join(map(str, expected))}] (samples, channels, latent frames, "
                             f"height / {self.vae.config.scale_factor_spatial}, width / "
                             f"{self.vae.config.scale_factor_spatial}), got {tuple(latents.shape)}.")
        return latents

    def prepare_model(self, state: DenoisingState, guidance_scale: float) -> None:
        """The batch layout (the samples, then their negatives with guidance) and the step's model function."""
        state.guidance_scale = guidance_scale
        state.cfg = guidance_scale != 1.0  # as the reference: any other scale runs the negative pass
        samples = [r.to_sample() for r in state.requests]
        if state.cfg:
            samples += [r.to_sample(negative=True) for r in state.requests]
        state.layout = self.transformer.build_layout(
            samples, temporal_compression=int(self.vae.config.scale_factor_temporal))
        factory = self.model_step_factory or type(self).eager_model_step
        if self.transformer.is_cache_enabled and not getattr(factory, "is_step_cache", False):
            # `pipe.transformer.enable_cache(SeaCacheConfig())`, the diffusers habit: steps enter the cache context
            factory = cached_step_factory(self.model_step_factory)
        state.model_step = factory(self, state.layout, self.step_inputs(state))

    def step_inputs(self, state: DenoisingState) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The transformer's vision, sound and action inputs of the current latents (twice over with guidance)."""
        dtype, repeat = self.transformer.dtype, 2 if state.cfg else 1
        return (state.vision.to(dtype).repeat(repeat, 1, 1, 1, 1),
                None if state.sound is None else state.sound.to(dtype).repeat(repeat, 1, 1),
                None if state.action is None else state.action.to(dtype).repeat(repeat, 1, 1))

    def eager_model_step(self, layout, inputs):
        """The default model step: the text tower once for the request, then the generation tower per step."""
        text_kv = self.transformer.encode_text(layout)

        def step(vision, t, sound, action):
            return self.transformer(layout, vision, t.item(), sound=sound, action=action, text_kv_cache=text_kv,
                                    return_dict=False)

        return step

    def graph_model_step(self, layout, inputs):
        """The model step replayed from a CUDA graph (`enable_cuda_graphs`); its outputs are copied because the
        next replay overwrites them."""
        runner = self._step_runner(layout, *inputs)

        def step(vision, t, sound, action):
            return [None if o is None else o.clone() for o in runner(vision, t, sound, action)]

        return step

    def set_schedule(self, state: DenoisingState, num_inference_steps: int) -> Tensor:
        """The timesteps: the checkpoint's fixed few-step sigmas, the native flow schedule, or the scheduler's own;
        sound and actions step with copies of the scheduler (each keeps its own multistep history)."""
        device = self._execution_device
        state.distilled = bool(self.config.distilled_sigmas)
        if state.distilled and (state.sound is not None or state.action is not None):
            raise ValueError("Sound and actions are not supported with a distilled (few-step) checkpoint yet; the "
                             "released students are text-to-image and image-to-video.")
        if state.distilled:
            self.scheduler.set_timesteps(sigmas=self.config.distilled_sigmas, device=device)
        elif self.config.use_native_flow_schedule:
            n_train = self.scheduler.config.num_train_timesteps
            sigmas = np.linspace(1.0 - 1.0 / n_train, 0.0, num_inference_steps + 1)[:-1]
            self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        state.sound_scheduler = copy.deepcopy(self.scheduler) if state.sound is not None else None
        state.action_scheduler = copy.deepcopy(self.scheduler) if state.action is not None else None
        self._num_timesteps = len(self.scheduler.timesteps)
        return self.scheduler.timesteps

    def guided_velocity(self, state: DenoisingState, t: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The model's velocities at `t` in float32, guided (`v_u + g (v_c - v_u)`) for every stream."""
        vision, sound, action = self.step_inputs(state)
        out = state.model_step(vision, t, sound, action)
        velocities = [out[0].float(), None if state.sound is None else out[1].float(), None]
        if state.action is not None:
            repeat = 2 if state.cfg else 1
            velocities[2] = out[2].float().masked_fill(state.action_padded.repeat(repeat, 1, 1), 0.0)
        if state.cfg:  # the batch is the samples, then their negatives
            B = len(state.requests)
            velocities = [None if v is None else guide(v[:B], v[B:], state.guidance_scale) for v in velocities]
        return tuple(velocities)

    def advance(self, state: DenoisingState, i: int, t: Tensor, velocities) -> None:
        """Step every stream from `t` to the next timestep."""
        v, v_sound, v_action = velocities
        if state.distilled:
            state.vision = self.renoise_step(v, state.vision, i, state.requests, state.generators)
        else:
            state.vision = self.scheduler.step(v, t, state.vision, return_dict=False)[0]
        if state.sound is not None:
            state.sound = state.sound_scheduler.step(v_sound, t, state.sound, return_dict=False)[0]
        if state.action is not None and any(state.action_noisy):
            # The reference skips the action step when every token is clean (forward dynamics).
            stepped = state.action_scheduler.step(v_action, t, state.action, return_dict=False)[0]
            keep = torch.tensor(state.action_noisy, device=stepped.device)[:, None, None]
            state.action = torch.where(keep, stepped, state.action).masked_fill(state.action_padded, 0.0)

    def renoise_step(self, velocity: Tensor, latents: Tensor, i: int, requests: list[Cosmos3Request],
                     generators: list[torch.Generator | None]) -> Tensor:
        """The distilled students' step (`cosmos3.conditioning.renoise`) for a batch: fresh noise per sample from its
        own generator, drawn as the scheduler's stochastic step draws it, and the clean frames put back."""
        sigma, next_sigma = self.scheduler.sigmas[i].item(), self.scheduler.sigmas[i + 1].item()
        out = []
        for b, (r, g) in enumerate(zip(requests, generators)):
            noise = randn_tensor((1, 1, *latents.shape[1:]), generator=g, device=latents.device, dtype=latents.dtype)
            step = renoise(latents[b], velocity[b], sigma, next_sigma, noise[0, 0])
            if r.vision_condition_frames:
                step = keep_clean(step, r.vision, r.clean_mask("vision", step.device))
            out.append(step)
        return torch.stack(out)

    def decode(self, state: DenoisingState, output_type: str, return_dict: bool):
        """Frames (or latents), the waveform and the actions of the final latents, in the call's output type."""
        waveform = None
        if state.sound is not None:
            waveform = Cosmos3SoundTokenizer(self.sound_tokenizer).decode(state.sound)
        if output_type == "latent":
            frames = state.vision
        else:
            decoded = self.vision_tokenizer.decode(state.vision)
            frames = self.video_processor.postprocess_video(decoded, output_type=output_type)
        actions = None
        if state.action is not None:
            actions = [a[:, : _raw_width(r)].cpu() for a, r in zip(state.action, state.requests)]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames, waveform) if actions is None else (frames, waveform, actions)
        rate = int(self.sound_tokenizer.config.sampling_rate) if waveform is not None else None
        return Cosmos3PipelineOutput(frames=frames, sound=waveform, action=actions, sample_rate=rate)

    @torch.no_grad()
    def _generate(
        self,
        requests: list[Cosmos3Request],
        generator=None,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        output_type: str,
        return_dict: bool,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        latents: Tensor | None = None,
    ):
        """Sample `requests` (one generator, a list with one per request, or None) through the stages above;
        `latents`: the initial vision noise (see `prepare_latents`)."""
        self._guidance_scale = guidance_scale
        self._interrupt = False
        self._current_timestep = None
        state = self.prepare_latents(requests, check_generators(generator, len(requests)), latents)
        self.prepare_model(state, guidance_scale)
        timesteps = self.set_schedule(state, num_inference_steps)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:  # as the reference: skip the remaining steps, decode what there is
                    continue
                self._current_timestep = t
                self.advance(state, i, t, self.guided_velocity(state, t))
                if callback_on_step_end is not None:
                    names = callback_on_step_end_tensor_inputs or []
                    tensors = {k: v for k, v in (("latents", state.vision),) if k in names}
                    edits = callback_results(callback_on_step_end(self, i, t, tensors))
                    state.vision = edits.pop("latents", state.vision).float()
                progress.update()
        self._current_timestep = None
        return self.decode(state, output_type, return_dict)


@dataclass
class DenoisingState:
    """What changes while a request is sampled: the latents of each stream, and what the stages set up once."""

    requests: list[Cosmos3Request]
    generators: list[torch.Generator | None]
    vision: Tensor  # [B, C, T, h, w] float32
    sound: Tensor | None  # [B, C_s, T_s]
    action: Tensor | None  # [B, chunk, action_dim]
    action_padded: Tensor | None = None  # [B, 1, action_dim]: True past each sample's raw width
    action_noisy: list[bool] | None = None  # per sample: any action token generated
    layout: Cosmos3Layout | None = None
    model_step: Callable | None = None
    guidance_scale: float = 1.0
    cfg: bool = False
    distilled: bool = False
    sound_scheduler: object = None
    action_scheduler: object = None


def _raw_width(r: Cosmos3Request) -> int:
    return r.action.shape[1] if r.raw_action_dim is None else r.raw_action_dim

