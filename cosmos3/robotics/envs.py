"""Simulator adapters for closed-loop evaluation and data collection, with every convention explicit.

    env = make_env("metaworld:reach-v3", image_size=128)   # a gymnasium.Env
    obs, info = env.reset(seed=0)  # {"observation.images.corner2": uint8 [H, W, 3] (upright), "observation.state":
                                   #  float32 [4], "task": "reach the goal position"}, {"seed": 0}
    obs, reward, terminated, truncated, info = env.step(action)      # info["is_success"]: bool
    frame = env.render()           # uint8 [H, W, 3] for rollout videos
    env.close()

Specs: `"pusht"`, `"metaworld:<task>"` (an MT1 task such as `reach-v3`), `"aloha"` / `"aloha:<task>"`
(`AlohaInsertion-v0`, the default, or `AlohaTransferCube-v0`). The simulators are optional dependencies
(`pip install 'cosmos3[robotics]'`); MuJoCo renders headless through EGL (`MUJOCO_GL=egl` is set when unset).

Conventions, per environment (`env.conventions` is the `ActionConventions` of what the adapter emits and takes):

* **pusht** (embodiment `pusht`, 10 Hz, 300 steps): action = absolute agent target (x, y) in [0, 512] px; no
  gripper; state = agent (x, y) px; camera `top` (96x96), upright as rendered.
* **metaworld** (`libero`, 80 Hz, 500 steps): action = hand xyz displacement (1 = 1 cm per step, world frame) and
  a gripper effort in [-1, 1] where -1 opens and +1 closes; state = hand xyz (m) and the gripper opening in
  [0, 1] (1 = open); camera `corner2` (any scene camera). The corner cameras render upside down (rotated 180
  degrees): the adapter turns them upright.
* **aloha** (`libero`, 50 Hz, 300 steps): action = per arm 6 absolute joint targets (rad) and a gripper target in
  [0, 1] where 1 is open; state = the joint positions in the same layout; camera `top` (480x640), upright.

Gymnasium: every adapter is a `gymnasium.Env`, so `check_env`, wrappers (`RecordEpisodeStatistics`, ...) and
vector environments (`SyncVectorEnv([lambda: make_env("pusht")] * 4)`) take it as it is. `AsyncVectorEnv` needs
`shared_memory=False`: its shared memory is read once, when it is built, which works for arrays (views) but
freezes the `task` strings at their initial value (gymnasium 1.x, Farama-Foundation/Gymnasium#1164).

* `action_space`: `Box(action_low, action_high)` float32 (the bounds below). `observation_space`: a `Dict` of
  `observation.images.<camera>` (`Box(0, 255, (H, W, 3), uint8)`), `observation.state` (float32 `Box` of the
  simulator's bounds; ALOHA's joint positions are unbounded) and `task` (`Text`, the instruction).
* `metadata`: `render_modes == ["rgb_array"]` (the only mode: observations are rendered anyway) and `render_fps ==
  fps`. `render_mode` is `"rgb_array"`; `gymnasium.make(..., render_mode="human")` adds its `HumanRendering`.
* Registered ids (importing this module registers them): `cosmos3/PushT-v0`, `cosmos3/MetaWorld-v0` (`task=`
  keyword, `reach-v3` by default) and `cosmos3/Aloha-v0` (`task=`); `gymnasium.make(id, **options)` builds what
  `make_env` builds, inside gymnasium's usual wrappers. `make_env` records the same `spec` (with its options), so
  `gymnasium.make(env.spec)` rebuilds an environment. No `max_episode_steps` is registered: the adapters truncate
  themselves (the constructors' `max_episode_steps`); `gymnasium.make(id, max_episode_steps=n)` adds a `TimeLimit`.

Choices that apply to every adapter:

* **Upright images.** `raw_image_flips[camera]` records how the simulator's render differs from upright; the
  adapter undoes it, so observations are upright and `conventions.image_flip` is `"none"`. MetaWorld's
  `upright=False` returns the raw renders instead (then `conventions.image_flip` is their flip).
* **Action validation.** A wrong shape, a non-numeric dtype (bool, complex, object) or a NaN / inf raises
  `ValueError` naming `action`. Out-of-range values are **clipped** to `[action_low, action_high]` (what the
  simulators do internally anyway: MetaWorld clips to [-1, 1], MuJoCo clamps joint targets to the actuators'
  ranges), and `info["action_clipped"]` says so; `out_of_range="error"` raises instead. `info["action"]` is the
  float32 action that was applied (what a dataset should record).
* **Episodes end at the first success** (`terminated`, as gym-pusht and gym-aloha do and LeRobot's eval
  expects), or with `truncated` after `max_episode_steps`. Stepping an ended episode raises `RuntimeError`.
* **`reset(seed=s)` reproduces an episode exactly** (same seed, same initial state and, for deterministic
  actions, the same trajectory). Seeds are ints in [0, 2**32) (what the simulators' generators take). `reset()`
  without a seed follows gymnasium: it draws the episode's seed from `np_random`, which the last seeded reset
  seeded (a fresh random generator before any), so the episodes after `reset(seed=s)` repeat too, and
  `info["seed"]` (the seed the simulator was reset with, in every reset's info) replays any of them.
  `reset(options=...)` takes no options (None or `{}`).
* **Several environments per process** (or per thread) render correctly: each MetaWorld adapter makes its own
  GL context current before rendering (gymnasium leaves the newest one current) and frees its MuJoCo GL objects
  in that context on `close()` (or garbage collection), not in whichever context is current then.
* **`render_quality="fast"`** (MuJoCo envs) turns shadows and multisampling off: about 7x faster on CPU
  renderers (llvmpipe), but the frames differ, so collect and evaluate with the same setting.
* **Placeholders.** `ActionConventions` requires every field; fields an environment has no channel for
  (rotation everywhere; the gripper of pusht, see `gripper_channels == ()`) hold the library defaults.

Embodiments (`cosmos3.tokenizers.action.EMBODIMENTS`): pusht has its own domain (`pusht`, 2-d). No registered
domain has MetaWorld's 4-d or ALOHA's 14-d layout, and no released checkpoint covers these simulators, so both
use `libero`, the one robot domain whose width is set per dataset (its projection is fine-tuned on the data).
For MetaWorld the semantics match too: LIBERO actions are end-effector deltas with a [-1, 1] gripper where -1
opens. ALOHA is bimanual joint space; `robomind-franka-dual` (bimanual) has a fixed 20-d pose layout that 14
joint targets do not fill meaningfully.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import difflib
import os
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..tokenizers.action import ActionConventions, flip_images

try:
    import gymnasium as gym
    from gymnasium import spaces
except ImportError:  # the `robotics` extra: without it the module still imports (the CLI reads its options), and
    gym = spaces = None  # every constructor raises the ImportError with the install hint before an object exists
_BASES = (abc.ABC,) if gym is None else (gym.Env, abc.ABC)

IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"
OUT_OF_RANGE = ("clip", "error")
RENDER_QUALITIES = ("full", "fast")
RENDER_MODES = ("rgb_array",)
# `observation_space["task"]`: one bound and charset for every environment, so that environments of different
# tasks (a multi-task vector environment) have equal observation spaces.
TASK_MAX_LENGTH = 256
TASK_CHARSET = string.ascii_letters + string.digits + string.punctuation + " "
GYM_IDS = {"pusht": "cosmos3/PushT-v0", "metaworld": "cosmos3/MetaWorld-v0", "aloha": "cosmos3/Aloha-v0"}
_MAX_SEED = 2**32
_INSTALL = "pip install 'cosmos3[robotics]'"


def _import(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"`{module}` is needed for this environment: {_INSTALL} ({e}).") from e


def _use_egl() -> None:
    """Headless MuJoCo: EGL unless the user chose a backend (must happen before mujoco creates a GL context)."""
    os.environ.setdefault("MUJOCO_GL", "egl")


def _image_size(value: Any, default: tuple[int, int] | None) -> tuple[int, int] | None:
    """`None` (the default), an int (square) or (height, width) -> (height, width) of positive ints."""
    if value is None:
        return default
    size = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size)
    ):
        raise ValueError(f"`image_size` must be an int or (height, width) of positive ints, got {value!r}.")
    return int(size[0]), int(size[1])


def _choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value


class RobotEnv(*_BASES):
    """One simulator episode at a time (a `gymnasium.Env`), with LeRobot-style observations and explicit conventions.

    Attributes (set by every subclass):
        name: The spec the environment was made from, e.g. `"metaworld:reach-v3"`.
        embodiment: Its action domain in `cosmos3.tokenizers.action.EMBODIMENTS`.
        robot_type: The robot, as LeRobot's `info.json` names it.
        task: The natural-language instruction (also `obs["task"]`).
        fps: Control rate (steps per second of simulated time).
        max_episode_steps: Steps after which an episode is truncated.
        action_dim / state_dim: Widths of `action` and `observation.state`.
        action_names / state_names: One name per channel.
        action_low / action_high: float32 bounds of valid actions (see `out_of_range`).
        gripper_channels: Action channels that command a gripper (empty: no gripper).
        cameras: Camera names; images are `obs["observation.images.<camera>"]`.
        image_size: (height, width) of the observation images.
        raw_image_flips: camera -> how the simulator's raw render differs from upright (`IMAGE_FLIPS`).
        conventions: `ActionConventions` of the emitted images and the accepted actions.
        out_of_range: `"clip"` (default) or `"error"` for actions outside the bounds.
        action_space / observation_space / metadata / render_mode / spec / np_random: gymnasium's (see the
            module docstring).
    """

    metadata: dict[str, Any] = {"render_modes": list(RENDER_MODES)}  # what `gymnasium.make` reads on the class

    name: str
    embodiment: str
    robot_type: str
    task: str
    fps: float
    max_episode_steps: int
    action_dim: int
    state_dim: int
    action_names: tuple[str, ...]
    state_names: tuple[str, ...]
    action_low: np.ndarray
    action_high: np.ndarray
    gripper_channels: tuple[int, ...]
    cameras: tuple[str, ...]
    image_size: tuple[int, int]
    raw_image_flips: dict[str, str]
    conventions: ActionConventions
    out_of_range: str = "clip"

    _steps: int | None = None  # steps taken in the current episode; None before the first reset
    _done: bool = False
    _closed: bool = False

    # --------------------------------------------------------------------------------------------- subclasses

    @abc.abstractmethod
    def _reset(self, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Start an episode: (camera -> upright uint8 image, state)."""

    @abc.abstractmethod
    def _step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, float, bool, dict[str, Any]]:
        """Apply a validated action: (images, state, reward, success, simulator info)."""

    @abc.abstractmethod
    def _render(self) -> np.ndarray:
        """A frame of the current state for videos."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the simulator."""

    # ------------------------------------------------------------------------------------------------ the API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Start a new episode: the one `seed` (an int in [0, 2**32)) determines, or without a seed one whose seed
        is drawn from `np_random`; returns (first observation, `{"seed": the episode's seed}`)."""
        self._check_open()
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < _MAX_SEED
        ):
            raise ValueError(f"`seed` must be None or an int in [0, 2**32), got {seed!r}.")
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"`options` must be None or a dict, got {type(options).__name__}.")
        if options:
            raise ValueError(f"`options` must be None or empty: {self.name} takes no reset options, got "
                             f"{dict(options)!r}.")
        seed = None if seed is None else int(seed)  # gymnasium's seeding takes Python ints only
        super().reset(seed=seed)
        # An unseeded episode still has a seed (reported in info): drawn from the generator the last seeded reset
        # seeded, so the episodes that follow `reset(seed=s)` are reproducible too.
        episode_seed = int(self.np_random.integers(_MAX_SEED)) if seed is None else seed
        self._steps = None  # until the simulator has reset
        images, state = self._reset(episode_seed)
        self._steps, self._done = 0, False
        return self._observation(images, state), {"seed": episode_seed}

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """Apply `action` [action_dim]; returns (obs, reward, terminated, truncated, info) with
        `info["is_success"]`, `info["action"]` (the applied float32 action) and `info["action_clipped"]`."""
        self._check_open()
        if self._steps is None:
            raise RuntimeError(f"{self.name}: call reset() before step().")
        if self._done:
            raise RuntimeError(f"{self.name}: the episode has ended (terminated or truncated); call reset().")
        applied, clipped = self.check_action(action)
        images, state, reward, success, sim_info = self._step(applied)
        self._steps += 1
        terminated = bool(success)
        truncated = not terminated and self._steps >= self.max_episode_steps
        self._done = terminated or truncated
        info = {**sim_info, "is_success": bool(success), "action": applied, "action_clipped": clipped,
                "step": self._steps}
        return self._observation(images, state), float(reward), terminated, truncated, info

    def render(self) -> np.ndarray:
        """A uint8 `[H, W, 3]` frame of the current state (upright), for rollout videos."""
        self._check_open()
        if self._steps is None:
            raise RuntimeError(f"{self.name}: call reset() before render().")
        return np.ascontiguousarray(self._render())

    def close(self) -> None:
        """Release the simulator (idempotent)."""
        if not self._closed:
            self._closed = True
            self._close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # release GL resources in order even when not closed explicitly
            self.close()

    def __enter__(self) -> RobotEnv:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, embodiment={self.embodiment!r}, action_dim={self.action_dim}, "
                f"state_dim={self.state_dim}, cameras={self.cameras}, image_size={self.image_size}, fps={self.fps})")

    # -------------------------------------------------------------------------------------------------- helpers

    @property
    def elapsed_steps(self) -> int:
        """Steps taken in the current episode (0 right after reset)."""
        return self._steps or 0

    @property
    def features(self) -> dict[str, dict[str, Any]]:
        """LeRobot feature specs of the observations and actions (for `LeRobotDatasetWriter`)."""
        height, width = self.image_size
        features: dict[str, dict[str, Any]] = {
            IMAGE_PREFIX + camera: {"dtype": "video", "shape": [height, width, 3],
                                    "names": ["height", "width", "channels"]}
            for camera in self.cameras
        }
        features[STATE_KEY] = {"dtype": "float32", "shape": [self.state_dim], "names": list(self.state_names)}
        features["action"] = {"dtype": "float32", "shape": [self.action_dim], "names": list(self.action_names)}
        return features

    def check_action(self, action: Any) -> tuple[np.ndarray, bool]:
        """`action` as a validated float32 `[action_dim]` array within the bounds, and whether it was clipped."""
        if hasattr(action, "detach"):  # a torch tensor (on any device)
            action = action.detach().cpu().numpy()
        array = np.asarray(action)
        if array.dtype.kind not in "fiu":
            raise ValueError(f"`action` must be a real numeric array, got dtype {array.dtype} for {self.name}.")
        if array.shape != (self.action_dim,):
            raise ValueError(f"`action` must have shape ({self.action_dim},) for {self.name}, got {array.shape}.")
        bad = ~np.isfinite(array)
        if bad.any():
            raise ValueError(f"`action` has NaN or inf at channels {np.flatnonzero(bad).tolist()}: {array.tolist()}.")
        array = array.astype(np.float32)
        outside = (array < self.action_low) | (array > self.action_high)
        if outside.any() and self.out_of_range == "error":
            channels = np.flatnonzero(outside).tolist()
            raise ValueError(f"`action` channels {channels} are outside [action_low, action_high] of {self.name}: "
                             f"{array[channels].tolist()} not in {self.action_low[channels].tolist()} .. "
                             f"{self.action_high[channels].tolist()}.")
        return np.clip(array, self.action_low, self.action_high), bool(outside.any())

    def _observation(self, images: dict[str, np.ndarray], state: np.ndarray) -> dict[str, Any]:
        obs: dict[str, Any] = {}
        for camera in self.cameras:
            image = images[camera]
            if image.dtype != np.uint8 or image.shape != (*self.image_size, 3):  # a simulator change, not user error
                raise RuntimeError(f"{self.name}: camera {camera!r} gave {image.dtype} {image.shape}, expected "
                                   f"uint8 {(*self.image_size, 3)}.")
            obs[IMAGE_PREFIX + camera] = image
        obs[STATE_KEY] = np.asarray(state, dtype=np.float32).reshape(self.state_dim)
        obs["task"] = self.task
        return obs

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name}: the environment is closed.")

    def _set_bounds(self, low: Sequence[float], high: Sequence[float], out_of_range: str) -> None:
        self.action_low = np.asarray(low, dtype=np.float32).reshape(self.action_dim)
        self.action_high = np.asarray(high, dtype=np.float32).reshape(self.action_dim)
        self.out_of_range = _choice(out_of_range, "out_of_range", OUT_OF_RANGE)

    def _init_gym(self, state_low: Sequence[float], state_high: Sequence[float], render_mode: Any) -> None:
        """gymnasium's attributes, from the ones the subclass has set (call last in `__init__`)."""
        self.render_mode = _choice(render_mode, "render_mode", RENDER_MODES)
        self.metadata = {"render_modes": list(RENDER_MODES), "render_fps": self.fps}  # per instance: fps differs
        self.action_space = spaces.Box(self.action_low, self.action_high, dtype=np.float32)
        image = spaces.Box(0, 255, (*self.image_size, 3), dtype=np.uint8)
        self.observation_space = spaces.Dict({
            **{IMAGE_PREFIX + camera: image for camera in self.cameras},
            STATE_KEY: spaces.Box(np.asarray(state_low, dtype=np.float32).reshape(self.state_dim),
                                  np.asarray(state_high, dtype=np.float32).reshape(self.state_dim), dtype=np.float32),
            "task": spaces.Text(TASK_MAX_LENGTH, charset=TASK_CHARSET),
        })  # fmt: skip

    def _set_max_steps(self, value: Any, limit: int | None = None) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (limit and value > limit):
            bound = f" and <= {limit} (the simulator's own limit)" if limit else ""
            raise ValueError(f"`max_episode_steps` must be an int >= 1{bound}, got {value!r}.")
        self.max_episode_steps = value


