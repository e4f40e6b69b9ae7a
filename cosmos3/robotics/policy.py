"""`Cosmos3Policy`: a world-action checkpoint as a robot policy, with the interface LeRobot users know.

    policy = Cosmos3Policy.from_pretrained("runs/pusht/pipeline")      # a pipeline folder + policy_config.json
    policy.reset()
    action = policy.select_action(observation)                          # one action; a chunk every n_action_steps
    chunk = policy.predict_action_chunk(observation)                    # [chunk_size, action_dim]

Observations come in two conventions (the class docstring has the details): one observation as a dict of numpy
arrays (`observation.images.<camera>` uint8 `[H, W, 3]`, or openpi's `observation/image` and `prompt`), or a list
of them, answered in numpy; and LeRobot's batches (`[B, 3, H, W]` float tensors in [0, 1], `task` a list of B
strings), answered in torch tensors, so a lerobot-eval-style loop drives the policy as it drives LeRobot's own.
Several cameras are tiled side by side into one frame, as the Cosmos 3 DROID policy and `ExampleEncoder` do; a
batch or a list is one batched pipeline call.

Actions come out in the environment's units: the model's normalized actions are mapped back with the
`action_normalizer.json` saved next to the checkpoint by `cosmos3 train` (the same statistics it trained with).
"""

from __future__ import annotations

import collections
import json
import os
import threading
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from ..conditioning import tile_cameras
from ..io import atomic_write_json
from ..tokenizers.action import EMBODIMENT_TO_DOMAIN_ID, EMBODIMENT_TO_RAW_ACTION_DIM, ActionNormalizer
from ..tokenizers.text import ACTION_VIEWPOINTS

CONFIG_NAME = "policy_config.json"
NORMALIZER_NAME = "action_normalizer.json"
IMAGE_PREFIX = "observation.images."
# openpi's standard camera keys (its LIBERO / DROID examples' `observation/image`, `observation/wrist_image`), in the
# order they take the policy's cameras
OPENPI_IMAGE_KEYS = ("observation/image", "observation/wrist_image")


