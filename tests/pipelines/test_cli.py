"""`cosmos3 generate` end to end on a tiny checkpoint folder."""

import json

import numpy as np
import pytest
from PIL import Image

from cosmos3 import cli
from cosmos3 import io as cio


@pytest.fixture
def model_dir(components, tmp_path):
    _, reference = components
    reference.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


COMMON = ["--steps", "2", "--dtype", "float32", "--device", "cpu", "--height", "32", "--width", "48"]


def test_text_to_image_writes_a_png(model_dir, tmp_path, capsys):
    out = tmp_path / "cat.png"
    cli.main(["generate", "--task", "t2i", "--model", model_dir, "--prompt", "a cat", "--out", str(out), *COMMON])
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    assert cio.read_image(out).shape == (32, 48, 3)


def test_text_to_video_with_sound_writes_an_mp4(model_dir, tmp_path):
    out = tmp_path / "clip.mp4"
    cli.main(["generate", "--task", "t2v", "--model", model_dir, "--prompt", "rain", "--out", str(out), "--frames",
              "9", "--fps", "16", "--sound", *COMMON])
    clip = cio.read_video(out, with_audio=True)
    assert clip.frames.shape == (9, 32, 48, 3) and clip.audio is not None


def test_policy_writes_actions(model_dir, tmp_path):
    image = tmp_path / "obs.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "rollout.mp4"
    cli.main(["generate", "--task", "policy", "--model", model_dir, "--prompt", "open the drawer", "--image",
              str(image), "--domain", "bridge_orig_lerobot", "--chunk", "8", "--tier", "256", "--out", str(out),
              "--steps", "2", "--dtype", "float32", "--device", "cpu"])
    actions = json.loads((tmp_path / "rollout.json").read_text())
    assert np.array(actions).shape == (8, 10)
    assert cio.read_video(out).frames.shape[0] == 9


def test_attention_backend_defaults_to_tiled_on_a_bfloat16_cpu(model_dir, tmp_path, monkeypatch, capsys):
    from cosmos3 import Cosmos3TextToImagePipeline
    from cosmos3.models import attention

    calls = []
    tiled_gen = attention._tiled_gen
    monkeypatch.setattr(attention, "_tiled_gen", lambda *a: (calls.append(1), tiled_gen(*a))[1])
    base = ["generate", "--task", "t2i", "--model", model_dir, "--prompt", "a cat", "--out", str(tmp_path / "a.png"),
            "--steps", "1", "--device", "cpu", "--height", "32", "--width", "48"]
    ran = []
    for extra in (["--dtype", "bfloat16"], ["--dtype", "float32"], ["--dtype", "bfloat16", "--attention", "sdpa"]):
        calls.clear()
        cli.main([*base, *extra])
        ran.append(bool(calls))
    assert ran == [True, False, False]  # the forward went through the tiled kernel only by default in bf16

    loads = []
    monkeypatch.setattr(Cosmos3TextToImagePipeline, "from_pretrained", lambda *a, **k: loads.append(1))
    with pytest.raises(SystemExit) as err:
        cli.main([*base, "--attention", "fast"])
    assert err.value.code == 2 and "--attention: Unknown attention backend 'fast'" in capsys.readouterr().err
    assert not loads  # refused before loading the model


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--task", "t2i", "--out", "x.mp4"], "must end in .png"),
        (["--task", "i2v", "--out", "x.mp4"], "needs --image"),
        (["--task", "policy", "--out", "x.mp4", "--image", "a.png"], "needs --domain"),
    ],
)
def test_clear_errors(model_dir, capsys, extra, message):
    with pytest.raises(SystemExit) as err:
        cli.main(["generate", "--model", model_dir, "--prompt", "x", *extra])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_video_to_video_and_bad_model_folder(model_dir, tmp_path, capsys):
    clip = tmp_path / "in.mp4"
    cio.write_video(clip, np.random.default_rng(0).integers(0, 256, (9, 32, 48, 3), dtype=np.uint8), 16)
    out = tmp_path / "v2v.mp4"
    cli.main(["generate", "--task", "v2v", "--model", model_dir, "--prompt", "a river", "--video", str(clip),
              "--out", str(out), "--frames", "9", "--fps", "16", *COMMON])
    assert cio.read_video(out).frames.shape == (9, 32, 48, 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        cli.main(["generate", "--task", "t2i", "--model", str(empty), "--prompt", "x", "--out",
                  str(tmp_path / "a.png")])
    assert "not a readable Cosmos 3 checkpoint folder" in capsys.readouterr().err


def _clip(path, frames=9, seed=0, fps=16):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, 32, 48, 3), dtype=np.uint8)
    video = np.concatenate([np.roll(base, 2 * i, axis=2) for i in range(frames)])  # a moving pattern
    cio.write_video(path, video, fps)
    return path


def test_transfer_from_given_hint_clips_and_computed_edges(model_dir, tmp_path):
    source, depth = _clip(tmp_path / "in.mp4"), _clip(tmp_path / "depth.mp4", seed=1)
    out = tmp_path / "out.mp4"
    cli.main(["generate", "--task", "transfer", "--model", model_dir, "--prompt", "a snowy street", "--video",
              str(source), "--control", "edge,blur", "--control-video", f"depth={depth}", "--chunk-frames", "5",
              "--out", str(out), *COMMON])
    assert cio.read_video(out).frames.shape == (9, 32, 48, 3)  # the clip's length, in two windows


@pytest.mark.parametrize("extra,message", [
    (["--control", "depth"], "cannot be computed here"),
    (["--control", "edge"], "computes its maps from --video"),
    (["--control-video", "canny=x.mp4"], "expected NAME=PATH with NAME among"),
    ([], "needs hints"),
])
def test_transfer_errors(model_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--task", "transfer", "--model", model_dir, "--prompt", "x", "--out",
                  str(tmp_path / "o.mp4"), *COMMON, *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_transfer_hints_must_share_size_and_rate(model_dir, tmp_path, capsys):
    a, b = _clip(tmp_path / "a.mp4"), _clip(tmp_path / "b.mp4", fps=24)
    with pytest.raises(SystemExit):
        cli.main(["generate", "--task", "transfer", "--model", model_dir, "--prompt", "x", "--out",
                  str(tmp_path / "o.mp4"), "--control-video", f"depth={a}", "--control-video", f"seg={b}", *COMMON])
    assert "differ in frame rate" in capsys.readouterr().err
