"""Expert policies that act in the simulators (`cosmos3.robotics.envs`): what demonstrations are collected with
(`cosmos3.training.collect`) and what a rollout compares a learned policy against (`cosmos3.robotics.rollout`).

`"scripted"` = MetaWorld's hand-written policy of the task (`metaworld.policies.ENV_POLICY_MAP`), which reads the
privileged 39-d state. PushT and ALOHA have no scripted expert here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .envs import MetaWorldEnv, RobotEnv

EXPERTS = ("scripted",)


def scripted_expert(env: RobotEnv) -> Callable[[dict[str, Any]], np.ndarray]:
    """The scripted policy of `env`'s task: `expert(obs) -> action` (MetaWorld tasks only; `env` may be inside
    gymnasium wrappers, e.g. from `gymnasium.make("cosmos3/MetaWorld-v0", task=...)`)."""
    env = getattr(env, "unwrapped", env)  # the privileged state lives on the adapter, not on its wrappers
    if not isinstance(env, MetaWorldEnv):
        raise ValueError(f"There is no scripted expert for {getattr(env, 'name', type(env).__name__)!r}: only "
                         "MetaWorld tasks ship one (use `metaworld:<task>`).")
    from metaworld.policies import ENV_POLICY_MAP

    policy = ENV_POLICY_MAP[env.task_name]()

    def expert(obs: dict[str, Any]) -> np.ndarray:
        if env.full_state is None:
            raise RuntimeError("The expert needs an episode: reset the environment first.")
        with warnings.catch_warnings():  # it warns whenever an action exceeds [-1, 1]; the environment clips
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
            return np.asarray(policy.get_action(env.full_state), dtype=np.float32)

    return expert


def make_expert(env: RobotEnv, expert: str) -> Callable[[dict[str, Any]], np.ndarray]:
    if expert not in EXPERTS:
        raise ValueError(f"`expert` must be one of {list(EXPERTS)}, got {expert!r}.")
    return scripted_expert(env)
