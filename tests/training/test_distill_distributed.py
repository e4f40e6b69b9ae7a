"""`cosmos3 distill` under torchrun: 2 gloo processes with the teacher, student and critic sharded by FSDP2 record
the same losses and gradient norms and export the same student as one process with the whole batch; the checkpoint
the two ranks wrote holds one shard per rank and resumes in one process."""

import json
import subprocess
import sys

import pytest
import torch

from cosmos3 import Cosmos3TextToImagePipeline, Cosmos3Transformer

ENV_THREADS = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
RECIPE = """model = "{model}"
device = "cpu"
log_tensorboard = false
[prompts]
texts = ["a red car", "waves on a beach at dusk", "a lighthouse", "snow"]
height = 32
width = 48
[distill]
output_dir = "{out}"
max_steps = {steps}
batch_size = 4
save_every = 2
guidance_scale = 3.0
critic_updates_per_student_update = 2
student_learning_rate = 1e-4
critic_learning_rate = 1e-4
grad_clip = 10.0
ema_decay = 0.5
parallelism = "fsdp"
"""


def distill(tmp_path, name, model, nproc, steps=4, out=None):
    import os

    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(RECIPE.format(model=model, out=out or tmp_path / name, steps=steps))
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    result = subprocess.run([sys.executable, *launch, "-m", "cosmos3", "distill", str(recipe)],
                            env={**os.environ, **ENV_THREADS}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in ((out or tmp_path / name) / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss_critic" in r], lines


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from cosmos3.testing import save_tiny_pipeline
    from cosmos3.tokenizers.text import build_tiny_tokenizer

    return save_tiny_pipeline(tmp_path_factory.mktemp("teacher") / "model", build_tiny_tokenizer(),
                              pipeline_class=Cosmos3TextToImagePipeline)


def test_two_sharded_processes_distill_what_one_does(tmp_path, teacher):
    one, _ = distill(tmp_path, "one", teacher, 1)
    two, _ = distill(tmp_path, "two", teacher, 2)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["student_update"] for r in two] == [True, False, True, False]
    for key in ("loss_critic", "grad_norm_critic", "loss_dmd", "grad_norm_dmd"):
        mine, theirs = [r.get(key, 0.0) for r in two], [r.get(key, 0.0) for r in one]
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-7), key
    a = Cosmos3Transformer.from_pretrained(str(tmp_path / "one" / "pipeline" / "transformer")).state_dict()
    b = Cosmos3Transformer.from_pretrained(str(tmp_path / "two" / "pipeline" / "transformer")).state_dict()
    assert set(a) == set(b)
    start = Cosmos3Transformer.from_pretrained(teacher, subfolder="transformer").state_dict()
    # the student moved well beyond the tolerance (Adam turns summation-order noise in near-zero gradients into
    # differences of up to ~6e-6 at this learning rate)
    assert max((a[n] - start[n]).abs().max().item() for n in a) > 5e-5
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=name)
    student = Cosmos3TextToImagePipeline.from_pretrained(str(tmp_path / "two" / "pipeline"))
    assert student.config.distilled_sigmas == pytest.approx([1.0, 15 / 16, 5 / 6, 5 / 8])

    from safetensors import safe_open

    # the student's generation tower was sharded: one file per rank, each with part of its rows
    files = sorted((tmp_path / "two" / "checkpoint-00000004" / "state").glob("*.safetensors"))
    assert len(files) == 2
    rows = []
    for f in files:
        with safe_open(str(f), "pt") as h:
            rows.append(h.get_slice("student.proj_in.weight").get_shape()[0])
    assert sum(rows) == a["proj_in.weight"].shape[0] and max(rows) < a["proj_in.weight"].shape[0]
    # the two ranks' checkpoint resumes in one process and continues as the single run does
    more, lines = distill(tmp_path, "more", teacher, 1, steps=6, out=tmp_path / "two")
    assert any(e.get("event") == "resumed" and e["step"] == 4 for e in lines)
    assert [r["step"] for r in more][-2:] == [5, 6]


def test_parallelism_is_checked_by_name(tmp_path):
    from cosmos3.training.distill import DistillConfig

    with pytest.raises(ValueError, match=r"`parallelism` must be one of \['none', 'fsdp'\], got 'ddp'"):
        DistillConfig(output_dir=str(tmp_path), parallelism="ddp")
    assert DistillConfig(output_dir=str(tmp_path), parallelism="fsdp").parallelism == "fsdp"
