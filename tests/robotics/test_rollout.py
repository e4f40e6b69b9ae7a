"""Closed-loop rollouts: a tiny random-weight Cosmos3Policy in gym-pusht and metaworld, metrics as lerobot-eval."""

import json
import os

import numpy as np
import pytest

from cosmos3.cli import main
from cosmos3.pipelines import Cosmos3WorldActionPipeline
from cosmos3.robotics.policy import Cosmos3Policy, PolicyConfig
from cosmos3.robotics.rollout import RandomPolicy, rollout

KEYS = {"avg_sum_reward", "avg_max_reward", "pc_success", "eval_s", "eval_ep_s"}


def test_pusht_rollout_with_the_cli(tiny_policy_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    main(["rollout", "--env", "pusht", "--policy", str(tiny_policy_folder), "--episodes", "3", "--num-envs", "2",
          "--max-steps", "5", "--videos", "1", "--out", str(out), "--device", "cpu", "--seed", "7",
          "--image-size", "96"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    info = json.loads((out / "eval_info.json").read_text())
    assert set(info["aggregated"]) == KEYS and printed == info["aggregated"]
    assert [e["seed"] for e in info["per_episode"]] == [7, 8, 9]
    assert all(e["steps"] == 5 for e in info["per_episode"])
    assert 0.0 <= info["aggregated"]["pc_success"] <= 100.0
    assert len(info["video_paths"]) == 1 and os.path.getsize(info["video_paths"][0]) > 0


def test_cuda_graphs_flag_needs_a_gpu(tiny_policy_folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["rollout", "--env", "pusht", "--policy", str(tiny_policy_folder), "--episodes", "1",
              "--out", str(tmp_path / "eval"), "--device", "cpu", "--cuda-graphs"])
    assert "--cuda-graphs needs a CUDA device; the policy runs on cpu" in capsys.readouterr().err


def test_metaworld_rollout_is_reproducible(tiny_policy_folder):
    pipe = Cosmos3WorldActionPipeline.from_pretrained(str(tiny_policy_folder))
    config = PolicyConfig(embodiment="libero", action_dim=4, chunk_size=4, n_action_steps=4, num_inference_steps=2,
                          resolution_tier=256, fps=80.0)
    policy = Cosmos3Policy(pipe, config)
    runs = [rollout(policy, "metaworld:reach-v3", 2, seed=3, num_envs=2, max_steps=4, progress=False)
            for _ in range(2)]
    for info in runs:
        assert set(info["aggregated"]) == KEYS and len(info["per_episode"]) == 2
    assert [e["sum_reward"] for e in runs[0]["per_episode"]] == [e["sum_reward"] for e in runs[1]["per_episode"]]


def test_random_policy_baseline_and_argument_errors():
    policy = RandomPolicy(np.zeros(2), np.full(2, 512.0), seed=0)
    a = rollout(policy, "pusht", 2, seed=0, max_steps=10, progress=False)
    b = rollout(policy, "pusht", 2, seed=0, max_steps=10, progress=False)
    assert [e["sum_reward"] for e in a["per_episode"]] == [e["sum_reward"] for e in b["per_episode"]]
    with pytest.raises(ValueError, match="`episodes` must be an int >= 1"):
        rollout(policy, "pusht", 0)
    with pytest.raises(ValueError, match="`videos` > 0 needs `out_dir`"):
        rollout(policy, "pusht", 1, videos=1)


def test_expert_policy_succeeds_where_random_does_not(tmp_path, capsys):
    from cosmos3.robotics.rollout import ExpertPolicy

    options = {"render_quality": "fast", "image_size": 32}
    expert = rollout(ExpertPolicy(), "metaworld:reach-v3", 2, seed=0, num_envs=2, max_steps=150, progress=False,
                     env_options=options)
    assert expert["aggregated"]["pc_success"] == 100.0
    assert all(e["steps"] < 150 for e in expert["per_episode"])  # success ends the episode early
    with pytest.raises(RuntimeError, match="not bound"):
        ExpertPolicy().select_action({})
    with pytest.raises(SystemExit):
        main(["rollout", "--env", "pusht", "--policy", "expert", "--episodes", "1", "--out", str(tmp_path)])
