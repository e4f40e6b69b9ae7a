"""Closed-loop evaluation: run a policy in simulated environments and report what LeRobot's `lerobot-eval` reports.

    cosmos3 rollout --env metaworld:reach-v3 --policy runs/reach/pipeline --episodes 50 --seed 0 --num-envs 4

Episode `i` runs with seed `seed + i`, so a result is reproducible and comparable across policies. `num_envs`
environments run side by side: their simulators step concurrently (threads; MuJoCo and the renderers release the
GIL) and the policy predicts the chunks of all environments that need one in one batched call. An episode ends
when the environment terminates or truncates, or at `max_steps`; it counts as a success if the environment
reported success at any step (LeRobot's rule).

Writes `eval_info.json` (`per_episode`: seed, success, sum/max reward, steps; `aggregated`: `pc_success`,
`avg_sum_reward`, `avg_max_reward`, `eval_s`, `eval_ep_s`) and rollout videos of the first `videos` episodes.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..io import atomic_write_json


class RandomPolicy:
    """Uniform random actions in the environment's action box: the baseline every result is compared with."""

    def __init__(self, low: np.ndarray, high: np.ndarray, seed: int = 0):
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self.seed = seed
        self.reset(seed)

    def reset(self, seed: int | None = None, envs: list[int] | None = None) -> None:
        if envs is None:
            self.rng = np.random.default_rng(self.seed if seed is None else seed)

    def select_action(self, observation: dict | list[dict], env_ids: list[int] | None = None) -> np.ndarray:
        n = 1 if isinstance(observation, dict) else len(observation)
        actions = self.rng.uniform(self.low, self.high, size=(n, *self.low.shape)).astype(np.float32)
        return actions[0] if isinstance(observation, dict) else actions


class ExpertPolicy:
    """The environment's scripted expert (MetaWorld: `metaworld.policies`, reading the privileged state), as a
    policy: the upper reference every result is compared with. `rollout` binds it to its environments."""

    def __init__(self, expert: str = "scripted"):
        self.expert = expert
        self._experts: list = []

    def bind(self, envs: list) -> None:
        from .experts import make_expert

        self._experts = [make_expert(env, self.expert) for env in envs]

    def reset(self, seed: int | None = None, envs: list[int] | None = None) -> None:
        pass  # stateless: every action is a function of the current state

    def select_action(self, observation: dict | list[dict], env_ids: list[int] | None = None) -> np.ndarray:
        if not self._experts:
            raise RuntimeError("ExpertPolicy is not bound to environments; run it through `rollout`.")
        single = isinstance(observation, dict)
        observations = [observation] if single else list(observation)
        env_ids = list(range(len(observations))) if env_ids is None else env_ids
        actions = np.stack([self._experts[i](obs) for i, obs in zip(env_ids, observations)])
        return actions[0] if single else actions


class _EnvThread:
    """One environment living on its own thread: created, stepped, rendered and closed there (an EGL/OpenGL context
    belongs to the thread that made it current), so several environments step concurrently."""

    def __init__(self, spec: str, options: dict):
        from .envs import make_env

        self._pool = ThreadPoolExecutor(max_workers=1)
        self.env = self._pool.submit(make_env, spec, **options).result()

    def submit(self, method: str, *args, **kwargs):
        return self._pool.submit(getattr(self.env, method), *args, **kwargs)

    def call(self, method: str, *args, **kwargs):
        return self.submit(method, *args, **kwargs).result()

    def close(self) -> None:
        try:
            self.call("close")
        finally:
            self._pool.shutdown(wait=True)


