"""Trainer: it learns, it resumes exactly, it survives kill -9, it skips bad checkpoints and non-finite steps."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cosmos3 import Cosmos3Transformer
from cosmos3.testing import randomize_
from cosmos3.training import Example, TrainConfig, Trainer, checkpoint


def model(seed=0):
    return randomize_(Cosmos3Transformer.from_preset("tiny"), seed=seed, std=0.1)


def dataset(n=3):
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(n):
        action = torch.cat([torch.randn(3, 10, generator=g), torch.zeros(3, 6)], dim=1)
        examples.append(Example(text_ids=[1 + i, 2, 3], vision=torch.randn(8, 2, 4, 4, generator=g), fps=16.0,
                                vision_condition_frames=(0,) if i == 1 else (), action=action, action_domain_id=8,
                                raw_action_dim=10, sound=torch.randn(8, 4, generator=g) if i == 2 else None))
    return examples


def config(tmp_path, **kw):
    return TrainConfig(**{"output_dir": str(tmp_path), "batch_size": 2, "learning_rate": 1e-2, "save_every": 3,
                          "timestep_distribution": "uniform", "grad_clip": 10.0, **kw})


def quiet(record):
    pass


def test_a_tiny_model_learns(tmp_path):
    data = [Example(text_ids=[1, 2, 3, 4], vision=torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0)))]
    trainer = Trainer(model(), data, config(tmp_path, batch_size=1, max_steps=80, save_every=1000), log=quiet)
    before, _ = trainer.loss(data, torch.Generator().manual_seed(123))  # fixed timesteps and noise: a fair probe
    trainer.train()
    after, _ = trainer.loss(data, torch.Generator().manual_seed(123))
    assert after < before / 1.4


def test_frozen_text_tower_and_trained_generation_tower(tmp_path):
    m = model()
    frozen = m.layers[0].self_attn.to_q.weight.clone()
    trained = m.layers[0].self_attn.add_q_proj.weight.clone()
    Trainer(m, dataset(), config(tmp_path, max_steps=2, save_every=1000), log=quiet).train()
    assert torch.equal(m.layers[0].self_attn.to_q.weight, frozen)
    assert not torch.equal(m.layers[0].self_attn.add_q_proj.weight, trained)

    # train_text_tower (a model trained from scratch): the generation loss reaches the text tower too
    m = model()
    text = m.layers[0].self_attn.to_q.weight.clone()
    embed = m.embed_tokens.weight.clone()
    settings = config(tmp_path / "t", max_steps=2, save_every=1000, train_text_tower=True)
    Trainer(m, dataset(), settings, log=quiet).train()
    assert not torch.equal(m.layers[0].self_attn.to_q.weight, text)
    assert not torch.equal(m.embed_tokens.weight, embed)


def test_resume_continues_exactly(tmp_path):
    straight = Trainer(model(), dataset(), config(tmp_path / "a", max_steps=6), log=quiet)
    records = straight.train()
    first = Trainer(model(), dataset(), config(tmp_path / "b", max_steps=3), log=quiet)
    first.train()
    second = Trainer(model(), dataset(), config(tmp_path / "b", max_steps=6), log=quiet)
    resumed = second.train()
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in records[3:]], rel=1e-5)
    for name, p in straight.params.items():
        torch.testing.assert_close(p, second.params[name], rtol=1e-5, atol=1e-6)


def test_incomplete_and_corrupt_checkpoints_are_skipped(tmp_path):
    trainer = Trainer(model(), dataset(), config(tmp_path, max_steps=6, keep_checkpoints=3), log=quiet)
    trainer.train()  # checkpoints at 3 and 6
    os.remove(tmp_path / "checkpoint-00000006" / "COMPLETE")  # as if killed before the marker
    (tmp_path / "checkpoint-00000009.partial").mkdir()
    events = []
    again = Trainer(model(), dataset(), config(tmp_path, max_steps=6), log=events.append)
    assert again.resume() == 3
    assert [e["event"] for e in events][:2] == ["skipping incomplete checkpoint", "skipping incomplete checkpoint"]
    (path,) = (tmp_path / "checkpoint-00000003" / "state").glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])  # corrupt the only complete one
    events.clear()
    assert Trainer(model(), dataset(), config(tmp_path, max_steps=6), log=events.append).resume() is None
    assert any(e["event"] == "skipping corrupt checkpoint" for e in events)


def test_non_finite_steps_are_skipped_before_the_optimizer(tmp_path):
    data = dataset()
    for ex in data:
        ex.vision[0, 0, 0, 0] = float("nan")
    trainer = Trainer(model(), data, config(tmp_path, max_steps=2, save_every=1000), log=quiet)
    before = {k: v.clone() for k, v in trainer.params.items()}
    records = trainer.train()
    assert all(r.get("skipped") for r in records) and trainer.skipped_steps == 2
    assert all(torch.equal(before[k], v) for k, v in trainer.params.items())


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from tests.training.test_trainer import model, dataset, config
    from cosmos3.training import Trainer
    from pathlib import Path
    slow = sys.argv[1] == "slow"
    def log(record):
        print(record, flush=True)
        if slow:
            time.sleep(0.3)
    Trainer(model(), dataset(), config(Path({out!r}), max_steps=12, save_every=2), log=log).train()
""")


def test_kill_9_and_rerun_the_same_command(tmp_path):
    out = tmp_path / "run"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = SCRIPT.format(root=root, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script, "slow"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-00000004").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the training process ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(d.name.split("-")[1].split(".")[0]) for d in out.iterdir())
    assert 4 <= killed_at < 12
    subprocess.run([sys.executable, "-c", script, "fast"], check=True, stdout=subprocess.DEVNULL)
    state = json.loads((out / "checkpoint-00000012" / "trainer_state.json").read_text())
    assert state["step"] == 12
    straight = Trainer(model(), dataset(), config(tmp_path / "straight", max_steps=12, save_every=2), log=quiet)
    straight.train()
    resumed = checkpoint.read_tensors(str(out / "checkpoint-00000012"))
    for name, p in straight.params.items():
        torch.testing.assert_close(resumed[f"model.{name}"], p.detach(), rtol=1e-5, atol=1e-6)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1"):
        config(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="`timestep_distribution`"):
        config(tmp_path, timestep_distribution="cosine")
    with pytest.raises(ValueError, match="fewer than `batch_size`=5"):
        Trainer(model(), dataset(), config(tmp_path, batch_size=5), log=quiet)
