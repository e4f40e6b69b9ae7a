"""`cosmos3.parallel`: 2 and 4 gloo processes under torchrun generate what one process does (cfg halves, Ulysses,
ring attention, FSDP, tensor parallel, the frame-split VAE decode and their products; text-to-video and transfer),
every rank the same; `cosmos3 generate --cfg-parallel 2 --shard fsdp` under torchrun."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from cosmos3.parallel import parallelize

from .parallel_run import build_pipeline, generate, long_decode, transfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "parallel_run.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

TWO = ["cfg=2", "shard=fsdp", "cfg=2,shard=fsdp", "ulysses=2", "ulysses=2,sequence=ring", "shard=tp",
       "cfg=2,vae=frames"]
# cfg=2,shard=fsdp on 4: two replicas of a cfg pair, the weights over all four; ulysses=4 does not divide the tiny
# model's 2 key/value heads: ring attention, chosen automatically; cfg=2,shard=tp: tp 2 within each cfg pair
FOUR = ["cfg=2,ulysses=2", "cfg=2,ulysses=2,shard=fsdp", "cfg=2,shard=fsdp", "ulysses=4", "cfg=2,shard=tp",
        "cfg=2,ulysses=2,sequence=ring,vae=frames"]


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
    pipe = build_pipeline()
    return {**generate(pipe), "long": long_decode(pipe), **transfer(build_pipeline("transfer"))}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("two"), 2, TWO,
                  refused=["ulysses=3", "cfg=1", "cfg=2,ulysses=2", "ulysses=2,shard=tp"])


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("four"), 4, FOUR, refused=["ulysses=4,sequence=ulysses", "shard=tp"])


def split(b: int, part: int, cfg: int) -> int:
    """The rows of a batch of `b` that cfg rank `part` runs: ceil(b / 2) and the rest, a single sample whole."""
    if cfg == 1 or b == 1:
        return b
    return math.ceil(b / 2) if part == 0 else b - math.ceil(b / 2)


def check(plan, ranks, single):
    """Each rank's outputs equal one process's, bit for bit the same on every rank; each rank ran its share."""
    degrees = {k: v for k, _, v in (item.partition("=") for item in plan.split(","))}
    cfg, ulysses = int(degrees.get("cfg", 1)), int(degrees.get("ulysses", 1))
    tp = len(ranks) // cfg if degrees.get("shard") == "tp" else 1
    ring = ulysses > 1 and (degrees.get("sequence") == "ring" or 2 % ulysses)  # the tiny model: 2 key/value heads
    names = ["frames", "sound", "single", "logits", "transfer"] + (["long"] * ("vae" in degrees))
    for name in names:
        diff = (ranks[0][name] - single[name]).abs().max().item()
        assert diff <= 1e-5, (plan, name, diff)
        assert all(torch.equal(r[name], ranks[0][name]) for r in ranks[1:]), (plan, name)
    seen = single["seen"]
    for rank, r in enumerate(ranks):
        part = rank // tp % cfg if tp > 1 else rank // ulysses % cfg  # this rank's place in its cfg pair
        # the guided batch (4 samples) splits in halves, the unguided single sample does not
        assert r["seen"]["batch"] == [split(b, part, cfg) for b in seen["batch"]], plan
        tokens = [n * split(b, part, cfg) // b for b, n in zip(seen["batch"], seen["rows"])]
        assert r["seen"]["rows"] == [math.ceil(n / ulysses) for n in tokens], plan
        # Ulysses and tp keep their heads of the text cache, the ring all of them
        assert r["seen"]["cache_heads"] == seen["cache_heads"] // (tp * (1 if ring else ulysses)), plan
        # transfer: 2 prompts x (with hints, without, negative) = 6 rows a step
        assert r["transfer_batch"] == [split(b, part, cfg) for b in single["transfer_batch"]], plan


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
    assert "must divide the attention heads (4) and the key/value heads (2)" in refused["ulysses=4,sequence=ulysses"]
    assert "must divide the key/value heads (2)" in refused["shard=tp"]  # tp 4
    assert "do not combine" in refused["ulysses=2,shard=tp"]


def test_arguments_are_checked_by_name():
    pipe = build_pipeline()
    for kwargs, message in [(dict(cfg=3), "`cfg` must be 1 or 2"), (dict(ulysses=0), "`ulysses` must be an int >= 1"),
                            (dict(shard="ddp"), "`shard` must be one of"),
                            (dict(sequence="ring"), "it needs `ulysses` > 1"), (dict(vae="tiles"), "`vae` must be"),
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
    torchrun(2, "-m", "cosmos3", *args, "--cfg-parallel", "2", "--shard", "fsdp", "--vae-parallel", "frames", "--out",
             str(tmp_path / "two.mp4"))
    one, two = cio.read_video(tmp_path / "one.mp4").frames, cio.read_video(tmp_path / "two.mp4").frames
    assert one.shape == two.shape == (9, 32, 48, 3)
    assert abs(one.astype(int) - two.astype(int)).max() <= 1
    with pytest.raises(SystemExit):  # without torchrun: refused before the model loads
        cli.main([*args, "--cfg-parallel", "2", "--out", str(tmp_path / "x.mp4")])


def test_a_frame_chunk_decodes_as_the_whole_clip_after_the_decoder_memory():
    from cosmos3.parallel import decode_frames, decoder_memory
    from cosmos3.testing import make_tiny_vae

    vae = make_tiny_vae()
    memory = decoder_memory(vae)
    assert memory == 34  # a bound: the tiny decoder's outputs measured alike from 30 frames of warm-up on
    with torch.no_grad():
        x = vae.post_quant_conv(torch.randn(1, 8, 40, 2, 2, generator=torch.Generator().manual_seed(0)))
        whole = decode_frames(vae, x, 0, 40, 0)
        assert whole.shape[2] == 1 + 4 * 39  # the first latent frame decodes to one frame, the others to four
        assert (decode_frames(vae, x, 38, 40, memory) - whole[:, :, -8:]).abs().max() <= 1e-6
        # a cache warmed on too few frames is not the one the whole clip builds
        assert (decode_frames(vae, x, 38, 40, 4) - whole[:, :, -8:]).abs().max() > 1e-3
