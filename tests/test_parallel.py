"""`cosmos3.parallel`: 2 and 4 gloo processes under torchrun generate what one process does (cfg halves, Ulysses,
FSDP and their products), every rank the same; `cosmos3 generate --cfg-parallel 2 --shard fsdp` under torchrun."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from cosmos3.parallel import parallelize

from .parallel_run import build_pipeline, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "parallel_run.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

TWO = ["cfg=2", "shard=fsdp", "cfg=2,shard=fsdp", "ulysses=2"]
# cfg=2,shard=fsdp on 4: two replicas of a cfg pair, the weights over all four
FOUR = ["cfg=2,ulysses=2", "cfg=2,ulysses=2,shard=fsdp", "cfg=2,shard=fsdp"]


def torchrun(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    result = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def launch(out, nproc, plans, refused=()):
    torchrun(nproc, SCRIPT, str(out), *(f"--plan={p}" for p in plans), *(f"--errors={p}" for p in refused))
    runs = {p: [torch.load(out / f"{p}.rank{r}.pt") for r in range(nproc)] for p in plans}
    return runs, json.loads((out / "refused.json").read_text()) if refused else {}


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    return generate(build_pipeline())


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("two"), 2, TWO, refused=["ulysses=3", "cfg=1", "cfg=2,ulysses=2"])


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("four"), 4, FOUR, refused=["ulysses=4"])


def check(plan, ranks, single):
    """Each rank's outputs equal one process's, bit for bit the same on every rank; each rank ran its share."""
    degrees = {k: v for k, _, v in (item.partition("=") for item in plan.split(","))}
    cfg, ulysses = int(degrees.get("cfg", 1)), int(degrees.get("ulysses", 1))
    for name in ("frames", "sound", "single", "logits"):
        diff = (ranks[0][name] - single[name]).abs().max().item()
        assert diff <= 1e-5, (plan, name, diff)
        assert all(torch.equal(r[name], ranks[0][name]) for r in ranks[1:]), (plan, name)
    seen = single["seen"]
    # the guided batch (4 samples) splits in halves, the unguided single sample does not
    batch = [b // cfg if b % 2 == 0 else b for b in seen["batch"]]
    tokens = [n // cfg if b % 2 == 0 else n for b, n in zip(seen["batch"], seen["rows"])]
    for r in ranks:
        assert r["seen"]["batch"] == batch, plan
        assert r["seen"]["rows"] == [math.ceil(n / ulysses) for n in tokens], plan
        assert r["seen"]["cache_heads"] == seen["cache_heads"] // ulysses, plan


@pytest.mark.parametrize("plan", TWO)
def test_two_processes_generate_what_one_does(plan, two, single):
    check(plan, two[0][plan], single)


@pytest.mark.parametrize("plan", FOUR)
def test_four_processes_generate_what_one_does(plan, four, single):
    check(plan, four[0][plan], single)


def test_degrees_must_fit_the_world_and_the_heads(two, four):
    refused = {**two[1], **four[1]}
    assert "must divide the world size 2" in refused["ulysses=3"]
    assert "must divide the world size 2" in refused["cfg=2,ulysses=2"]
    assert "must equal the world size 2 without `shard`" in refused["cfg=1"]
    assert "must divide the attention heads (4) and the key/value heads (2)" in refused["ulysses=4"]


def test_arguments_are_checked_by_name():
    pipe = build_pipeline()
    for kwargs, message in [(dict(cfg=3), "`cfg` must be 1 or 2"), (dict(ulysses=0), "`ulysses` must be an int >= 1"),
                            (dict(shard="ddp"), "`shard` must be one of"),
                            (dict(cfg=2), "must divide the world size 1")]:
        with pytest.raises(ValueError, match=message):
            parallelize(pipe, **kwargs)
    with pytest.raises(TypeError, match="Cosmos 3 pipeline"):
        parallelize(object(), cfg=2)
    # one process: nothing to split or shard, the pipeline as it was
    assert parallelize(pipe, shard="fsdp").mesh is None and pipe.model_step_factory is None


def test_generate_cli_under_torchrun(tmp_path):
    from cosmos3 import cli
    from cosmos3 import io as cio
    from cosmos3.testing import save_tiny_pipeline
    from cosmos3.tokenizers.text import build_tiny_tokenizer

    model = save_tiny_pipeline(tmp_path / "model", build_tiny_tokenizer())
    args = ["generate", "--task", "t2v", "--model", model, "--prompt", "a red car", "--frames", "9", "--height", "32",
            "--width", "48", "--fps", "16", "--steps", "2", "--guidance", "4", "--dtype", "float32", "--device", "cpu"]
    cli.main([*args, "--out", str(tmp_path / "one.mp4")])
    torchrun(2, "-m", "cosmos3", *args, "--cfg-parallel", "2", "--shard", "fsdp", "--out", str(tmp_path / "two.mp4"))
    one, two = cio.read_video(tmp_path / "one.mp4").frames, cio.read_video(tmp_path / "two.mp4").frames
    assert one.shape == two.shape == (9, 32, 48, 3)
    assert abs(one.astype(int) - two.astype(int)).max() <= 1
    with pytest.raises(SystemExit):  # without torchrun: refused before the model loads
        cli.main([*args, "--cfg-parallel", "2", "--out", str(tmp_path / "x.mp4")])