def rollout(policy, env_spec: str, episodes: int, *, seed: int = 0, num_envs: int = 1, max_steps: int | None = None,
            out_dir: str | None = None, videos: int = 0, env_options: dict | None = None,
            progress: bool = True) -> dict:
    """Evaluate `policy` (anything with `reset(seed=, envs=)` and `select_action(observations, env_ids=)`, e.g.
    `Cosmos3Policy` or `RandomPolicy`) on `episodes` episodes of `env_spec`; returns the `eval_info` dict (also
    written to `out_dir/eval_info.json` with the videos when `out_dir` is given)."""
    for name, value, low in (("episodes", episodes, 1), ("num_envs", num_envs, 1), ("videos", videos, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"`max_steps` must be an int >= 1 or None, got {max_steps!r}.")
    if videos and out_dir is None:
        raise ValueError("`videos` > 0 needs `out_dir` (where the videos go).")
    num_envs = min(num_envs, episodes)
    envs: list[_EnvThread] = []
    limit = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=episodes, desc=f"rollout {env_spec}", unit="episode", dynamic_ncols=True)
    start = time.perf_counter()
    results: list[dict] = []
    video_paths: list[str] = []
    try:
        for _ in range(num_envs):
            envs.append(_EnvThread(env_spec, env_options or {}))
        if callable(getattr(policy, "bind", None)):  # a policy that reads the simulator (the scripted expert)
            policy.bind([e.env for e in envs])
        limit = max_steps or envs[0].env.max_episode_steps
        fps = envs[0].env.fps
        policy.reset(seed=seed)
        next_episode = 0
        slots: list[dict | None] = [None] * num_envs  # the episode each environment is running
        observations: list[dict | None] = [None] * num_envs

        def begin(i: int) -> None:
            nonlocal next_episode
            if next_episode >= episodes:
                slots[i] = None
                return
            index = next_episode
            next_episode += 1
            observations[i], _ = envs[i].call("reset", seed=seed + index)
            slots[i] = {"episode_ix": index, "seed": seed + index, "sum_reward": 0.0, "max_reward": -np.inf,
                        "success": False, "steps": 0, "frames": [] if index < videos else None}
            if slots[i]["frames"] is not None:
                slots[i]["frames"].append(envs[i].call("render"))
            policy.reset(envs=[i])

        for i in range(num_envs):
            begin(i)
        while any(s is not None for s in slots):
            active = [i for i in range(num_envs) if slots[i] is not None]
            actions = policy.select_action([observations[i] for i in active], env_ids=active)
            pending = [envs[i].submit("step", action) for i, action in zip(active, actions)]  # concurrently
            steps = [p.result() for p in pending]
            for i, (obs, reward, terminated, truncated, info) in zip(active, steps):
                slot = slots[i]
                slot["steps"] += 1
                slot["sum_reward"] += float(reward)
                slot["max_reward"] = max(slot["max_reward"], float(reward))
                slot["success"] = slot["success"] or bool(info.get("is_success", False))
                observations[i] = obs
                if slot["frames"] is not None:
                    slot["frames"].append(envs[i].call("render"))
                if terminated or truncated or slot["steps"] >= limit:
                    frames = slot.pop("frames")
                    if frames is not None and out_dir is not None:
                        video_paths.append(_save_video(out_dir, env_spec, slot, frames, fps))
                    results.append(slot)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(pc_success=f"{100 * np.mean([r['success'] for r in results]):.1f}")
                    begin(i)
    finally:
        for env in envs:
            env.close()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    results.sort(key=lambda r: r["episode_ix"])
    info = {
        "env": env_spec,
        "per_episode": results,
        "aggregated": {
            "avg_sum_reward": float(np.mean([r["sum_reward"] for r in results])),
            "avg_max_reward": float(np.mean([r["max_reward"] for r in results])),
            "pc_success": float(100 * np.mean([r["success"] for r in results])),
            "eval_s": elapsed,
            "eval_ep_s": elapsed / len(results),
        },
        "video_paths": video_paths,
    }
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_json(os.path.join(out_dir, "eval_info.json"), info)
    return info


def _save_video(out_dir: str, env_spec: str, slot: dict, frames: list[np.ndarray], fps: float) -> str:
    from ..io import write_video

    folder = os.path.join(out_dir, "videos")
    os.makedirs(folder, exist_ok=True)
    name = env_spec.replace(":", "_").replace("/", "_")
    path = os.path.join(folder, f"{name}_episode_{slot['episode_ix']:04d}.mp4")
    clip = np.stack(frames)
    # encoders want even sides: crop one pixel row/column if needed rather than resample
    clip = clip[:, : clip.shape[1] // 2 * 2, : clip.shape[2] // 2 * 2]
    write_video(path, clip, fps=fps)
    return path