# ------------------------------------------------------------------------------------------------------- PushT


class PushTEnv(RobotEnv):
    """gym-pusht `PushT-v0` (pixels + agent position).

    Action: the absolute target (x, y) of the agent in the 512x512 px workspace, clipped to [0, 512]; a PD
    controller moves the agent toward it. Image pixel (row, col) = (y, x) * size / 512 (y grows downward).
    State: the agent's position (x, y) px. Success: the block covers > 95% of the goal (`coverage` in info).
    `render()` is the 680x680 visualization (with the last action marked), or `render_size`.
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int] | None = None,
        render_size: int | tuple[int, int] | None = None,
        max_episode_steps: int = 300,
        out_of_range: str = "clip",
        render_mode: str = "rgb_array",
    ) -> None:
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        gym = _import("gymnasium")
        _import("gym_pusht")
        self.name, self.embodiment, self.robot_type = "pusht", "pusht", "2d pointer"
        self.task = "push the T-shaped block onto the T-shaped target"
        self.fps = 10.0
        self._set_max_steps(max_episode_steps)
        self.action_dim = self.state_dim = 2
        self.action_names = self.state_names = ("x", "y")
        self._set_bounds([0.0, 0.0], [512.0, 512.0], out_of_range)
        self.gripper_channels = ()
        self.cameras = ("top",)
        self.image_size = _image_size(image_size, (96, 96))
        render_h, render_w = _image_size(render_size, (680, 680))
        if min(render_h, render_w) < 96:  # gym-pusht draws the action marker 96ths of the size thick
            raise ValueError(f"`render_size` must be at least 96 pixels on each side, got {render_size!r}.")
        self.raw_image_flips = {"top": "none"}
        self.conventions = ActionConventions(gripper_open="max", gripper_range="[0,1]", image_flip="none",
                                             action_space="absolute", translation_frame="world", rotation="rotation6d")
        self._env = gym.make(
            "gym_pusht/PushT-v0", obs_type="pixels_agent_pos", render_mode="rgb_array",
            observation_height=self.image_size[0], observation_width=self.image_size[1],
            visualization_height=render_h, visualization_width=render_w,
            max_episode_steps=self.max_episode_steps, disable_env_checker=True,
        )  # fmt: skip
        self._init_gym([0.0, 0.0], [512.0, 512.0], render_mode)  # gym-pusht's bounds of the agent position

    def _reset(self, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        obs, _ = self._env.reset(seed=seed)
        return {"top": obs["pixels"]}, obs["agent_pos"]

    def _step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, float, bool, dict[str, Any]]:
        obs, reward, _, _, info = self._env.step(action.astype(np.float64))
        return {"top": obs["pixels"]}, obs["agent_pos"], float(reward), bool(info["is_success"]), info

    def _render(self) -> np.ndarray:
        return self._env.render()

    def _close(self) -> None:
        self._env.close()


# --------------------------------------------------------------------------------------------------- MetaWorld

# Cameras of MetaWorld's Sawyer scene (`xyz_base.xml`) and how their renders differ from upright. The corner
# cameras are rolled upside down in the XML (their image-up axis points toward the floor), so their frames come
# out rotated 180 degrees (LeRobot's MetaWorld env flips both axes of corner2 for the same reason). A test checks
# this table against the camera geometry. `topview` looks straight down, and the two gripper cameras move with the
# hand (behindGripper is upright with the hand pointing down): all three are left as rendered.
METAWORLD_CAMERA_FLIPS = {
    "corner": "rotate180", "corner2": "rotate180", "corner3": "rotate180", "corner4": "rotate180",
    "topview": "none", "behindGripper": "none", "gripperPOV": "none",
}  # fmt: skip
# Where LeRobot's MetaWorld env (and the datasets recorded with it) puts `corner2`: closer to the table than the
# XML's (1.3, -0.2, 1.1), following arXiv 2206.14244. `view="metaworld"` keeps the XML position.
LEROBOT_CORNER2_POS = (0.75, 0.075, 0.7)
METAWORLD_VIEWS = ("lerobot", "metaworld")
METAWORLD_GOALS = ("sampled", "mt1")

# One instruction per MT1 task (MetaWorld has none); `metaworld_instruction` falls back to the task's name.
METAWORLD_INSTRUCTIONS = {
    "assembly": "pick up the nut and put it onto the peg",
    "basketball": "put the ball into the basket",
    "bin-picking": "move the puck from one bin into the other bin",
    "box-close": "pick up the lid and close the box with it",
    "button-press": "press the button",
    "button-press-topdown": "press the button from the top",
    "button-press-topdown-wall": "reach over the wall and press the button from the top",
    "button-press-wall": "reach past the wall and press the button",
    "coffee-button": "press the button of the coffee machine",
    "coffee-pull": "pull the mug away from the coffee machine",
    "coffee-push": "push the mug under the coffee machine",
    "dial-turn": "turn the dial",
    "disassemble": "pull the nut off the peg",
    "door-close": "close the door",
    "door-lock": "turn the lock to lock the door",
    "door-open": "open the door",
    "door-unlock": "turn the lock to unlock the door",
    "drawer-close": "push the drawer closed",
    "drawer-open": "pull the drawer open",
    "faucet-close": "turn the faucet handle to close it",
    "faucet-open": "turn the faucet handle to open it",
    "hammer": "hammer the nail into the wall",
    "hand-insert": "put the gripper into the hole",
    "handle-press": "press the handle down",
    "handle-press-side": "press the handle down from the side",
    "handle-pull": "pull the handle up",
    "handle-pull-side": "pull the handle up from the side",
    "lever-pull": "pull the lever",
    "peg-insert-side": "insert the peg into the hole from the side",
    "peg-unplug-side": "pull the peg out of the hole sideways",
    "pick-out-of-hole": "lift the puck out of the hole",
    "pick-place": "pick up the puck and put it at the goal",
    "pick-place-wall": "pick up the puck, carry it over the wall and put it at the goal",
    "plate-slide": "slide the plate into the cabinet",
    "plate-slide-back": "slide the plate out of the cabinet",
    "plate-slide-back-side": "slide the plate sideways out of the cabinet",
    "plate-slide-side": "slide the plate sideways into the cabinet",
    "push": "push the puck to the goal",
    "push-back": "push the puck backwards to the goal",
    "push-wall": "push the puck around the wall to the goal",
    "reach": "reach the goal position",
    "reach-wall": "reach over the wall to the goal position",
    "shelf-place": "pick up the puck and put it on the shelf",
    "soccer": "push the ball into the goal",
    "stick-pull": "grab the stick and pull the box with it",
    "stick-push": "grab the stick and push the box with it",
    "sweep": "sweep the puck off the table",
    "sweep-into": "sweep the puck into the hole",
    "window-close": "slide the window closed",
    "window-open": "slide the window open",
}


def metaworld_instruction(task: str) -> str:
    """A readable instruction for an MT1 task name ("reach-v3" -> "reach the goal position")."""
    base = task.rsplit("-v", 1)[0] if task.rsplit("-v", 1)[-1].isdigit() else task
    return METAWORLD_INSTRUCTIONS.get(base, base.replace("-", " "))


def metaworld_tasks() -> list[str]:
    """The MT1 task names of the installed MetaWorld (e.g. `reach-v3`)."""
    _use_egl()
    return sorted(_import("metaworld.env_dict").ALL_V3_ENVIRONMENTS)


class MetaWorldEnv(RobotEnv):
    """One MetaWorld MT1 task (`gym.make("Meta-World/MT1", env_name=task, ...)`), Sawyer arm, 80 Hz.

    Action (4,) in [-1, 1]: hand xyz displacement in the world frame (1 = 1 cm of the mocap target per step),
    then the gripper effort: -1 opens, +1 closes.
    State (4,): the first four of MetaWorld's 39 observation channels: hand xyz (m, world frame) and the gripper
    opening in [0, 1] (finger distance / 10 cm; 1 = open). The rest (object poses, the previous frame's copy of
    both, the goal) is privileged; `full_state` holds it for scripted experts.

    Args:
        task: An MT1 task name, e.g. `"reach-v3"` (`metaworld_tasks()` lists them).
        cameras: MuJoCo camera names (`METAWORLD_CAMERA_FLIPS`), rendered in this order.
        image_size: (height, width) or an int; 256 by default.
        view: `"lerobot"` moves `corner2` where LeRobot's env and datasets have it; `"metaworld"` keeps the XML's.
        goals: How `reset(seed)` picks the object and goal positions. `"sampled"`: drawn from the task's
            randomization range by a generator seeded with `seed` (every seed a new layout). `"mt1"`: the 50
            fixed layouts of the MT1 benchmark (built from `benchmark_seed`), layout `seed % 50`.
        benchmark_seed: Seed of the MT1 layouts (`goals="mt1"`; MetaWorld otherwise draws them from the global
            numpy RNG, which would make them differ between processes).
        render_quality: `"full"` (MetaWorld's scene) or `"fast"` (no shadows, no multisampling: several times
            faster on CPU renderers, but the images differ: collect and evaluate with the same setting).
        upright: Turn raw renders upright (default). False returns them as rendered; then every camera must share
            one flip, which `conventions.image_flip` reports.
    """

    def __init__(
        self,
        task: str = "reach-v3",
        *,
        cameras: str | Sequence[str] = ("corner2",),
        image_size: int | tuple[int, int] | None = None,
        view: str = "lerobot",
        goals: str = "sampled",
        benchmark_seed: int = 0,
        render_quality: str = "full",
        upright: bool = True,
        max_episode_steps: int = 500,
        out_of_range: str = "clip",
        render_mode: str = "rgb_array",
    ) -> None:
        _use_egl()
        gym = _import("gymnasium")
        _import("metaworld")
        wrappers = _import("metaworld.wrappers")
        mujoco = _import("mujoco")
        tasks = metaworld_tasks()
        if task not in tasks:
            close = difflib.get_close_matches(str(task), tasks, n=3)
            raise ValueError(f"Unknown MetaWorld `task` {task!r}" + (f"; did you mean {close}?" if close else "")
                             + f" Valid: {tasks}.")
        cameras = (cameras,) if isinstance(cameras, str) else tuple(cameras)
        unknown = [c for c in cameras if c not in METAWORLD_CAMERA_FLIPS]
        if not cameras or unknown or len(set(cameras)) != len(cameras):
            raise ValueError(f"`cameras` must be distinct names from {list(METAWORLD_CAMERA_FLIPS)}, got {cameras}.")
        self.view = _choice(view, "view", METAWORLD_VIEWS)
        self.goals = _choice(goals, "goals", METAWORLD_GOALS)
        self.render_quality = _choice(render_quality, "render_quality", RENDER_QUALITIES)
        if isinstance(benchmark_seed, bool) or not isinstance(benchmark_seed, int) or benchmark_seed < 0:
            raise ValueError(f"`benchmark_seed` must be an int >= 0, got {benchmark_seed!r}.")

        self.name, self.embodiment, self.robot_type = f"metaworld:{task}", "libero", "sawyer"
        self.task_name, self.task = task, metaworld_instruction(task)
        self._set_max_steps(max_episode_steps, limit=500)
        self.action_dim, self.state_dim = 4, 4
        self.action_names = ("dx", "dy", "dz", "gripper")
        self.state_names = ("hand_x", "hand_y", "hand_z", "gripper_opening")
        self._set_bounds([-1.0] * 4, [1.0] * 4, out_of_range)
        self.gripper_channels = (3,)
        self.cameras = cameras
        self.image_size = _image_size(image_size, (256, 256))
        self.raw_image_flips = {c: METAWORLD_CAMERA_FLIPS[c] for c in cameras}
        self._flips = {c: f if upright else "none" for c, f in self.raw_image_flips.items()}
        if upright:
            image_flip = "none"
        elif len(set(self.raw_image_flips.values())) == 1:
            image_flip = next(iter(self.raw_image_flips.values()))
        else:
            raise ValueError(f"`upright=False` needs cameras with one raw flip, got {self.raw_image_flips}.")
        self.conventions = ActionConventions(gripper_open="min", gripper_range="[-1,1]", image_flip=image_flip,
                                             action_space="delta", translation_frame="world", rotation="rotation6d")

        height, width = self.image_size
        self._env = gym.make(
            "Meta-World/MT1", env_name=task, seed=benchmark_seed, render_mode="rgb_array", camera_name=cameras[0],
            width=width, height=height, max_episode_steps=self.max_episode_steps, disable_env_checker=True,
        )  # fmt: skip
        self._raw = self._env.unwrapped
        self.fps = float(round(1.0 / self._raw.dt, 6))  # 5 substeps of 2.5 ms = 80 Hz
        model = self._raw.model
        # MT1's task sampler would pick a random layout at every reset from its own unseeded RNG: turn it off and
        # set the layout in `_reset` instead.
        selector = self._env
        while not isinstance(selector, wrappers.RandomTaskSelectWrapper):
            selector = selector.env
        selector.toggle_sample_tasks_on_reset(False)
        self._tasks = list(selector.tasks)
        self._camera_ids = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, c) for c in cameras]
        if self.view == "lerobot" and "corner2" in cameras:
            model.cam_pos[self._camera_ids[cameras.index("corner2")]] = LEROBOT_CORNER2_POS
        if self.render_quality == "fast":  # before the first render creates the GL context
            model.light_castshadow[:] = 0
            model.vis.quality.offsamples = 0
        self.full_state: np.ndarray | None = None
        self._images: dict[str, np.ndarray] = {}
        # MetaWorld clips its observations to these hand bounds; the opening is clipped to [0, 1].
        hand = self._raw.sawyer_observation_space
        self._init_gym([*hand.low[:3], 0.0], [*hand.high[:3], 1.0], render_mode)

    def _render_cameras(self) -> dict[str, np.ndarray]:
        viewer = self._raw.mujoco_renderer._get_viewer("rgb_array")
        # gymnasium leaves the last created GL context current: with several environments alive, rendering without
        # this would draw through another environment's context (wrong frames).
        viewer.make_context_current()
        images = {}
        for camera, camera_id in zip(self.cameras, self._camera_ids):
            frame = viewer.render("rgb_array", camera_id=camera_id)
            images[camera] = np.array(flip_images(frame, self._flips[camera]), copy=True)
        self._images = images
        return images

    def _reset(self, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        raw = self._raw
        if self.goals == "mt1":
            raw.set_task(self._tasks[seed % len(self._tasks)])  # a frozen layout
        else:
            raw.set_task(self._tasks[0])  # the task's settings (goal observable); the layout is sampled below
            raw._freeze_rand_vec, raw.seeded_rand_vec = False, True
        raw.seed(seed)  # MetaWorld ignores reset(seed=...): its RNG is seeded here
        obs, _ = self._env.reset()
        self.full_state = np.asarray(obs, dtype=np.float64)
        return self._render_cameras(), self.full_state[:4]

    def _step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, float, bool, dict[str, Any]]:
        obs, reward, _, _, info = self._env.step(action)
        self.full_state = np.asarray(obs, dtype=np.float64)
        return self._render_cameras(), self.full_state[:4], float(reward), bool(info["success"]), info

    def _render(self) -> np.ndarray:
        return self._images[self.cameras[0]].copy()

    def _close(self) -> None:
        # Free MuJoCo's GL objects while this environment's context is current. Left to the garbage collector, the
        # MjrContext is freed in whichever context is current then: another environment's, whose framebuffers
        # and textures have the same ids, so it would render black frames from then on.
        for viewer in getattr(self._raw.mujoco_renderer, "_viewers", {}).values():
            viewer.make_context_current()
            viewer.con.free()
        self._env.close()


# ------------------------------------------------------------------------------------------------------- ALOHA

ALOHA_TASKS = {"AlohaInsertion-v0": "insertion", "AlohaTransferCube-v0": "transfer_cube"}
ALOHA_INSTRUCTIONS = {
    "AlohaInsertion-v0": "insert the peg into the socket",
    "AlohaTransferCube-v0": "pick up the cube with the right arm and hand it over to the left arm",
}
_ALOHA_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate", "gripper")


class AlohaEnv(RobotEnv):
    """gym-aloha (bimanual ViperX, dm_control), 50 Hz, the `top` camera.

    Action (14,): per arm (left, then right) 6 absolute joint position targets (rad) and the gripper target
    normalized to [0, 1] (1 = open, 0 = closed). Bounds: the joint actuators' control ranges and [0, 1] for the
    grippers (gym-aloha declares [-1, 1] for every channel, which is not what its actuators take).
    State (14,): the joint positions in the same layout (grippers normalized the same way).
    Images: `top`, rendered at 480x640 (gym-aloha ignores other sizes) and resized (antialiased) to `image_size`;
    `render()` gives the full-size frame. Only `top` is rendered (gym-aloha renders three cameras per step).

    Args:
        task: `"AlohaInsertion-v0"` or `"AlohaTransferCube-v0"` (or `"insertion"` / `"transfer_cube"`).
        image_size: (height, width) or an int; 480x640 by default.
        render_quality: `"full"` or `"fast"` (no shadows, no multisampling), as for MetaWorld.
    """

    def __init__(
        self,
        task: str = "AlohaInsertion-v0",
        *,
        image_size: int | tuple[int, int] | None = None,
        render_quality: str = "full",
        max_episode_steps: int = 300,
        out_of_range: str = "clip",
        render_mode: str = "rgb_array",
    ) -> None:
        _use_egl()
        gym = _import("gymnasium")
        _import("gym_aloha")
        task = {v: k for k, v in ALOHA_TASKS.items()}.get(task, task)
        _choice(task, "task", [*ALOHA_TASKS, *ALOHA_TASKS.values()])
        self.render_quality = _choice(render_quality, "render_quality", RENDER_QUALITIES)
        self.name, self.embodiment, self.robot_type = f"aloha:{task}", "libero", "aloha"
        self.task_name, self.task = task, ALOHA_INSTRUCTIONS[task]
        self.fps = 50.0
        self._set_max_steps(max_episode_steps)
        self.action_dim = self.state_dim = 14
        self.action_names = self.state_names = tuple(f"{arm}_{j}" for arm in ("left", "right") for j in _ALOHA_JOINTS)
        self.gripper_channels = (6, 13)
        self.cameras = ("top",)
        self.native_size = (480, 640)
        self.image_size = _image_size(image_size, self.native_size)
        self.raw_image_flips = {"top": "none"}
        self.conventions = ActionConventions(gripper_open="max", gripper_range="[0,1]", image_flip="none",
                                             action_space="absolute", translation_frame="world", rotation="rotation6d")
        self._env = gym.make(f"gym_aloha/{task}", obs_type="pixels_agent_pos", max_episode_steps=max_episode_steps,
                             disable_env_checker=True)
        dm_env = self._env.unwrapped._env
        physics, sim_task = dm_env.physics, dm_env.task
        # Actuators: 8 per arm (6 joints, then the two fingers driven by the normalized gripper target).
        ranges = np.asarray(physics.model.actuator_ctrlrange, dtype=np.float64)
        low = np.concatenate([ranges[0:6, 0], [0.0], ranges[8:14, 0], [0.0]])
        high = np.concatenate([ranges[0:6, 1], [1.0], ranges[8:14, 1], [1.0]])
        self._set_bounds(low, high, out_of_range)
        if self.render_quality == "fast":
            physics.model.light_castshadow[:] = 0
            physics.model.vis.quality.offsamples = 0
        height, width = self.native_size

        def observation(physics: Any) -> dict[str, Any]:  # gym-aloha's, rendering `top` only
            return {"qpos": sim_task.get_qpos(physics), "qvel": sim_task.get_qvel(physics),
                    "env_state": sim_task.get_env_state(physics),
                    "images": {"top": physics.render(height=height, width=width, camera_id="top")}}

        sim_task.get_observation = observation
        self._frame: np.ndarray | None = None
        # Unbounded: MuJoCo's joint limits are soft, so the joints (and the normalized grippers) can pass them.
        self._init_gym(np.full(14, -np.inf), np.full(14, np.inf), render_mode)

    def _images(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        self._frame = np.asarray(obs["pixels"]["top"], dtype=np.uint8)
        if self.image_size == self.native_size:
            return {"top": self._frame.copy()}
        from PIL import Image

        height, width = self.image_size
        resized = Image.fromarray(self._frame).resize((width, height), Image.Resampling.BILINEAR)
        return {"top": np.asarray(resized, dtype=np.uint8).copy()}

    def _reset(self, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        obs, _ = self._env.reset(seed=seed)
        return self._images(obs), obs["agent_pos"]

    def _step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, float, bool, dict[str, Any]]:
        obs, reward, _, _, info = self._env.step(action.astype(np.float64))
        return self._images(obs), obs["agent_pos"], float(reward), bool(info["is_success"]), info

    def _render(self) -> np.ndarray:
        return self._frame.copy()

    def _close(self) -> None:
        self._env.close()


# ----------------------------------------------------------------------------------------------------- factory

ENV_SPECS = ("pusht", "metaworld:<task>", "aloha", "aloha:<task>")


_CLASSES: dict[str, type[RobotEnv]] = {"pusht": PushTEnv, "metaworld": MetaWorldEnv, "aloha": AlohaEnv}


def make_env(spec: str, **options: Any) -> RobotEnv:
    """An adapter from a spec: `"pusht"`, `"metaworld:<task>"` (e.g. `metaworld:reach-v3`), `"aloha"` or
    `"aloha:<task>"` (`AlohaInsertion-v0`, `AlohaTransferCube-v0`); `options` go to its constructor. The
    environment is unwrapped, with the `spec` of its registered id and these options (`gymnasium.make(env.spec)`
    rebuilds it)."""
    if not isinstance(spec, str):
        raise TypeError(f"`spec` must be a str, got {type(spec).__name__}.")
    kind, _, task = spec.partition(":")
    if kind == "pusht" and not task:
        kwargs = dict(options)
    elif kind == "metaworld" and task:
        kwargs = {"task": task, **options}
    elif kind == "aloha":
        kwargs = {"task": task or "AlohaInsertion-v0", **options}
    else:
        raise ValueError(f"Unknown environment `spec` {spec!r}; valid: {list(ENV_SPECS)} (e.g. 'metaworld:reach-v3').")
    env = _CLASSES[kind](**kwargs)
    # What `gymnasium.make` records on the environment it builds: no wrappers, so the spec rebuilds this one.
    env.spec = dataclasses.replace(gym.spec(GYM_IDS[kind]), kwargs=kwargs, order_enforce=False,
                                   disable_env_checker=True)
    return env


def _register() -> None:
    for kind, env_id in GYM_IDS.items():
        if env_id not in gym.registry:  # importing the module again (a reload) must not re-register
            gym.register(env_id, entry_point=f"{__name__}:{_CLASSES[kind].__name__}")


if gym is not None:
    _register()


__all__ = [
    "ALOHA_TASKS", "ENV_SPECS", "GYM_IDS", "LEROBOT_CORNER2_POS", "METAWORLD_CAMERA_FLIPS", "METAWORLD_INSTRUCTIONS",
    "TASK_CHARSET", "TASK_MAX_LENGTH",
    "AlohaEnv", "MetaWorldEnv", "PushTEnv", "RobotEnv", "make_env", "metaworld_instruction", "metaworld_tasks",
]  # fmt: skip
