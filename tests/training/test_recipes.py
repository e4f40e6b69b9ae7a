"""`cosmos3 train RECIPE` / `cosmos3 export`: recipes are validated up front, a run logs (stdout, JSONL,
TensorBoard), resumes, and exports a pipeline folder that the pipelines load."""

import json
import os

import numpy as np
import pytest
import torch

from cosmos3 import Cosmos3Transformer
from cosmos3.cli import main
from cosmos3.pipelines import Cosmos3TextToVideoPipeline
from cosmos3.testing import save_tiny_pipeline
from cosmos3.training.config import ConfigError
from cosmos3.training.recipes import read_train_recipe


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("base") / "pipeline"
    save_tiny_pipeline(folder, tiny_tokenizer, seed=1)
    return folder


@pytest.fixture(scope="module")
def robot_data(tmp_path_factory):
    from cosmos3.training.datasets import LeRobotDatasetWriter

    root = tmp_path_factory.mktemp("robot") / "data"
    features = {"observation.images.front": {"dtype": "video", "shape": [32, 32, 3]},
                "action": {"dtype": "float32", "shape": [10]}, "observation.state": {"dtype": "float32", "shape": [7]}}
    rng = np.random.default_rng(0)
    with LeRobotDatasetWriter(root, fps=10, features=features, robot_type="tiny_arm") as writer:
        for episode in range(3):
            frames = rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
            writer.add_episode(frames={"front": frames}, actions=rng.normal(size=(9, 10)).astype(np.float32),
                               state=rng.normal(size=(9, 7)).astype(np.float32), task=f"push block {episode}")
    return root


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    from cosmos3.io import write_video

    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(1)
    for i in range(4):
        write_video(str(root / f"clip{i}.mp4"), rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8), fps=8)
        (root / f"clip{i}.txt").write_text(f"a moving pattern number {i}")
    return root


def write_recipe(path, **tables):
    lines = []
    for key, value in tables.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in tables.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def t2v_recipe(tmp_path, base, folder_data, **train):
    return write_recipe(
        tmp_path / "recipe.toml", model=str(base), device="cpu",
        data={"format": "folder", "root": str(folder_data)},
        encode={"task": "t2v", "height": 32, "width": 32, "num_frames": 5},
        train={"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 2, "save_every": 2,
               "learning_rate": 1e-3, **train},
    )


