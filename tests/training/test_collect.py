"""Scripted-expert collection: only successful episodes reach the LeRobotDataset, which loads back with the
environment's features, tasks and lengths; seeds and failures are accounted for."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("metaworld")
pytest.importorskip("pyarrow")
pytest.importorskip("av")

from cosmos3.training.collect import add_collect_arguments, collect, main  # noqa: E402
from cosmos3.training.datasets import LeRobotDataset  # noqa: E402

FAST = {"render_quality": "fast"}


@pytest.fixture(scope="module")
def reach(tmp_path_factory):
    """Two successful reach-v3 episodes. With at most 48 steps, seed 1 (its expert needs 51) fails."""
    root = tmp_path_factory.mktemp("collect") / "reach"
    summary = collect("metaworld:reach-v3", 2, root, seed=0, image_size=32, progress=False,
                      env_options={**FAST, "max_episode_steps": 48})
    return root, summary


def test_summary_counts_failures_and_seeds(reach):
    root, summary = reach
    assert (summary["episodes"], summary["requested"], summary["complete"]) == (2, 2, True)
    assert (summary["seeds"], summary["failed_seeds"]) == ([0, 2], [1])
    assert (summary["attempts"], summary["failed_attempts"]) == (3, 1)
    assert summary["frames"] == sum(summary["episode_lengths"])
    assert (summary["embodiment"], summary["fps"], summary["task"]) == ("libero", 80.0, "reach the goal position")
    assert summary["conventions"]["gripper_open"] == "min"
    with open(os.path.join(root, "meta", "collection.json")) as f:
        assert json.load(f) == json.loads(json.dumps(summary))


def test_dataset_loads_with_features_and_tasks(reach):
    root, summary = reach
    data = LeRobotDataset(root, clip_frames=5)
    assert data.info["total_episodes"] == 2 and data.info["total_frames"] == summary["frames"]
    assert data.fps == 80.0 and data.robot_type == "sawyer"
    assert data.tasks == {0: "reach the goal position"}
    features = data.features
    assert features["observation.images.corner2"]["shape"] == [32, 32, 3]
    assert features["observation.state"]["shape"] == [4] and features["action"]["shape"] == [4]
    assert features["observation.state"]["names"] == ["hand_x", "hand_y", "hand_z", "gripper_opening"]
    sample = data[0]
    assert sample["frames"]["observation.images.corner2"].shape == (5, 32, 32, 3)
    assert sample["action"].shape == (4, 4) and sample["state"].shape == (5, 4)
    assert sample["task"] == "reach the goal position"
    actions = np.asarray(data.stats["action"]["max"])
    assert (np.abs(actions) <= 1).all()  # what the environment applied (clipped), not the expert's raw output


def test_only_successful_episodes_are_written(reach):
    import pyarrow.parquet as pq

    root, summary = reach
    table = pq.read_table(os.path.join(root, "data", "chunk-000", "file-000.parquet")).to_pydict()
    episodes = np.asarray(table["episode_index"])
    success = np.asarray(table["next.success"])
    done = np.asarray(table["next.done"])
    for index, length in enumerate(summary["episode_lengths"]):
        rows = episodes == index
        assert rows.sum() == length
        assert success[rows][-1] and not success[rows][:-1].any()  # each ends at its first success
        assert done[rows][-1] and not done[rows][:-1].any()


def test_no_success_writes_nothing(tmp_path):
    out = tmp_path / "none"
    with pytest.raises(RuntimeError, match="succeeded"):
        collect("metaworld:reach-v3", 1, out, max_attempts=1, image_size=16, progress=False,
                env_options={**FAST, "max_episode_steps": 2})
    assert not out.exists()


def test_bad_arguments(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError):
        collect("metaworld:reach-v3", 1, tmp_path / "full")
    with pytest.raises(ValueError, match="`max_attempts`"):
        collect("metaworld:reach-v3", 3, tmp_path / "a", max_attempts=2)
    with pytest.raises(ValueError, match="`expert`"):
        collect("metaworld:reach-v3", 1, tmp_path / "b", expert="human")
    pytest.importorskip("gym_pusht")
    with pytest.raises(ValueError, match="no scripted expert"):
        collect("pusht", 1, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_cli(tmp_path, capsys):
    import argparse

    args = add_collect_arguments(argparse.ArgumentParser()).parse_args(
        ["--env", "metaworld:reach-v3", "--episodes", "1", "--out", "x", "--image-size", "24x32",
         "--env-option", "render_quality=fast", "--env-option", 'cameras=["corner2", "corner3"]']
    )  # fmt: skip
    assert args.image_size == (24, 32) and args.expert == "scripted" and args.seed == 0
    assert dict(args.env_option) == {"render_quality": "fast", "cameras": ["corner2", "corner3"]}
    out = tmp_path / "cli"
    code = main(["--env", "metaworld:reach-v3", "--episodes", "1", "--out", str(out), "--seed", "5",
                 "--image-size", "16", "--env-option", "render_quality=fast", "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["seeds"] == [5] and summary["episodes"] == 1
    assert LeRobotDataset(out, clip_frames=2).info["total_episodes"] == 1


def test_cosmos3_collect_command(tmp_path, capsys):
    from cosmos3.cli import main
    from cosmos3.training.datasets import LeRobotDataset

    main(["collect", "--env", "metaworld:reach-v3", "--expert", "scripted", "--episodes", "1", "--out",
          str(tmp_path / "reach"), "--seed", "3", "--image-size", "64", "--quiet"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["episodes"] == 1 or summary.get("kept", 1) == 1
    assert LeRobotDataset(str(tmp_path / "reach"), clip_frames=5).num_episodes == 1


def test_several_environments_make_one_multi_task_dataset(tmp_path):
    from cosmos3.training.datasets import LeRobotDataset

    root = tmp_path / "mt"
    summary = collect(["metaworld:reach-v3", "metaworld:drawer-close-v3"], 1, root, image_size=32, progress=False,
                      env_options={"render_quality": "fast"})
    assert summary["episodes"] == 2 and summary["complete"]
    assert [e["env"] for e in summary["envs"]] == ["metaworld:reach-v3", "metaworld:drawer-close-v3"]
    assert summary["frames"] == sum(e["frames"] for e in summary["envs"])
    data = LeRobotDataset(root, clip_frames=5)
    tasks = {data[i]["task"] for i in range(len(data))}
    assert tasks == {e["task"] for e in summary["envs"]} and len(tasks) == 2
    with pytest.raises(ValueError, match="distinct specs"):
        collect(["metaworld:reach-v3", "metaworld:reach-v3"], 1, tmp_path / "dup")
