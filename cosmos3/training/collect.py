"""Scripted-expert demonstrations into a LeRobotDataset v3 (only successful episodes are written).

    summary = collect("metaworld:reach-v3", episodes=50, out_dir="data/reach", seed=0, image_size=128)
    cosmos3 collect --env metaworld:reach-v3 --expert scripted --episodes 50 --out data/reach --seed 0

Attempt k runs the expert from `reset(seed + k)` until the episode succeeds (kept) or is truncated (counted as a
failure and dropped), until `episodes` are kept or `max_attempts` are spent. The dataset holds one video per
camera, `observation.state`, `action` (the float32 action the environment applied, after its clipping rule),
`next.reward`, `next.success` and `next.done` per frame, and the environment's instruction as the task. As in
LeRobot, frame t holds the observation before `action[t]`; the observation after the last action is not stored.

The episode seeds, the failed seeds and everything else in the returned summary are also written to
`meta/collection.json`, so the dataset can be regenerated (the experts and the adapters' resets are
deterministic). Files are written atomically by `LeRobotDatasetWriter`; if collection stops early (an error,
Ctrl-C) the episodes saved so far are finalized into a valid dataset.

The experts are `cosmos3.robotics.experts` (MetaWorld's scripted policies). Collection lives in `training`, above
`robotics`: it writes the training data format (`LeRobotDatasetWriter`) by running robotics' environments and experts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from ..io import atomic_write_json
from ..robotics.envs import IMAGE_PREFIX, STATE_KEY, RobotEnv, make_env
from ..robotics.experts import EXPERTS, make_expert
from .datasets import LeRobotDatasetWriter

SUMMARY_PATH = os.path.join("meta", "collection.json")
# Per-frame results of the step taken from the frame, as LeRobot records them.
STEP_FEATURES = {
    "next.reward": {"dtype": "float32", "shape": [1], "names": None},
    "next.success": {"dtype": "bool", "shape": [1], "names": None},
    "next.done": {"dtype": "bool", "shape": [1], "names": None},
}


def run_episode(
    env: RobotEnv, policy: Callable[[dict[str, Any]], np.ndarray], seed: int
) -> tuple[dict[str, np.ndarray], bool]:
    """One episode from `reset(seed=seed)`: per-frame arrays keyed like the dataset's features, and its success."""
    obs, _ = env.reset(seed=seed)
    frames: dict[str, list] = {key: [] for key in (*env.features, *STEP_FEATURES)}
    while True:
        for camera in env.cameras:
            frames[IMAGE_PREFIX + camera].append(obs[IMAGE_PREFIX + camera])
        frames[STATE_KEY].append(obs[STATE_KEY])
        obs, reward, terminated, truncated, info = env.step(policy(obs))
        frames["action"].append(info["action"])
        frames["next.reward"].append([reward])
        frames["next.success"].append([info["is_success"]])
        frames["next.done"].append([terminated or truncated])
        if terminated or truncated:
            break
    return {key: np.stack(values) for key, values in frames.items()}, bool(terminated)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def collect(
    env_spec: str | Sequence[str],
    episodes: int,
    out_dir: str | os.PathLike,
    seed: int = 0,
    expert: str = "scripted",
    max_attempts: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    progress: bool = True,
    *,
    env_options: dict[str, Any] | None = None,
    video_codec: str | None = None,
) -> dict[str, Any]:
    """Run `expert` in `env_spec` and write its first `episodes` successful episodes to `out_dir` (new or empty).

    Args:
        env_spec: A `make_env` spec, e.g. `"metaworld:reach-v3"`, or several (a multi-task dataset, as MetaWorld's
            MT10: `episodes` of each, one task per episode; the environments must record the same features).
        episodes: Successful episodes to keep (per environment).
        out_dir: The dataset directory.
        seed: Attempt k resets with `seed + k` (in every environment).
        expert: `"scripted"` (see the module docstring).
        max_attempts: Episodes to try at most per environment (default `max(2 * episodes, episodes + 10)`).
        image_size: Camera image size, an int or (height, width) (even numbers: the videos are yuv420p);
            None: the environment's default.
        progress: One line per attempt on stderr.
        env_options: More `make_env` options (e.g. `{"render_quality": "fast"}`).
        video_codec: Passed to the writer (default H.264).

    Returns the summary also written to `meta/collection.json`: counts (`episodes`, `attempts`,
    `failed_attempts`, `frames`), `seeds` / `failed_seeds`, `episode_lengths`, `complete` (False when
    `max_attempts` ran out first), the environment's task, fps, embodiment and conventions; with several
    environments, these per environment under `envs` and the counts summed at the top. Raises RuntimeError (and
    writes nothing) when no attempt succeeds.
    """
    specs = [env_spec] if isinstance(env_spec, str) else list(env_spec)
    if not specs or not all(isinstance(s, str) for s in specs) or len(set(specs)) != len(specs):
        raise ValueError(f"`env_spec` must be a spec or a list of distinct specs, got {env_spec!r}.")
    episodes = _check_int("episodes", episodes, 1)
    seed = _check_int("seed", seed, 0)
    max_attempts = max(2 * episodes, episodes + 10) if max_attempts is None else max_attempts
    max_attempts = _check_int("max_attempts", max_attempts, episodes)
    if expert not in EXPERTS:
        raise ValueError(f"`expert` must be one of {list(EXPERTS)}, got {expert!r}.")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"`out_dir` {out_dir!r} exists and is not an empty directory.")
    created = not os.path.exists(out_dir)
    options = dict(env_options or {})
    if image_size is not None:
        options["image_size"] = image_size

    start = time.monotonic()
    summaries: list[dict[str, Any]] = []
    kept = 0
    try:
        # the writer, once opened, closes with the stack: on an error the episodes saved so far are finalized
        with contextlib.ExitStack() as stack:
            writer = None
            for spec in specs:
                with make_env(spec, **options) as env:
                    policy = make_expert(env, expert)
                    features = {**env.features, **STEP_FEATURES}
                    if writer is None:
                        writer = stack.enter_context(LeRobotDatasetWriter(
                            out_dir, fps=env.fps, features=features, robot_type=env.robot_type,
                            video_codec=video_codec))
                    elif writer._check_features(features) != writer.features or float(env.fps) != float(writer.fps):
                        raise ValueError(f"`env_spec` {spec!r} records other features or fps than {specs[0]!r}; one "
                                         "dataset holds environments with the same observations and actions.")
                    env_start = time.monotonic()
                    seeds, failed, lengths = _collect_env(env, policy, writer, episodes, seed, max_attempts, progress)
                    kept += len(seeds)
                    summaries.append({
                        "env": env.name, "requested": episodes, "episodes": len(seeds),
                        "attempts": len(seeds) + len(failed), "failed_attempts": len(failed),
                        "complete": len(seeds) == episodes, "frames": int(sum(lengths)), "seeds": seeds,
                        "failed_seeds": failed, "episode_lengths": lengths,
                        "success_rate": len(seeds) / (len(seeds) + len(failed)), "task": env.task, "fps": env.fps,
                        "embodiment": env.embodiment, "robot_type": env.robot_type, "cameras": list(env.cameras),
                        "image_size": list(env.image_size), "conventions": asdict(env.conventions),
                        "max_episode_steps": env.max_episode_steps, "seconds": round(time.monotonic() - env_start, 3),
                    })  # fmt: skip
            if not kept:
                raise RuntimeError(f"None of the attempts in {', '.join(specs)} succeeded; nothing was written.")
    except BaseException:
        if not kept and created:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)
        raise
    if len(summaries) == 1:
        summary = {**summaries[0], "expert": expert, "out_dir": out_dir}
    else:
        summary = {"env": [s["env"] for s in summaries], "expert": expert, "out_dir": out_dir,
                   "requested": episodes * len(specs), "episodes": kept,
                   "attempts": sum(s["attempts"] for s in summaries),
                   "failed_attempts": sum(s["failed_attempts"] for s in summaries),
                   "complete": all(s["complete"] for s in summaries),
                   "frames": sum(s["frames"] for s in summaries), "tasks": [s["task"] for s in summaries],
                   "fps": summaries[0]["fps"], "embodiment": summaries[0]["embodiment"], "envs": summaries}
    summary["seconds"] = round(time.monotonic() - start, 3)
    path = os.path.join(out_dir, SUMMARY_PATH)
    atomic_write_json(path, summary, indent=4)
    for s in summaries:
        if not s["complete"]:
            warnings.warn(f"Only {s['episodes']} of {episodes} episodes succeeded in {max_attempts} attempts in "
                          f"{s['env']} ({out_dir} holds those).", RuntimeWarning, stacklevel=2)
    return summary


