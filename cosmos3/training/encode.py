"""Raw dataset samples -> training examples (`Cosmos3Request`s), conditioned exactly as the pipelines condition.

A model fine-tuned on examples that differ from what a pipeline later feeds it (other prompt sentences, another
resize, another canvas, unnormalized or differently padded actions, other clean frames) works worse for no visible
reason. So `ExampleEncoder` reuses the pipelines' own pieces rather than re-implementing them:

* **prompt ids**: `encode_prompts` with the `PromptSettings` the pipeline builds for the same call (system prompt,
  duration and resolution sentences; for world-action modes the structured action caption on the canvas size);
* **t2i / t2v / i2v frames**: `preprocess_image` per frame (aspect-preserving cover resize, centre crop, 8-bit
  quantization), which is what `Cosmos3ImageToVideoPipeline` does to its image; i2v marks latent frame 0 clean;
* **transfer**: the hints Cosmos-Transfer computes from the clip (`edge_map`, `blur_map`), each resized by the
  pipeline's `VideoProcessor` (`preprocess_video`, PIL bilinear, no crop), rounded to the transformer's dtype and
  encoded on its own, as `Cosmos3TransferPipeline` takes `control_videos`; the target goes through the same resize
  (the pipeline's path for its `video`), so it lines up with its hints pixel for pixel; the caption under the
  transfer system prompt without duration or resolution sentences;
* **world-action frames**: the cameras tiled side by side into one frame, then `action_canvas` (the resolution
  tier's canvas, downscaled, padded right/bottom) and the latents cropped back to the content, as
  `Cosmos3WorldActionPipeline` does; which latent frames and action tokens are clean follows the mode's table;
* **actions**: normalized with the dataset's `ActionNormalizer`, zero-padded to the model's `action_dim`, with the
  embodiment's domain id and raw width (the trainer masks the loss beyond it).

Everything stochastic (the mode of `task="mixed"`, caption dropout, control dropout) is drawn from a generator keyed by
(`seed`, the sample's episode and first frame, or its file path), so an example is the same in every worker, every
run and after a resume. Encoding runs where the VAE is (CPU by default, inside `DataLoaderWithSkips` workers);
the encoder is a plain picklable object.

Errors: options are checked up front (`ValueError` / `TypeError` naming the option and the valid values). A
sample that cannot become an example by itself (a clip shorter than `num_frames`) raises `UnusableSampleError`, a
`MediaDecodeError`, so `DataLoaderWithSkips` skips it with its default `catch`. A mismatch that every sample would
hit (the action width is not the embodiment's, a camera the sample does not have) raises `ValueError`, which the
loader does not catch: a misconfigured run stops instead of skipping its whole dataset.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..conditioning import (
    ACTION_MODES,
    RESOLUTION_BINS,
    Cosmos3Request,
    action_canvas,
    action_mode_conditioning,
    check_num_frames,
    check_video_size,
    tile_cameras,
)
from ..io import MediaDecodeError
from ..pipelines.transfer import HINTS
from ..tokenizers.action import (
    ACTION_DIM,
    EMBODIMENT_TO_RAW_ACTION_DIM,
    ActionNormalizer,
    get_embodiment,
)
from ..tokenizers.control import blur_map, edge_map
from ..tokenizers.text import (
    ACTION_VIEWPOINTS,
    SYSTEM_PROMPT_TRANSFER,
    PromptSettings,
    encode_prompts,
    load_text_tokenizer,
    special_ids,
)
from ..tokenizers.vision import Cosmos3VisionTokenizer, preprocess_image, preprocess_video

VISION_TASKS = ("t2i", "t2v", "i2v")
WORLD_ACTION_TASKS = (*ACTION_MODES, "mixed")
TASKS = (*VISION_TASKS, "transfer", *WORLD_ACTION_TASKS)
# The transfer hints a clip gives by itself (Cosmos-Transfer's on-the-fly maps, at their inference presets); depth,
# segmentation and world-scenario maps come from other models or simulators.
CLIP_HINTS = {"edge": edge_map, "blur": blur_map}
# Keys of the per-sample generator, so the mode draw and the dropout draws are independent.
_MODE_STREAM, _DROPOUT_STREAM, _CONTROL_DROPOUT_STREAM = 1, 2, 3


class UnusableSampleError(MediaDecodeError):
    """One sample cannot become an example (e.g. its clip is shorter than `num_frames`). A `MediaDecodeError`, so
    `DataLoaderWithSkips` (default `catch`) skips and reports it instead of ending the run."""


def normalizer_from_stats(
    stats: Mapping[str, Mapping[str, Any]],
    *,
    mode: str = "quantile",
    key: str = "action",
    embodiment: str | None = None,
    skip_dims: Sequence[int] = (),
    clip: bool | None = None,
) -> ActionNormalizer:
    """An `ActionNormalizer` from a LeRobot `meta/stats.json` (`LeRobotDataset(...).stats`), without a pass over
    the data: `quantile` uses q01/q99, `minmax` min/max, `meanstd` mean/std of column `key`.

    Save it next to the checkpoint (`normalizer.save(path)`): inference must normalize given actions and
    denormalize generated ones with the same statistics.
    """
    if not isinstance(stats, Mapping):
        raise TypeError(f"`stats` must be a mapping (LeRobotDataset.stats), got {type(stats).__name__}.")
    if key not in stats:
        raise ValueError(f"`stats` has no {key!r} entry (meta/stats.json keys: {sorted(stats)}); pass `key`.")
    names = {"quantile": ("q01", "q99"), "minmax": ("min", "max"), "meanstd": ("mean", "std")}
    if mode not in names:
        raise ValueError(f"`mode` must be one of {list(names)}, got {mode!r}.")
    missing = [n for n in names[mode] if n not in stats[key]]
    if missing:
        raise ValueError(f"`stats[{key!r}]` lacks {missing} (has {sorted(stats[key])}), needed for mode {mode!r}.")
    values = [np.asarray(stats[key][n], np.float64).reshape(-1).tolist() for n in names[mode]]
    stat_names = ("mean", "std") if mode == "meanstd" else ("low", "high")
    data = {
        "format": "cosmos3.action_normalizer", "version": 1, "mode": mode, "dim": len(values[0]),
        "domain_name": embodiment, "clip": mode == "quantile" if clip is None else bool(clip), "eps": 1e-6,
        "skip_dims": [int(d) for d in skip_dims], "stats": dict(zip(stat_names, values)),
    }  # fmt: skip
    return ActionNormalizer.from_dict(data)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_positive(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value) and value > 0


class ExampleEncoder:
    """Turn one raw sample (`LeRobotDataset` or `FolderDataset`) into a `Cosmos3Request`, as the pipelines condition.

    Args:
        vae: the pipeline's `vae` (an `AutoencoderKLWan`) or a `Cosmos3VisionTokenizer` around it.
        text_tokenizer: the pipeline's `text_tokenizer`.
        task: what the examples teach (see the table below); one of `TASKS`.
        height, width: pixel canvas of `t2i` / `t2v` / `i2v` (multiples of 16). World-action tasks place the clip
            on the `resolution_tier` canvas instead, as `Cosmos3WorldActionPipeline` does, and take neither.
        num_frames: pixel frames per example, `1 + 4k`; `t2i` uses 1 (the default there). Longer clips are cut to
            their first `num_frames`; shorter ones raise `UnusableSampleError`. World-action: `num_frames - 1`
            actions (the pipeline's `chunk_size`).
        cameras: LeRobot cameras to use, tiled side by side left to right (default: all of the sample's).
        embodiment: the action domain (`cosmos3.tokenizers.action`): gives the domain id and raw width. Required by
            world-action tasks.
        action_normalizer: fitted on this dataset (see `normalizer_from_stats`); required by world-action tasks.
        action_dim: the transformer's `action_dim` (actions are zero-padded to it).
        resolution_tier: world-action canvas tier (64, 128, 256, 480, 704, 720), as `ActionRequest.resolution_tier`.
        view_point: the action caption's framing (a key of `ACTION_VIEWPOINTS`; default `ego_view` for one camera,
            `concat_view` for several).
        mode_weights: `task="mixed"`: relative frequency of each world-action mode (default: equal).
        fps: frame rate written into prompts and layouts; default the sample's (LeRobot: the dataset's). Pass the
            same `fps` to the pipeline at inference.
        use_system_prompt, add_resolution_template, add_duration_template: as the pipelines' call arguments
            (defaults: the pipelines' defaults).
        caption_dropout: probability of training a sample on the unconditional prompt ids (what the pipeline's
            guidance pass feeds), keeping classifier-free guidance working after fine-tuning.
        hints: `task="transfer"`: the control clips computed from each clip, among `CLIP_HINTS` (default
            `("edge",)`); laid out in the pipeline's order (edge, blur) whatever the order given.
        control_dropout: `task="transfer"`: probability of training a sample without its hints (what the
            pipeline's "no control" pass feeds when `control_guidance` != 1), so control guidance stays meaningful.
        control_dtype: `task="transfer"`: the dtype of the transformer the pipeline will run; it rounds hint pixels
            to it before encoding (default: the VAE's dtype, as for a pipeline loaded in one dtype).
        seed: keys the per-sample draws (mixed mode, caption dropout, control dropout).
        device: where the VAE encodes (default CPU: encoding runs in the data-loader workers).

    | task | prompt | clean vision latent frames | actions (clean tokens) |
    |---|---|---|---|
    | `t2i` | caption, image sentences | none (1 frame) | none |
    | `t2v` | caption, video sentences | none | none |
    | `i2v` | caption, video sentences | frame 0 | none |
    | `transfer` | caption, transfer system prompt | none (the hints: `control`, all clean) | none |
    | `policy` | action caption | frame 0 | all generated |
    | `forward_dynamics` | action caption | frame 0 | all clean |
    | `inverse_dynamics` | action caption | all | all generated |
    | `mixed` | one of the three above per sample | | |

    Captions come from a `FolderDataset` sample's `caption` or a `LeRobotDataset` sample's `task`; any task can
    read LeRobot clips (e.g. t2v on robot videos), world-action tasks need their `action`.
    """

    def __init__(
        self,
        vae: Any,
        text_tokenizer: Any,
        *,
        task: str,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        cameras: Sequence[str] | None = None,
        embodiment: str | None = None,
        action_normalizer: ActionNormalizer | None = None,
        action_dim: int = ACTION_DIM,
        resolution_tier: int = 480,
        view_point: str | None = None,
        mode_weights: Mapping[str, float] | None = None,
        fps: float | None = None,
        use_system_prompt: bool = True,
        add_resolution_template: bool = True,
        add_duration_template: bool = True,
        caption_dropout: float = 0.0,
        hints: Sequence[str] | str | None = None,
        control_dropout: float = 0.0,
        control_dtype: torch.dtype | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(vae, Cosmos3VisionTokenizer):
            vae = vae.vae
        config = getattr(vae, "config", None)
        if not callable(getattr(vae, "encode", None)) or not all(
            hasattr(config, k) for k in ("scale_factor_spatial", "scale_factor_temporal", "z_dim", "latents_mean")
        ):
            raise TypeError(f"`vae` must be the pipeline's AutoencoderKLWan or a Cosmos3VisionTokenizer, got "
                            f"{type(vae).__name__}.")
        if not callable(getattr(text_tokenizer, "apply_chat_template", None)):
            raise TypeError(f"`text_tokenizer` must be the pipeline's text tokenizer (a transformers tokenizer with a "
                            f"chat template), got {type(text_tokenizer).__name__}.")
        special_ids(text_tokenizer)  # ValueError unless it is a Cosmos 3 tokenizer
        self.vae, self.text_tokenizer = vae, text_tokenizer
        tf, sf = int(config.scale_factor_temporal), int(config.scale_factor_spatial)

        if task not in TASKS:
            raise ValueError(f"`task` must be one of {list(TASKS)}, got {task!r}.")
        self.task = task
        world = task in WORLD_ACTION_TASKS
        if num_frames is None and task == "t2i":
            num_frames = 1
        check_num_frames(num_frames, tf)
        if task == "t2i" and num_frames != 1:
            raise ValueError(f"`num_frames` must be 1 for task 't2i' (use task 't2v' for videos), got {num_frames}.")
        if task not in ("t2i", "transfer") and num_frames == 1:  # transfer follows hints of one frame too
            raise ValueError(f"`num_frames` must be > 1 for task {task!r} (1 frame is an image: task 't2i').")
        self.num_frames = int(num_frames)

        if world:
            if height is not None or width is not None:
                raise ValueError(f"`height`/`width` do not apply to task {task!r}: world-action clips are placed on "
                                 "the `resolution_tier` canvas, as Cosmos3WorldActionPipeline does; pass "
                                 "`resolution_tier` instead.")
            if resolution_tier not in RESOLUTION_BINS:
                raise ValueError(f"`resolution_tier` must be one of {sorted(RESOLUTION_BINS)}, got "
                                 f"{resolution_tier!r}.")
        else:
            check_video_size(num_frames, height, width, temporal_factor=tf, spatial_factor=sf)
        self.height, self.width, self.resolution_tier = height, width, resolution_tier

        if cameras is not None:
            if isinstance(cameras, str):
                cameras = [cameras]
            if not cameras or not all(isinstance(c, str) and c for c in cameras):
                raise TypeError(f"`cameras` must be a non-empty list of camera names or None, got {cameras!r}.")
            cameras = list(cameras)
        self.cameras = cameras

        self.embodiment = self.raw_action_dim = self.domain_id = None
        if world:
            if embodiment is None:
                raise ValueError(f"Task {task!r} needs `embodiment` (the action domain); with a fixed action width: "
                                 f"{sorted(EMBODIMENT_TO_RAW_ACTION_DIM)}.")
            fixed = get_embodiment(embodiment).raw_dim  # ValueError listing the valid names
            if fixed is None:  # a domain whose width depends on the dataset (libero, no_action): the data's
                if not isinstance(action_normalizer, ActionNormalizer) or action_normalizer.dim is None:
                    raise ValueError(f"`embodiment` {embodiment!r} has no fixed action width; it is taken from "
                                     "`action_normalizer` (fitted on the dataset), which is missing or unfitted.")
                fixed = action_normalizer.dim
            self.raw_action_dim = fixed
            self.domain_id = get_embodiment(embodiment).domain_id
            self.embodiment = embodiment
            if not _is_int(action_dim) or action_dim < 1:
                raise ValueError(f"`action_dim` must be a positive int (the transformer's), got {action_dim!r}.")
            if self.raw_action_dim > action_dim:
                raise ValueError(f"`embodiment` {embodiment!r} actions are {self.raw_action_dim} wide, over "
                                 f"`action_dim`={action_dim}.")
            if action_normalizer is None:
                raise ValueError(f"Task {task!r} needs `action_normalizer` (fitted on this dataset; see "
                                 "`normalizer_from_stats(LeRobotDataset(...).stats, embodiment=...)`).")
            if not isinstance(action_normalizer, ActionNormalizer):
                raise TypeError(f"`action_normalizer` must be an ActionNormalizer, got "
                                f"{type(action_normalizer).__name__}.")
            if action_normalizer.stats is None:
                raise ValueError("`action_normalizer` is not fitted (use `normalizer_from_stats` or `.fit`).")
            if action_normalizer.dim != self.raw_action_dim:
                raise ValueError(f"`action_normalizer` is {action_normalizer.dim} wide, but `embodiment` "
                                 f"{embodiment!r} actions are {self.raw_action_dim} wide.")
            if action_normalizer.domain_name not in (None, embodiment):
                raise ValueError(f"`action_normalizer` is for domain {action_normalizer.domain_name!r}, not "
                                 f"`embodiment` {embodiment!r}.")
            if view_point is None:
                view_point = "concat_view" if cameras is not None and len(cameras) > 1 else None
            if view_point is not None and view_point not in ACTION_VIEWPOINTS:
                raise ValueError(f"`view_point` must be one of {sorted(ACTION_VIEWPOINTS)} or None, got "
                                 f"{view_point!r}.")
        else:
            given = {"embodiment": embodiment, "action_normalizer": action_normalizer, "view_point": view_point}
            extra = [k for k, v in given.items() if v is not None]
            if extra:
                raise ValueError(f"{extra} only apply to the world-action tasks {list(WORLD_ACTION_TASKS)}, "
                                 f"not {task!r}.")
        self.action_normalizer, self.action_dim, self.view_point = action_normalizer, int(action_dim), view_point

        self.mode_weights = None
        if task == "mixed":
            weights = dict.fromkeys(ACTION_MODES, 1.0) if mode_weights is None else dict(mode_weights)
            unknown = sorted(set(weights) - set(ACTION_MODES))
            if unknown:
                raise ValueError(f"`mode_weights` has unknown modes {unknown}; valid: {list(ACTION_MODES)}.")
            if not all(isinstance(w, numbers.Real) and np.isfinite(w) and w >= 0 for w in weights.values()) or not any(
                w > 0 for w in weights.values()
            ):
                raise ValueError(f"`mode_weights` must be finite numbers >= 0, not all 0, got {weights!r}.")
            total = float(sum(weights.values()))
            self.mode_weights = {m: float(weights.get(m, 0.0)) / total for m in ACTION_MODES}
        elif mode_weights is not None:
            raise ValueError(f"`mode_weights` only applies to task 'mixed', not {task!r}.")

        if fps is not None and not _is_positive(fps):
            raise ValueError(f"`fps` must be a positive number or None (the sample's), got {fps!r}.")
        for name, value in (("use_system_prompt", use_system_prompt), ("add_resolution_template",
                                                                     add_resolution_template),
                            ("add_duration_template", add_duration_template)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {value!r}.")
        if isinstance(caption_dropout, bool) or not isinstance(caption_dropout, numbers.Real) or not (
            0 <= caption_dropout < 1
        ):
            raise ValueError(f"`caption_dropout` must be a number in [0, 1), got {caption_dropout!r}.")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"`seed` must be an int >= 0, got {seed!r}.")
        self.hints, self.control_dropout, self.control_dtype = self._check_transfer_options(
            task, hints, control_dropout, control_dtype)
        self.fps = None if fps is None else float(fps)
        self.use_system_prompt = use_system_prompt
        self.add_resolution_template, self.add_duration_template = add_resolution_template, add_duration_template
        self.caption_dropout, self.seed = float(caption_dropout), int(seed)
        self.device = torch.device(device)

    @staticmethod
    def _check_transfer_options(task: str, hints, control_dropout, control_dtype):
        if task != "transfer":
            given = {"hints": hints, "control_dtype": control_dtype}
            extra = [k for k, v in given.items() if v is not None] + (["control_dropout"] if control_dropout else [])
            if extra:
                raise ValueError(f"{extra} only apply to task 'transfer', not {task!r}.")
            return None, 0.0, None
        if hints is None:
            hints = ("edge",)
        elif isinstance(hints, str):
            hints = (hints,)
        if not isinstance(hints, Sequence) or not hints or not all(isinstance(h, str) for h in hints):
            raise TypeError(f"`hints` must be a non-empty tuple of hint names among {list(CLIP_HINTS)}, got "
                            f"{hints!r}.")
        unknown = [h for h in hints if h not in CLIP_HINTS]
        if unknown:
            other = [h for h in unknown if h in HINTS]
            why = f" ({other} are not computable from the clip: give them to the pipeline instead)" if other else ""
            raise ValueError(f"`hints` has {unknown}{why}; valid (computable from the clip): {list(CLIP_HINTS)}.")
        if len(set(hints)) != len(hints):
            raise ValueError(f"`hints` names a hint twice: {list(hints)}.")
        if isinstance(control_dropout, bool) or not isinstance(control_dropout, numbers.Real) or not (
            0 <= control_dropout < 1
        ):
            raise ValueError(f"`control_dropout` must be a number in [0, 1), got {control_dropout!r}.")
        if control_dtype is not None and (not isinstance(control_dtype, torch.dtype)
                                          or not control_dtype.is_floating_point):
            raise TypeError(f"`control_dtype` must be a floating torch.dtype (the transformer's) or None, got "
                            f"{control_dtype!r}.")
        # the pipeline's order (`HINTS`), whatever the order given: a hint's place in the layout is part of it
        return tuple(h for h in HINTS if h in hints), float(control_dropout), control_dtype

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pipeline_folder: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        **options: Any) -> ExampleEncoder:
        """The VAE (`vae/`) and text tokenizer (`text_tokenizer/`) of a saved pipeline folder, and its defaults:
        `use_system_prompt` from `model_index.json`'s `default_use_system_prompt` (as the pipelines read it) and
        `action_dim` from `transformer/config.json`. `options` are the constructor's keyword arguments."""
        import diffusers

        folder = os.fspath(pipeline_folder)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{index_path} is missing: {folder!r} is not a saved pipeline folder.")
        with open(index_path) as f:
            index = json.load(f)
        library, class_name = index.get("vae", ["diffusers", "AutoencoderKLWan"])
        if library != "diffusers" or not hasattr(diffusers, class_name):
            raise ValueError(f"{index_path}: `vae` is {library}.{class_name}, not a diffusers autoencoder.")
        vae = getattr(diffusers, class_name).from_pretrained(os.path.join(folder, "vae"), torch_dtype=torch_dtype)
        tokenizer = load_text_tokenizer(folder, "text_tokenizer")
        options.setdefault("use_system_prompt", bool(index.get("default_use_system_prompt", True)))
        transformer_config = os.path.join(folder, "transformer", "config.json")
        if os.path.isfile(transformer_config) and options.get("task") in WORLD_ACTION_TASKS:
            with open(transformer_config) as f:
                options.setdefault("action_dim", int(json.load(f).get("action_dim", ACTION_DIM)))
        return cls(vae.eval(), tokenizer, **options)

    # ------------------------------------------------------------------------------------------------ encoding

    def mode_of(self, sample: Mapping[str, Any]) -> str:
        """The world-action mode (or the task) this sample is encoded in; `mixed` draws it from the sample's key."""
        if self.task != "mixed":
            return self.task
        modes = list(self.mode_weights)
        rng = self._rng(sample, _MODE_STREAM)
        return modes[int(rng.choice(len(modes), p=[self.mode_weights[m] for m in modes]))]

    def __call__(self, sample: Mapping[str, Any]) -> Cosmos3Request:
        """Encode one dataset sample (see the class docstring); runs under `no_grad` on `device`."""
        if not isinstance(sample, Mapping) or "frames" not in sample:
            raise TypeError(f"A sample must be a LeRobotDataset / FolderDataset dict with `frames`, got "
                            f"{type(sample).__name__}.")
        if self.vae.device != self.device:
            self.vae.to(self.device)
        with torch.no_grad():
            if self.task in WORLD_ACTION_TASKS:
                return self._world_action(sample, self.mode_of(sample))
            if self.task == "transfer":
                return self._transfer(sample)
            return self._vision(sample)

    def _vision(self, sample: Mapping[str, Any]) -> Cosmos3Request:
        frames = self._clip(sample)
        n = self.num_frames
        fps = self._fps(sample) if n > 1 else 24.0  # the text-to-image pipeline's value (no duration sentence)
        pixels = torch.cat([preprocess_image(frame, self.height, self.width) for frame in frames[:n]])
        video = pixels.permute(1, 0, 2, 3).unsqueeze(0).to(self.device)  # [1, 3, n, H, W]
        latents = Cosmos3VisionTokenizer(self.vae).encode(video.contiguous())[0].float().cpu()
        settings = PromptSettings(
            num_frames=n, height=self.height, width=self.width, fps=fps, use_system_prompt=self.use_system_prompt,
            add_resolution_template=self.add_resolution_template, add_duration_template=self.add_duration_template,
        )
        return Cosmos3Request(
            self._prompt_ids(sample, settings), vision=latents,
            vision_condition_frames=(0,) if self.task == "i2v" else (), fps=fps if n > 1 else None,
        )

    def _transfer(self, sample: Mapping[str, Any]) -> Cosmos3Request:
        clip = self._clip(sample)[: self.num_frames]
        # an image has no frame rate of its own: the pipeline's default, which a single frame's layout ignores
        fps = self._fps(sample) if self.num_frames > 1 or self.fps is not None else 24.0
        tokenizer = Cosmos3VisionTokenizer(self.vae)
        vae_dtype = self.vae.dtype
        # The target takes the pipeline's `video` path (VideoProcessor, no crop) so it lines up with the hints,
        # which the pipeline resizes that way; a cover crop would shift it against them when the aspects differ.
        target = preprocess_video(clip, height=self.height, width=self.width).to(self.device, vae_dtype)
        latents = tokenizer.encode(target.contiguous())[0].float().cpu()
        settings = PromptSettings(
            num_frames=self.num_frames, height=self.height, width=self.width, fps=fps,
            use_system_prompt=self.use_system_prompt, add_resolution_template=False, add_duration_template=False,
            system_prompt=SYSTEM_PROMPT_TRANSFER,
        )
        ids = self._prompt_ids(sample, settings)
        if self.control_dropout and self._rng(sample, _CONTROL_DROPOUT_STREAM).random() < self.control_dropout:
            # the pipeline's "no control" pass: the transfer prompt over the target alone
            return Cosmos3Request(ids, vision=latents, fps=fps)
        dtype = self.control_dtype or vae_dtype
        controls = []
        for name in self.hints:
            # `_preprocess_hint` of the pipeline on a uint8 map: PIL frames through its VideoProcessor, then the
            # transformer's dtype; `_denoise_window` encodes each hint on its own
            pixels = preprocess_video(CLIP_HINTS[name](clip), height=self.height, width=self.width)
            controls.append(tokenizer.encode(pixels.to(self.device, dtype).contiguous()).float().cpu())
        return Cosmos3Request(ids, vision=latents, fps=fps, control=torch.cat(controls).contiguous())

    def _world_action(self, sample: Mapping[str, Any], mode: str) -> Cosmos3Request:
        from PIL import Image

        if not isinstance(sample["frames"], Mapping) or sample.get("action") is None:
            raise ValueError(f"Task {self.task!r} needs LeRobotDataset samples with `action` (built with an "
                             f"`action_key`); got keys {sorted(sample)}.")
        frames = self._clip(sample)
        n, chunk = self.num_frames, self.num_frames - 1
        actions = torch.as_tensor(np.asarray(sample["action"]), dtype=torch.float32)
        if actions.ndim != 2 or actions.shape[1] != self.raw_action_dim:
            raise ValueError(f"The sample's `action` is {tuple(actions.shape)}, but `embodiment` "
                             f"{self.embodiment!r} takes [T, {self.raw_action_dim}] actions.")
        if actions.shape[0] < chunk:
            raise UnusableSampleError(f"{self._where(sample)}: {actions.shape[0]} actions, fewer than the "
                                      f"{chunk} of `num_frames`={n} (clips need num_frames - 1 actions).")
        fps = self._fps(sample)
        tokenizer = Cosmos3VisionTokenizer(self.vae)
        tf, sf = tokenizer.temporal_factor, tokenizer.spatial_factor
        # The pipeline's path from PIL frames: VideoProcessor, the tier's canvas, encode, crop to the content.
        clip = [Image.fromarray(np.ascontiguousarray(frame)) for frame in frames[:n]]
        canvas, height, width, content_h, content_w = action_canvas(clip, self.resolution_tier, n)
        latents = tokenizer.encode(canvas.to(self.device).float().contiguous())[0]
        latents = latents[:, :, : max(content_h // sf, 1), : max(content_w // sf, 1)].float().cpu().contiguous()
        view_point = self.view_point
        if view_point is None:  # the pipeline's default for one camera; the concatenated-views framing for several
            view_point = "concat_view" if self._num_cameras(sample) > 1 else "ego_view"
        settings = PromptSettings(
            num_frames=n, height=height, width=width, fps=fps, use_system_prompt=self.use_system_prompt,
            add_resolution_template=True, add_duration_template=True, action_mode=mode, action_view_point=view_point,
        )
        padded = torch.zeros(chunk, self.action_dim)
        padded[:, : self.raw_action_dim] = self.action_normalizer.normalize(actions[:chunk])
        vision_clean, action_clean = action_mode_conditioning(mode, (n - 1) // tf + 1, chunk)
        return Cosmos3Request(
            self._prompt_ids(sample, settings), vision=latents, vision_condition_frames=vision_clean, fps=fps,
            action=padded, action_condition_frames=action_clean, action_domain_id=self.domain_id,
            raw_action_dim=self.raw_action_dim,
        )

    # ------------------------------------------------------------------------------------------------ pieces

    def _clip(self, sample: Mapping[str, Any]) -> np.ndarray:
        """The sample's uint8 `[T >= num_frames, H, W, 3]` frames (cameras tiled); short clips are unusable."""
        frames = sample["frames"]
        frames = tile_cameras(frames, self.cameras) if isinstance(frames, Mapping) else np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"`frames` must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}.")
        if len(frames) < self.num_frames:
            raise UnusableSampleError(f"{self._where(sample)}: {len(frames)} frames, fewer than `num_frames`="
                                      f"{self.num_frames} of task {self.task!r}.")
        return frames

    def _num_cameras(self, sample: Mapping[str, Any]) -> int:
        return len(self.cameras) if self.cameras is not None else len(sample["frames"])

    def _fps(self, sample: Mapping[str, Any]) -> float:
        if self.fps is not None:
            return self.fps
        fps = sample.get("fps")
        if not _is_positive(fps):
            raise ValueError(f"{self._where(sample)}: the sample has no frame rate (`fps`={fps!r}); pass `fps`.")
        return float(fps)

    def _prompt_ids(self, sample: Mapping[str, Any], settings: PromptSettings) -> list[int]:
        text = sample.get("caption", sample.get("task"))
        if not isinstance(text, str):
            raise ValueError(f"{self._where(sample)}: the sample has no `caption` (folder) or `task` (LeRobot) text.")
        (cond,), (uncond,) = encode_prompts(self.text_tokenizer, [text], [None], settings)
        if self.caption_dropout and self._rng(sample, _DROPOUT_STREAM).random() < self.caption_dropout:
            return uncond
        return cond

    def _rng(self, sample: Mapping[str, Any], stream: int) -> np.random.Generator:
        """The sample's own generator: keyed by its episode and first frame (LeRobot) or its path (folders)."""
        if "episode_index" in sample and "frame_index" in sample:
            key = [0, int(sample["episode_index"]), int(sample["frame_index"])]
        elif isinstance(sample.get("path"), str):
            digest = hashlib.sha256(sample["path"].encode()).digest()
            key = [1, int.from_bytes(digest[:8], "little")]
        else:
            raise ValueError("Per-sample draws (task 'mixed', caption and control dropout) need the sample's "
                             "`episode_index` and `frame_index` (LeRobot) or `path` (folders).")
        return np.random.default_rng([self.seed, stream, *key])

    @staticmethod
    def _where(sample: Mapping[str, Any]) -> str:
        if "episode_index" in sample:
            return f"episode {sample['episode_index']} frame {sample.get('frame_index')}"
        return str(sample.get("path", "sample"))


__all__ = ["CLIP_HINTS", "TASKS", "ExampleEncoder", "UnusableSampleError", "normalizer_from_stats"]