@dataclass
class PolicyConfig:
    """How a checkpoint is run as a policy (saved as `policy_config.json` in the checkpoint folder).

    Args:
        embodiment: the action domain (`cosmos3.tokenizers.action`).
        action_dim: unpadded action width (required for domains without a fixed one, e.g. libero).
        cameras: the cameras tiled left to right (names after `observation.images.`); None: all, sorted.
        chunk_size: actions predicted per call (the clip has chunk_size + 1 frames).
        n_action_steps: actions of each chunk executed before predicting the next (LeRobot's meaning).
        num_inference_steps, guidance_scale: the sampler (the released DROID policies: 4 steps).
        resolution_tier: the canvas tier the model was trained at (64, 128, 256, 480, 704, 720).
        view_point: the caption's framing; None: ego_view for one camera, concat_view for several.
        fps: the control rate written into the prompt (the dataset's fps at training).
    """

    embodiment: str
    action_dim: int | None = None
    cameras: list[str] | None = None
    chunk_size: int = 16
    n_action_steps: int = 8
    num_inference_steps: int = 30
    guidance_scale: float = 1.0
    resolution_tier: int = 256
    view_point: str | None = None
    fps: float = 10.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.embodiment not in EMBODIMENT_TO_DOMAIN_ID:
            raise ValueError(f"`embodiment` must be one of {sorted(EMBODIMENT_TO_DOMAIN_ID)}, got {self.embodiment!r}.")
        fixed = EMBODIMENT_TO_RAW_ACTION_DIM.get(self.embodiment)
        if self.action_dim is None:
            if fixed is None:
                raise ValueError(f"`embodiment` {self.embodiment!r} has no fixed action width: set `action_dim`.")
            self.action_dim = fixed
        for name in ("chunk_size", "n_action_steps", "num_inference_steps", "action_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        if self.n_action_steps > self.chunk_size:
            raise ValueError(f"`n_action_steps`={self.n_action_steps} exceeds `chunk_size`={self.chunk_size}.")
        if self.view_point is not None and self.view_point not in ACTION_VIEWPOINTS:
            raise ValueError(f"`view_point` must be one of {sorted(ACTION_VIEWPOINTS)} or None, got "
                             f"{self.view_point!r}.")
        if not (isinstance(self.fps, (int, float)) and self.fps > 0):
            raise ValueError(f"`fps` must be > 0, got {self.fps!r}.")

    @classmethod
    def load(cls, folder: str) -> PolicyConfig:
        path = os.path.join(folder, CONFIG_NAME)
        with open(path) as f:
            data = json.load(f)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; valid: {sorted(known)}.")
        return cls(**data)

    def save(self, folder: str) -> None:
        path = os.path.join(folder, CONFIG_NAME)
        atomic_write_json(path, asdict(self))


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype != torch.float32:  # numpy has no bfloat16
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def tile_frames(observation: dict, cameras: list[str] | None) -> np.ndarray:
    """The observation's camera frames side by side (left to right in `cameras` order; None: the observation's
    order), one uint8 `[H, W, 3]`, tiled exactly as `ExampleEncoder` tiles training clips. A frame may also be
    `[3, H, W]`, floats in [0, 1], or a torch tensor on any device (one sample of a LeRobot batch)."""
    images = {k: v for k, v in observation.items() if k.startswith(IMAGE_PREFIX)}
    if not images:
        raise ValueError(f"The observation has no camera frames (keys starting with {IMAGE_PREFIX!r}); it has "
                         f"{sorted(observation)}.")
    names = cameras if cameras is not None else [k[len(IMAGE_PREFIX):] for k in images]
    missing = [n for n in names if IMAGE_PREFIX + n not in images]
    if missing:
        raise ValueError(f"The observation lacks cameras {missing}; it has {[k[len(IMAGE_PREFIX):] for k in images]}.")
    clips = {}
    for name in names:
        frame = _to_numpy(images[IMAGE_PREFIX + name])
        if frame.ndim == 3 and frame.shape[0] == 3 and frame.shape[-1] != 3:  # CHW (openpi clients often send it)
            frame = frame.transpose(1, 2, 0)
        if frame.ndim != 3 or frame.shape[-1] != 3:
            batched = " (a batch: send torch tensors [B, 3, H, W] or a list of observations)" if frame.ndim == 4 else ""
            raise ValueError(f"Camera {name!r}: expected an [H, W, 3] image, got shape {frame.shape}{batched}.")
        if frame.dtype != np.uint8:
            if np.issubdtype(frame.dtype, np.floating) and frame.size and frame.min() >= 0.0 and frame.max() <= 1.0:
                frame = (frame * 255.0 + 0.5).astype(np.uint8)  # [0, 1] floats, as LeRobot tensors are
            else:
                found = f"values in [{frame.min()}, {frame.max()}]" if frame.size else "no pixels"
                raise ValueError(f"Camera {name!r}: expected uint8 or floats in [0, 1], got {frame.dtype} {found}.")
        clips[IMAGE_PREFIX + name] = frame[None]
    return tile_cameras(clips, None)[0]


def _standardize(observation: Any, cameras: list[str] | None = None) -> dict:
    """LeRobot keys from LeRobot- or openpi-style observations. openpi's standard `observation/image` and
    `observation/wrist_image` become the first and second of `cameras` (a key naming a camera exactly stays that
    camera, and the other key takes the first camera left); other `observation/<name>` images become `<name>`."""
    if not isinstance(observation, dict):
        raise TypeError(f"An observation must be a dict, got {type(observation).__name__}.")
    aliases = {}
    if cameras:
        named = [k.split("/", 1)[1] for k in OPENPI_IMAGE_KEYS]
        free_keys = [k for k, n in zip(OPENPI_IMAGE_KEYS, named) if n not in cameras]
        aliases = dict(zip(free_keys, [IMAGE_PREFIX + c for c in cameras if c not in named]))
    out, sources = {}, {}
    for key, value in observation.items():
        if not isinstance(key, str):
            raise TypeError(f"Observation keys must be strings, got {key!r}.")
        if key in ("prompt", "instruction", "language_instruction"):
            target = "task"
        elif key in aliases:
            target = aliases[key]
        elif key.startswith("observation/") and "image" in key:  # openpi's other cameras, e.g. DROID's
            target = IMAGE_PREFIX + key.split("/", 1)[1]
        elif key == "observation/state":
            target = "observation.state"
        else:
            target = key
        if target in sources and target.startswith(IMAGE_PREFIX):  # two frames for one camera: which is meant?
            raise ValueError(f"The observation has both `{sources[target]}` and `{key}`, the same camera "
                             f"{target[len(IMAGE_PREFIX):]!r}; send one.")
        out[target], sources[target] = value, key
    task = out.get("task")
    if not isinstance(task, str) or not task.strip():
        raise ValueError(f"The observation needs a non-empty instruction under `task` (or `prompt`), got {task!r}.")
    return out


def _lerobot_batch(observation: Any) -> tuple[list[dict], torch.device] | None:
    """A LeRobot batch (camera tensors `[B, 3, H, W]`) split into its B observations, with the device actions go
    back to; None for anything else (one observation, or a list of them)."""
    if not isinstance(observation, dict):
        return None
    frames = {k: v for k, v in observation.items() if isinstance(k, str) and k.startswith(IMAGE_PREFIX)}
    batched = {k: v for k, v in frames.items() if isinstance(v, torch.Tensor) and v.ndim == 4}
    if not batched:
        return None
    unbatched = sorted(set(frames) - set(batched))
    if unbatched:
        raise ValueError(f"A LeRobot batch needs every camera as a [B, 3, H, W] tensor: {list(batched)} are, "
                         f"{unbatched} are not.")
    first, images = next(iter(batched.items()))
    size = images.shape[0]
    if size < 1:
        raise ValueError(f"`{first}` is an empty batch (shape {tuple(images.shape)}).")
    task = observation.get("task")
    if isinstance(task, str):  # one instruction for every environment
        task = [task] * size
    if not (isinstance(task, list | tuple) and len(task) == size and all(isinstance(t, str) for t in task)):
        raise ValueError(f"`task` must be a list of {size} instructions (one per environment, as lerobot-eval "
                         f"passes them) or one str, got {task!r}.")
    samples = [{"task": t} for t in task]
    for key, value in observation.items():
        if key == "task":
            continue
        if (isinstance(value, torch.Tensor) and value.ndim >= 1) or isinstance(value, list | tuple):
            if len(value) != size:
                raise ValueError(f"`{key}` has {len(value)} rows, the batch {size} (`{first}` is "
                                 f"{tuple(images.shape)}).")
            for sample, row in zip(samples, value):
                sample[key] = row
        else:  # the same for every environment (e.g. a scalar tensor)
            for sample in samples:
                sample[key] = value
    return samples, images.device


class Cosmos3Policy:
    """A `Cosmos3WorldActionPipeline` run as a closed-loop policy.

    `select_action`, `predict_action_chunk` and `infer` take observations in either convention, and answer in
    that convention's types:

    * one observation (numpy / openpi style): a dict of `observation.images.<camera>` frames (uint8 `[H, W, 3]`,
      upright, as the environment adapters give them; `[3, H, W]` and floats in [0, 1] work too),
      `observation.state` (accepted, not used by the model) and `task`. A list of such dicts is a batch, one entry
      per environment. Answers are numpy float32: `select_action` `[action_dim]` (a list: `[B, action_dim]`),
      `predict_action_chunk` `[chunk_size, action_dim]` (a list: `[B, chunk_size, action_dim]`).
      openpi's keys work in the same dict: `prompt` for `task`, `observation/state`, and its standard cameras
      `observation/image` and `observation/wrist_image`: a policy with one camera takes `observation/image`
      whatever that camera is called; with several, `observation/image` is the first of `PolicyConfig.cameras`
      and `observation/wrist_image` the second (a camera itself called `image` or `wrist_image` keeps its key,
      and the other key takes the first camera left). Other `observation/<name>` images, and every one when
      `cameras` is None, are camera `<name>`.
    * a LeRobot batch (what lerobot-eval passes a `PreTrainedPolicy`): `observation.images.<camera>` torch
      tensors `[B, 3, H, W]` (float32 in [0, 1]), `observation.state` `[B, D]`, `task` a list of B strings (one
      str: the same for all). Answers are float32 torch tensors on the images' device: `select_action`
      `[B, action_dim]`, `predict_action_chunk` `[B, chunk_size, action_dim]`. Environment `i` is row `i`.

    `select_action` keeps one queue of `n_action_steps` actions per environment and predicts a chunk for those
    whose queue is empty; `reset()` clears the queues, as LeRobot's policies do.

    Args:
        pipeline: the world-action pipeline.
        config: the `PolicyConfig`.
        normalizer: maps model actions back to environment units (None: the model's actions as they are).
        seed: seeds the sampler's generator; successive chunks draw fresh noise from it (`reset(seed)` reseeds).

    Thread-safe (`cosmos3 serve-policy --max-concurrency N` calls `infer` from N threads): model calls take turns,
    since the pipeline's scheduler, VAE feature cache and captured CUDA graph hold per-call state.
    """

    def __init__(self, pipeline, config: PolicyConfig, normalizer: ActionNormalizer | None = None, seed: int = 0):
        if normalizer is not None and normalizer.dim != config.action_dim:
            raise ValueError(f"The action normalizer is {normalizer.dim} wide, the policy's actions "
                             f"{config.action_dim}.")
        if config.action_dim > pipeline.transformer.config.action_dim:
            model_dim = pipeline.transformer.config.action_dim
            raise ValueError(f"`action_dim`={config.action_dim} exceeds the model's {model_dim}.")
        self.pipeline, self.config, self.normalizer = pipeline, config, normalizer
        self.pipeline.set_progress_bar_config(disable=True)
        self._seed = seed
        # reentrant: select_action holds it across its queue check, the chunk it predicts and the pops
        self._lock = threading.RLock()
        self.reset(seed)

    @classmethod
    def from_pretrained(cls, folder: str, *, device: str | None = None, dtype: torch.dtype | None = None,
                        seed: int = 0, **overrides) -> Cosmos3Policy:
        """Load a pipeline folder with its `policy_config.json` (and `action_normalizer.json`, if present);
        `overrides` replace config fields (e.g. `n_action_steps=4`)."""
        from ..pipelines import Cosmos3WorldActionPipeline

        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise FileNotFoundError(f"{folder!r} has no {CONFIG_NAME}: write one with PolicyConfig(...).save(folder) "
                                    "(the embodiment, cameras and chunking the model was trained with).")
        config = PolicyConfig.load(folder)
        if overrides:
            config = PolicyConfig(**{**asdict(config), **overrides})
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        pipeline = Cosmos3WorldActionPipeline.from_pretrained(folder, dtype=dtype).to(device)
        path = os.path.join(folder, NORMALIZER_NAME)
        normalizer = ActionNormalizer.load(path, expected_dim=config.action_dim) if os.path.isfile(path) else None
        return cls(pipeline, config, normalizer, seed=seed)

    @property
    def metadata(self) -> dict:
        """What a policy-server client learns on connect."""
        c = self.config
        return {"policy": "cosmos3", "embodiment": c.embodiment, "action_dim": c.action_dim, "cameras": c.cameras,
                "chunk_size": c.chunk_size, "n_action_steps": c.n_action_steps, "fps": c.fps,
                "num_inference_steps": c.num_inference_steps, "normalized_actions": self.normalizer is None}

    def reset(self, seed: int | None = None, envs: list[int] | None = None) -> None:
        """Clear the action queues (call at each episode start); optionally reseed the sampler. `envs`: clear only
        these environments' queues (batched rollouts, where episodes end at different steps); no reseeding then."""
        with self._lock:
            if envs is not None:
                for i in envs:
                    self._queues.pop(i, None)
                return
            if seed is not None:
                self._seed = seed
            self._generator = torch.Generator().manual_seed(self._seed)
            self._queues: dict[int, collections.deque] = {}

    # ---------------------------------------------------------------------------------------------------- chunks

    def predict_action_chunk(self, observation: dict | list[dict]) -> np.ndarray | torch.Tensor:
        """The next `chunk_size` actions, `[chunk_size, action_dim]` (a list of observations or a LeRobot batch:
        `[B, chunk, dim]`, one batched model call; a tensor for a LeRobot batch)."""
        from PIL import Image

        from ..pipelines import ActionRequest

        batch = _lerobot_batch(observation)
        if batch is not None:
            samples, device = batch
            return torch.from_numpy(self.predict_action_chunk(samples)).to(device)
        single = isinstance(observation, dict)
        observations = [observation] if single else list(observation)
        if not observations:
            raise ValueError("`observation` is an empty list.")
        c = self.config
        observations = [_standardize(o, c.cameras) for o in observations]
        requests, prompts = [], []
        width = c.action_dim if c.embodiment not in EMBODIMENT_TO_RAW_ACTION_DIM else None
        for obs in observations:
            frame = tile_frames(obs, c.cameras)
            cameras = c.cameras or [k for k in obs if k.startswith(IMAGE_PREFIX)]
            view = c.view_point or ("ego_view" if len(cameras) == 1 else "concat_view")
            requests.append(ActionRequest(mode="policy", chunk_size=c.chunk_size, domain_name=c.embodiment,
                                          image=Image.fromarray(frame), resolution_tier=c.resolution_tier,
                                          view_point=view, action_dim=width))
            prompts.append(obs["task"].strip())
        # one generator per sample, drawn from the policy's stream: reproducible per episode seed, fresh per chunk
        with self._lock:
            seeds = torch.randint(0, 2**62, (len(requests),), generator=self._generator).tolist()
            out = self.pipeline(prompts, requests, fps=c.fps, num_inference_steps=c.num_inference_steps,
                                guidance_scale=c.guidance_scale, output_type="latent",
                                generator=[torch.Generator().manual_seed(s) for s in seeds])
        chunks = []
        for action in out.action:
            action = action.float().cpu()
            if self.normalizer is not None:
                action = self.normalizer.denormalize(action)
            chunks.append(action.numpy().astype(np.float32))
        return chunks[0] if single else np.stack(chunks)

    def select_action(self, observation: dict | list[dict],
                      env_ids: list[int] | None = None) -> np.ndarray | torch.Tensor:
        """One action per environment: pops its queue, refilled with the first `n_action_steps` of a new chunk
        when empty. For a list or a LeRobot batch, environments whose queues are empty are predicted together in
        one batch; `env_ids` names the environments (queue keys) of the entries (default: their positions)."""
        batch = _lerobot_batch(observation)
        if batch is not None:
            samples, device = batch
            return torch.from_numpy(self.select_action(samples, env_ids)).to(device)
        single = isinstance(observation, dict)
        observations = [observation] if single else list(observation)
        ids = list(range(len(observations))) if env_ids is None else list(env_ids)
        if len(ids) != len(observations) or len(set(ids)) != len(ids):
            raise ValueError(f"`env_ids` must be {len(observations)} distinct ids, got {env_ids!r}.")
        with self._lock:
            empty = [k for k, i in enumerate(ids) if not self._queues.get(i)]
            if empty:
                chunks = self.predict_action_chunk([observations[k] for k in empty])
                for k, chunk in zip(empty, chunks):
                    self._queues[ids[k]] = collections.deque(chunk[: self.config.n_action_steps])
            actions = [self._queues[i].popleft() for i in ids]
        return actions[0] if single else np.stack(actions)

    def infer(self, observation: dict) -> dict:
        """openpi's `BasePolicy.infer`: a whole chunk for one observation, `{"actions": [chunk, dim]}`."""
        return {"actions": self.predict_action_chunk(observation)}

    def infer_batch(self, observations: list[dict]) -> list[dict]:
        """`infer` for several observations in one batched model call (what `serve-policy --max-batch` calls):
        entry `i` equals `infer(observations[i])` run in list order. An observation failing the policy's checks
        (instruction, cameras, image layout) raises before any seed is drawn, so a caller can then run the batch's
        observations one by one and each gets the seed it would have got."""
        if not isinstance(observations, list | tuple) or not observations:
            raise ValueError(f"`observations` must be a non-empty list of dicts, got {observations!r:.80}.")
        return [{"actions": chunk} for chunk in self.predict_action_chunk(list(observations))]
