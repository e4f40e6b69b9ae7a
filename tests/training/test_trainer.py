"""Trainer: it learns, it resumes exactly, it survives kill -9, it skips bad checkpoints and non-finite steps; transfer
examples train on their target with their control clips given clean."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cosmos3 import Cosmos3Transformer, flow
from cosmos3.testing import randomize_
from cosmos3.training import Example, TrainConfig, Trainer, checkpoint
from cosmos3.training.distill import DistillConfig, Distiller


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


# ------------------------------------------------------------------------------------------ transfer


def transfer_dataset(n=3, hints=2):
    """Transfer examples: a target of 2 latent frames and `hints` control clips of the same shape."""
    g = torch.Generator().manual_seed(1)
    return [Example(text_ids=[4 + i, 5, 6], vision=torch.randn(8, 2, 4, 4, generator=g), fps=16.0,
                    control=torch.randn(hints, 8, 2, 4, 4, generator=g)) for i in range(n)]


def value(result):
    """The loss of a `Trainer.loss` result as a float (its graph left alone)."""
    return float(result[0].detach())


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


class Probe:
    """Wraps `trainer.forward_model`: records its vision inputs and layout, and can add `delta` to the predicted
    control frames or target frames, or answer with fixed predictions (a model that reads nothing)."""

    def __init__(self, trainer):
        self.forward, self.inputs, self.layout = trainer.forward_model, None, None
        self.control_delta = self.target_delta = 0.0
        self.fixed = None
        trainer.forward_model = self

    def __call__(self, layout, vision, timestep, **kwargs):
        out = self.forward(layout, vision, timestep, **kwargs)
        self.inputs, self.layout = [v.detach().clone() for v in vision], layout
        for b, sample in enumerate(layout.samples):
            T = sample.vision_shape[0] // sample.vision_items
            offset = sample.vision_shape[0] - T
            pred = out.sample[b] if self.fixed is None else self.fixed[b].clone()
            pred[:, :offset] += self.control_delta
            pred[:, offset:] += self.target_delta
            out.sample[b] = pred
        return out


def test_transfer_examples_train(tmp_path):
    data = transfer_dataset()
    trainer = Trainer(model(), data, config(tmp_path, max_steps=3, save_every=1000), log=quiet)
    before = {k: v.clone() for k, v in trainer.params.items()}
    records = trainer.train()
    assert len(records) == 3 and all(math.isfinite(r["loss"]) and "skipped" not in r for r in records)
    assert set(records[0]) >= {"loss_vision"} and "loss_action" not in records[0]
    assert any(not torch.equal(before[k], v) for k, v in trainer.params.items())


def test_transfer_loss_is_on_the_target_with_controls_clean(tmp_path):
    ex = transfer_dataset(1)[0]
    trainer = Trainer(model(), [ex], config(tmp_path, batch_size=1), log=quiet)
    probe = Probe(trainer)
    loss, parts = trainer.loss([ex], gens(7))

    # the input is [control_1 | control_2 | target at t], the controls exactly as given and marked clean
    g = gens(7)[0]
    t = flow.shift_timesteps(flow.sample_timesteps(1, "uniform", generator=g), 1.0)[0]
    noise = torch.randn(ex.vision.shape, generator=g)
    (vision,) = probe.inputs
    assert vision.shape == (8, 6, 4, 4)
    assert torch.equal(vision[:, :4], torch.cat(list(ex.control), dim=1))
    torch.testing.assert_close(vision[:, 4:], flow.add_noise(ex.vision, noise, t), rtol=0, atol=1e-6)
    assert probe.layout.samples[0].vision_condition_frames == (0, 1, 2, 3)
    assert [list(f) for f in probe.layout.vision_noisy_frames] == [[4, 5]]
    assert torch.equal(ex.loss_mask("vision"), torch.ones_like(ex.vision))  # every target frame, nothing else

    # the loss is the target's: the last T frames of the prediction against `noise - x0`
    probe.fixed = [torch.randn(8, 6, 4, 4, generator=gens(3)[0])]
    fixed, _ = trainer.loss([ex], gens(7))
    expected = flow.flow_matching_loss(
        {"vision": flow.masked_mse(probe.fixed[0][None, :, 4:], flow.velocity_target(ex.vision, noise)[None])},
        trainer.config.loss_weights, trainer.config.loss_scale)
    torch.testing.assert_close(fixed, expected, rtol=1e-6, atol=0)
    # what the prediction holds at the control frames never reaches the loss; at the target it does
    probe.control_delta = 1e3
    assert value(trainer.loss([ex], gens(7))) == float(fixed.detach())
    probe.control_delta, probe.target_delta = 0.0, 1.0
    assert value(trainer.loss([ex], gens(7))) > float(fixed.detach()) + 1.0
    # another control changes the loss through the model only: a model that reads nothing gives the same loss
    other = Example(ex.text_ids, vision=ex.vision, fps=ex.fps, control=ex.control + 1.0)
    probe.target_delta = 0.0
    assert value(trainer.loss([other], gens(7))) == float(fixed.detach())
    probe.fixed = None
    assert value(trainer.loss([other], gens(7))) != pytest.approx(float(loss.detach()), rel=1e-4)
    weight = trainer.config.loss_scale * trainer.config.loss_weights["vision"]
    assert parts["vision"] == pytest.approx(float(loss.detach()) / weight, rel=1e-6)


def test_a_mixed_batch_is_each_example_alone(tmp_path):
    """A transfer example next to a text-to-video one: the batch's loss is the mean of the two alone (each the only
    sample with vision, under the same generator), as per-modality means over the batch are."""
    transfer = transfer_dataset(1, hints=1)[0]
    t2v = Example(text_ids=[9, 8, 7, 6], vision=torch.randn(8, 3, 4, 2, generator=gens(2)[0]), fps=24.0)
    trainer = Trainer(model(), [transfer, t2v], config(tmp_path), log=quiet)
    batch, parts = trainer.loss([transfer, t2v], gens(11, 12))
    alone = [value(trainer.loss([ex], gens(seed))) for ex, seed in ((transfer, 11), (t2v, 12))]
    assert float(batch.detach()) == pytest.approx(sum(alone) / 2, rel=1e-5)
    assert alone[0] != pytest.approx(alone[1], rel=1e-3)  # two different numbers, so the mean checks both
    batch.backward()  # and the batch has gradients for the generation tower
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.params.values())


def test_distillation_refuses_transfer_requests(tmp_path):
    settings = DistillConfig(output_dir=str(tmp_path), batch_size=1, guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"has `control` clips \(shape \(2, 8, 2, 4, 4\)\).*no distilled transfer"):
        Distiller(model(), transfer_dataset(1), settings, log=quiet)