def _collect_env(env: RobotEnv, policy, writer: LeRobotDatasetWriter, episodes: int, seed: int, max_attempts: int,
                 progress: bool) -> tuple[list[int], list[int], list[int]]:
    """Attempts in one environment until `episodes` succeed; returns kept seeds, failed seeds, kept lengths."""
    seeds: list[int] = []
    failed: list[int] = []
    lengths: list[int] = []
    for attempt in range(max_attempts):
        if len(seeds) == episodes:
            break
        episode_seed = seed + attempt
        data, success = run_episode(env, policy, episode_seed)
        length = len(data["action"])
        if success:
            cameras = {IMAGE_PREFIX + c: data[IMAGE_PREFIX + c] for c in env.cameras}
            extra = {key: data[key] for key in STEP_FEATURES}
            writer.add_episode(cameras, actions=data["action"], state=data[STATE_KEY], task=env.task, extra=extra)
            seeds.append(episode_seed)
            lengths.append(length)
        else:
            failed.append(episode_seed)
        if progress:
            print(f"[collect] {env.name} attempt {attempt + 1}/{max_attempts} seed {episode_seed}: "
                  f"{'success' if success else 'failure'} after {length} steps ({len(seeds)}/{episodes} kept)",
                  file=sys.stderr, flush=True)
    return seeds, failed, lengths