def test_train_recipe_runs_logs_resumes_and_exports(tmp_path, base, folder_data, capsys):
    recipe = t2v_recipe(tmp_path, base, folder_data)
    main(["train", recipe])
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in steps)
    assert any(r.get("event") == "exported" for r in lines)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert '"loss"' in capsys.readouterr().out  # stdout JSON lines
    # the exported folder is a pipeline with the trained transformer
    pipe = Cosmos3TextToVideoPipeline.from_pretrained(str(run / "pipeline"))
    trained = pipe.transformer.state_dict()
    start = Cosmos3Transformer.from_pretrained(str(base / "transformer")).state_dict()
    assert not torch.equal(trained["proj_in.weight"], start["proj_in.weight"])
    assert torch.equal(trained["layers.0.self_attn.to_q.weight"], start["layers.0.self_attn.to_q.weight"])
    out = pipe("a moving pattern", num_frames=5, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.isfinite(out.frames[0]).all()
    # the same command again: continues from the last checkpoint up to the new max_steps
    main(["train", t2v_recipe(tmp_path, base, folder_data, max_steps=6)])
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resumed" and r["step"] == 4 for r in lines)
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # export from a checkpoint equals the run's own export (EMA weights)
    main(["export", str(run / "checkpoint-00000006"), "--model", str(base), "--out", str(tmp_path / "again")])
    a = Cosmos3Transformer.from_pretrained(str(run / "pipeline" / "transformer")).state_dict()
    b = Cosmos3Transformer.from_pretrained(str(tmp_path / "again" / "transformer")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_policy_recipe_on_lerobot_data_saves_the_normalizer(tmp_path, base, robot_data):
    recipe = write_recipe(
        tmp_path / "policy.toml", model=str(base), device="cpu", log_tensorboard=False,
        data={"format": "lerobot", "root": str(robot_data), "clip_frames": 5},
        encode={"task": "mixed", "embodiment": "bridge_orig_lerobot", "num_frames": 5, "resolution_tier": 256},
        train={"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "save_every": 2,
               "num_workers": 2},
    )
    main(["train", recipe])
    folder = tmp_path / "run" / "pipeline"
    assert (folder / "action_normalizer.json").exists()
    from cosmos3.robotics.policy import Cosmos3Policy

    policy = Cosmos3Policy.from_pretrained(str(folder), device="cpu", num_inference_steps=2)
    assert policy.config.embodiment == "bridge_orig_lerobot" and policy.config.cameras == ["front"]
    assert policy.config.chunk_size == 4 and policy.config.fps == 10.0
    frame = np.zeros((32, 32, 3), np.uint8)
    chunk = policy.predict_action_chunk({"observation.images.front": frame, "task": "push block 0"})
    assert chunk.shape == (4, 10) and np.isfinite(chunk).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": {"output_dir": "x", "max_step": 3}}, r"unknown key\(s\) \['max_step'\] in \[train\]"),
        ({"train": {"output_dir": "x", "max_steps": "3"}}, r"\[train\] `max_steps` = '3' has the wrong type"),
        ({"train": {"output_dir": "x", "max_steps": 0}}, r"`max_steps` must be an int >= 1"),
        ({"train": {"max_steps": 3}}, r"missing the required key `output_dir`"),
        ({"encode": {"task": "t2v", "heigth": 32}}, r"unknown key\(s\) \['heigth'\] in \[encode\]"),
        ({"encode": {"task": "t2v", "vae": "x"}}, r"unknown key\(s\) \['vae'\]"),
        ({"data": {"format": "webdataset", "root": "x"}}, r"`format` must be one of \['lerobot', 'folder'\]"),
        ({"data": {"format": "folder", "root": "x", "clip_frames": 5}}, r"unknown key\(s\) \['clip_frames'\]"),
        ({"optimizer": {"lr": 1}}, r"unknown key\(s\) or table\(s\) \['optimizer'\]"),
        ({"device": "tpu"}, r"`device` must be 'cpu' or 'cuda'"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, change, message):
    tables = {"model": "m", "data": {"format": "folder", "root": "d"}, "encode": {"task": "t2v"},
              "train": {"output_dir": "x"}, **change}
    with pytest.raises(ConfigError, match=message):
        read_train_recipe(write_recipe(tmp_path / "r.toml", **tables))


def test_recipe_paths_are_relative_to_the_recipe(tmp_path):
    tables = {"model": "m", "data": {"format": "folder", "root": "d"}, "encode": {"task": "t2v"},
              "train": {"output_dir": "runs/x", "betas": [0.9, 0.95]}}
    recipe = read_train_recipe(write_recipe(tmp_path / "r.toml", **tables))
    assert recipe.model == os.path.join(tmp_path, "m")
    assert recipe.tables["train"]["output_dir"] == os.path.join(tmp_path, "runs", "x")
    sources = [{"format": "folder", "root": "d", "encode": {"task": "t2v"}},
               {"format": "folder", "root": "/abs/e", "encode": {"task": "t2v"}}]
    recipe = read_train_recipe(write_sources_recipe(tmp_path / "s.toml", "m", sources, {"output_dir": "x"}))
    assert [s["data"]["root"] for s in recipe.tables["sources"]] == [os.path.join(tmp_path, "d"), "/abs/e"]


def test_cli_reports_recipe_errors_without_a_traceback(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.toml", model="m", data={"format": "folder", "root": "d"},
                        encode={"task": "t2v"}, train={"output_dir": "x", "bogus": 1})
    with pytest.raises(SystemExit) as e:
        main(["train", path])
    assert e.value.code == 2
    assert "unknown key(s) ['bogus'] in [train]" in capsys.readouterr().err


def write_sources_recipe(path, model, sources, train):
    lines = [f"model = {json.dumps(model)}", 'device = "cpu"', "log_tensorboard = false"]
    for source in sources:
        lines.append("[[sources]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in source.items() if k != "encode"]
        lines.append("[sources.encode]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in source["encode"].items()]
    lines.append("[train]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in train.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_several_sources_train_together(tmp_path, base, folder_data, robot_data):
    sources = [
        {"format": "folder", "root": str(folder_data), "encode": {"task": "t2v", "height": 32, "width": 32,
                                                                   "num_frames": 5}},
        {"format": "lerobot", "root": str(robot_data), "clip_frames": 5,
         "encode": {"task": "policy", "embodiment": "bridge_orig_lerobot", "num_frames": 5, "resolution_tier": 256}},
    ]
    recipe = write_sources_recipe(tmp_path / "mix.toml", str(base), sources,
                                  {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4,
                                   "save_every": 2})
    main(["train", recipe])
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    start = next(r for r in lines if r.get("event") == "start")
    assert start["sources"] == [4, 6] and start["examples"] == 10  # 3 episodes x 2 clips of 5 frames
    steps = [r for r in lines if "loss" in r]
    assert len(steps) == 2 and any("loss_action" in r for r in steps) and all("loss_vision" in r for r in steps)
    assert (tmp_path / "run" / "pipeline" / "policy_config.json").exists()
    two_robots = write_sources_recipe(tmp_path / "bad.toml", str(base), [sources[1], sources[1]],
                                      {"output_dir": "x"})
    with pytest.raises(ConfigError, match="2 world-action sources"):
        read_train_recipe(two_robots)
    mixed_forms = tmp_path / "both.toml"
    mixed_forms.write_text((tmp_path / "bad.toml").read_text() + '[data]\nformat = "folder"\nroot = "d"\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) or table\(s\) \['data'\]"):
        read_train_recipe(str(mixed_forms))