# ---------------------------------------------------------------------------------------------------------- CLI


def _image_size_arg(text: str) -> int | tuple[int, int]:
    """`"128"` -> 128, `"120x160"` -> (120, 160) (height x width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts, default=0) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH, got {text!r}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _env_option_arg(text: str) -> tuple[str, Any]:
    """`KEY=VALUE`, the value read as JSON when it parses (`render_quality=fast`, `cameras=["corner2"]`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def add_collect_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `cosmos3 collect` options (for a subparser)."""
    parser.add_argument("--env", required=True, action="append", help="pusht | metaworld:<task> (e.g. "
                        "metaworld:reach-v3) | aloha[:AlohaInsertion-v0|AlohaTransferCube-v0]; repeat it for a "
                        "multi-task dataset (--episodes of each)")
    parser.add_argument("--expert", default="scripted", choices=EXPERTS)
    parser.add_argument("--episodes", type=int, required=True, help="successful episodes to keep")
    parser.add_argument("--out", required=True, help="dataset directory (new or empty)")
    parser.add_argument("--seed", type=int, default=0, help="attempt k resets with seed + k")
    parser.add_argument("--max-attempts", type=int, default=None, help="default: max(2 * episodes, episodes + 10)")
    parser.add_argument("--image-size", type=_image_size_arg, default=None, help="SIZE or HEIGHTxWIDTH (even)")
    parser.add_argument("--env-option", type=_env_option_arg, action="append", default=[], metavar="KEY=VALUE",
                        help="an environment option, VALUE as JSON if it parses (repeatable), e.g. "
                        "render_quality=fast")
    parser.add_argument("--quiet", action="store_true", help="no per-attempt progress lines")
    return parser


def run_collect(args: argparse.Namespace) -> dict[str, Any]:
    """Run `collect` with parsed `add_collect_arguments` options; returns the summary."""
    envs = args.env[0] if len(args.env) == 1 else args.env
    return collect(envs, args.episodes, args.out, seed=args.seed, expert=args.expert,
                   max_attempts=args.max_attempts, image_size=args.image_size, progress=not args.quiet,
                   env_options=dict(args.env_option))


def main(argv: list[str] | None = None) -> int:
    """`python -m cosmos3.training.collect ...`: prints the summary as JSON; exit status 1 if incomplete."""
    parser = add_collect_arguments(argparse.ArgumentParser(prog="cosmos3 collect", description=__doc__,
                                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        summary = run_collect(args)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        parser.exit(2, f"cosmos3 collect: error: {e}\n")
    print(json.dumps(summary))
    return 0 if summary["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
