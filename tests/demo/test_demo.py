"""The browser demo: handlers on a tiny random checkpoint, its safety settings, and one end-to-end run of the page in
a real headless Chromium (Debian's, driven by Playwright)."""

import json
import math
import os
import re
import runpy
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:  # a missing gradio fails the run loudly: the `test` extra installs it
    import gradio as gr
except ImportError as e:
    raise ImportError("The demo tests need gradio: pip install -c ci/constraints.txt -e '.[test]'.") from e

import cosmos3.assets  # noqa: E402
from cosmos3 import demo as demo_module  # noqa: E402
from cosmos3.demo import (  # noqa: E402
    CONCURRENCY_ID,
    DemoApp,
    DemoLimits,
    action_labels,
    build_page,
    draw_landscape,
    draw_tabletop,
    launch_options,
    plot_actions,
)

REPO = Path(__file__).resolve().parents[2]
T2I = dict(prompt="a red cube", negative_prompt="", steps=2, guidance=6.0, seed=0, height=32, width=48)
CHROMIUM = os.environ.get("COSMOS3_CHROMIUM", "/usr/bin/chromium")
INSTALL_HINT = ("Install the browser test tools: `pip install playwright==1.65.2` (in the `test` extra) and Debian's "
                "Chromium as root: `apt-get install -y chromium`. Do not run `playwright install` (it downloads a "
                "browser build). COSMOS3_CHROMIUM points the test at another Chromium binary.")


def message(error: BaseException) -> str:
    return getattr(error, "message", str(error))


# ----------------------------------------------------------------------------------------------------- loading


def test_tabs_share_one_set_of_weights(demo_app):
    pipes = [demo_app.t2i, demo_app.i2v, demo_app.action, demo_app.text]
    assert all(p is not None for p in pipes)
    assert len({id(p.transformer) for p in pipes}) == 1
    assert len({id(p.text_tokenizer) for p in pipes}) == 1
    assert demo_app.t2i.vae is demo_app.i2v.vae is demo_app.action.vae
    # schedulers keep per-call state: each pipeline has its own
    assert len({id(p.scheduler) for p in pipes[:3]}) == 3
    assert demo_app.unavailable == dict.fromkeys(demo_module.TABS)
    assert demo_app.embodiments[0] == "pusht"  # the checkpoint's policy_config.json comes first


def test_missing_capabilities_are_explained(plain_model_folder):
    app = DemoApp(str(plain_model_folder), device="cpu")
    assert app.action is None and app.text is None
    assert "no action heads" in app.unavailable["world_action"]
    assert "all zeros" in app.unavailable["text"]
    with pytest.raises(gr.Error) as e:
        app.world_action(draw_tabletop(), "push the block", "pusht", 4, 2, 0, 256)
    assert "no action heads" in message(e.value)
    with pytest.raises(gr.Error, match="all zeros"):
        app.generate_text("hello", "", 4, 0.0, 1.0, 0)
    page = json.dumps(build_page(app).get_config_file())
    assert "no action heads" in page and "all zeros" in page
    assert app.text_to_image(**T2I).size == (48, 32)  # the other tabs still work


def test_distilled_checkpoint_fixes_steps_and_guidance(demo_model_folder, tmp_path):
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = tmp_path / "distilled"
    shutil.copytree(demo_model_folder, folder)
    FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=1.0).save_pretrained(str(folder / "scheduler"))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "modular_model_index.json").write_text(json.dumps({"distilled_sigmas": [1.0, 0.6, 0.3, 0.1]}))
    app = DemoApp(str(folder), device="cpu")
    assert app.distilled_steps == 4 and "distilled" in app.unavailable["world_action"]
    assert app.text_to_image(**{**T2I, "steps": 4, "guidance": 1.0}).size == (48, 32)
    with pytest.raises(gr.Error, match="fixed 4-step schedule"):
        app.text_to_image(**T2I)
    sliders = {c["props"]["elem_id"]: c["props"] for c in build_page(app).get_config_file()["components"]
               if c["props"].get("elem_id") in ("t2i-steps", "t2i-guidance")}
    assert (sliders["t2i-steps"]["value"], sliders["t2i-steps"]["interactive"]) == (4, False)
    assert (sliders["t2i-guidance"]["value"], sliders["t2i-guidance"]["interactive"]) == (1.0, False)


def test_default_model_folder_says_how_to_pass_one(monkeypatch):
    assert demo_module.default_model_folder is cosmos3.assets.default_model_folder  # the old import still works
    assert os.path.isfile(os.path.join(cosmos3.assets.default_model_folder(), "model_index.json"))
    monkeypatch.setattr(cosmos3.assets, "_TINY_MODEL", "no-such-model")
    with pytest.raises(FileNotFoundError, match="--model"):
        demo_module.default_model_folder()


def test_bad_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        DemoApp(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        DemoApp(str(tmp_path), device="cpu")


# ---------------------------------------------------------------------------------------------------- handlers


def test_text_to_image_returns_the_image_and_reports_each_step(demo_app):
    import torch

    calls = []
    image = demo_app.text_to_image(**T2I, progress=lambda value, desc=None: calls.append(value))
    assert (image.mode, image.size) == ("RGB", (48, 32))
    assert calls == [(1, 2), (2, 2)]
    direct = demo_app.t2i("a red cube", height=32, width=48, num_inference_steps=2, guidance_scale=6.0,
                          generator=torch.Generator().manual_seed(0), output_type="pil").images[0]
    assert np.array_equal(np.asarray(image), np.asarray(direct))  # the handler asks the pipeline for what was sent
    again = demo_app.text_to_image(**T2I)
    other = demo_app.text_to_image(**{**T2I, "seed": 1})
    assert np.array_equal(np.asarray(image), np.asarray(again))  # the seed decides
    assert not np.array_equal(np.asarray(image), np.asarray(other))


def test_image_to_video_writes_an_mp4(demo_app):
    from cosmos3.io import read_video

    path = demo_app.image_to_video(draw_landscape(), "the sun sets", None, 5, 2, 6.0, 0, 32, 32, 12)
    assert path.endswith(".mp4") and path.startswith(demo_app.workdir)
    video = read_video(path)
    assert video.frames.shape[:3] == (5, 32, 32)


def test_transfer_tab_shows_the_maps_and_the_video_that_follows_them(demo_app, tmp_path):
    from cosmos3.io import read_video, write_video
    from cosmos3.tokenizers.control import edge_map

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    source = np.concatenate([np.roll(base, 3 * i, axis=1) for i in range(6)])  # 6 frames: cut to 5 = 1 + 4k
    write_video(tmp_path / "in.mp4", source, 8)
    maps, video = demo_app.transfer(str(tmp_path / "in.mp4"), "a snowy street", None, ["edge", "blur"], 2, 6.0, 0,
                                    32, 32)
    assert maps.startswith(demo_app.workdir) and video.startswith(demo_app.workdir)
    shown, result = read_video(maps), read_video(video)
    assert shown.frames.shape[:3] == (5, 32, 64)  # the two maps side by side
    assert result.frames.shape[:3] == (5, 32, 32)
    decoded = read_video(tmp_path / "in.mp4").frames[:5]
    edges = edge_map(decoded)
    # the left half of the shown maps is the edge map of the clip (to the mp4's lossy coding)
    assert np.abs(shown.frames[:, :, :32].astype(float) - edges.astype(float)).mean() < 40


@pytest.mark.parametrize("args,message", [
    ((None, "x", None, ["edge"]), "Upload a video clip"),
    (("CLIP", "x", None, []), "Pick at least one control map"),
    (("CLIP", "x", None, ["depth"]), "['depth'] are not available here"),
])
def test_transfer_tab_refuses_bad_input(demo_app, tmp_path, args, message):
    from cosmos3.io import write_video

    write_video(tmp_path / "in.mp4", np.zeros((5, 32, 32, 3), np.uint8), 8)
    args = tuple(str(tmp_path / "in.mp4") if a == "CLIP" else a for a in args)
    with pytest.raises(Exception, match=re.escape(message)):
        demo_app.transfer(*args, 2, 6.0, 0, 32, 32)


def test_world_action_returns_plot_video_and_actions_in_robot_units(demo_app):
    calls = []
    observation = draw_tabletop().resize((64, 64))  # on the 256 canvas, never upscaled: a small clip
    plot, path, result = demo_app.world_action(observation, "push the T into the goal", "pusht", 4, 2, 0, 256,
                                               progress=lambda value, desc=None: calls.append(value))
    assert os.path.isfile(path) and path.endswith(".mp4")
    assert result["embodiment"] == "pusht" and result["normalized"] is False  # the folder's normalizer applied
    actions = np.asarray(result["actions"])
    assert actions.shape == (4, 2) and np.isfinite(actions).all()
    # the plot draws exactly the returned actions, per pusht channel, and its title names the units
    expected = plot_actions(actions, action_labels("pusht", 2), title="pusht: 4 actions (robot units)")
    assert plot.size == (720, 380) and np.array_equal(np.asarray(plot), np.asarray(expected))
    assert calls == [(1, 2), (2, 2)]


def test_text_tab_generates_text(demo_app):
    import torch

    reply = demo_app.generate_text("  hello there ", "", 6, 0.0, 1.0, 0)
    greedy = demo_app.text("hello there", max_new_tokens=6)  # the message stripped, no system prompt
    assert reply == greedy.text[0] and len(greedy.token_ids[0]) == 6  # the random model never stops early here
    assert demo_app.generate_text("hello there", "", 6, 0.0, 1.0, 5) == reply  # greedy: the seed changes nothing

    sampled = demo_app.generate_text("hello there", "be brief", 6, 0.8, 0.9, 3, True)
    sampling = dict(max_new_tokens=6, temperature=0.8, top_p=0.9, system_prompt="be brief")
    upsampled = demo_app.text.upsample_prompt("hello there", generator=torch.Generator().manual_seed(3), **sampling)
    plain = demo_app.text("hello there", generator=torch.Generator().manual_seed(3), **sampling).text[0]
    assert sampled == upsampled[0] and sampled != plain  # the checkbox rewrites the prompt instead of answering it


LIMITS = DemoLimits()
T2I_CASES = [
    (dict(prompt=""), "Prompt is empty"),
    (dict(prompt="   "), "Prompt is empty"),
    (dict(prompt=None), "Prompt is empty"),
    (dict(prompt=123), "Prompt must be text"),
    (dict(prompt="x" * (LIMITS.max_prompt_chars + 1)), f"the limit is {LIMITS.max_prompt_chars}"),
    (dict(negative_prompt="x" * (LIMITS.max_prompt_chars + 1)), "Negative prompt is"),
    (dict(steps=0), f"Steps must be between 1 and {LIMITS.max_steps}"),
    (dict(steps=10**6), f"Steps must be between 1 and {LIMITS.max_steps}"),
    (dict(steps=2.5), "Steps must be a whole number"),
    (dict(steps=True), "Steps must be a number"),
    (dict(steps="2"), "Steps must be a number"),
    (dict(guidance=-1.0), "Guidance must be in [0"),
    (dict(guidance=1e9), "Guidance must be in [0"),
    (dict(guidance=math.nan), "Guidance must be finite"),
    (dict(guidance=math.inf), "Guidance must be finite"),
    (dict(seed=-1), "Seed must be between 0 and"),
    (dict(seed=2**40), "Seed must be between 0 and"),
    (dict(height=40), "Height must be a multiple of 16, got 40 (nearest: 32, 48)"),
    (dict(height=0), "Height must be between 16 and"),
    (dict(width=100_000), "Width must be between 16 and"),
    (dict(height=1280, width=1280), f"the limit is {LIMITS.max_pixels}"),
]


@pytest.mark.parametrize("override, expected", T2I_CASES, ids=[str(i) for i in range(len(T2I_CASES))])
def test_text_to_image_refuses_out_of_range_values(demo_app, monkeypatch, override, expected):
    """The handler re-checks what the sliders already bound: the API can send anything."""
    monkeypatch.setattr(demo_app, "t2i", lambda *a, **k: pytest.fail("the pipeline ran on a refused request"))
    with pytest.raises(gr.Error) as e:
        demo_app.text_to_image(**{**T2I, **override})
    assert expected in message(e.value)
    assert "Traceback" not in message(e.value) and len(message(e.value)) <= 300
    assert e.value.print_exception is False


def test_other_tabs_refuse_out_of_range_values(demo_app, monkeypatch):
    for name in ("i2v", "action", "text"):
        monkeypatch.setattr(demo_app, name, lambda *a, **k: pytest.fail("the pipeline ran on a refused request"))
    image = draw_tabletop()
    i2v = dict(image=image, prompt="go", negative_prompt="", frames=5, steps=2, guidance=6.0, seed=0, height=32,
               width=32, fps=12)
    cases = [
        (demo_app.image_to_video, dict(i2v, frames=6), "Frames must be 1 + 4k, got 6 (nearest: 5, 9)"),
        (demo_app.image_to_video, dict(i2v, frames=10**5), f"Frames must be between 5 and {LIMITS.max_frames}"),
        (demo_app.image_to_video, dict(i2v, fps=0), "FPS must be in (0"),
        (demo_app.image_to_video, dict(i2v, fps=10**4), "FPS must be in (0"),
        (demo_app.image_to_video, dict(i2v, image=None), "Upload an image"),
        (demo_app.image_to_video, dict(i2v, image=Image.new("RGB", (5000, 20))), "each side must be between"),
        (demo_app.image_to_video, dict(i2v, image="/etc/passwd"), "must be a picture"),
    ]
    wa = dict(image=image, instruction="push", embodiment="pusht", chunk=4, steps=2, seed=0, tier=256)
    cases += [
        (demo_app.world_action, dict(wa, embodiment="martian"), "Embodiment must be one of"),
        (demo_app.world_action, dict(wa, chunk=10**4), f"Chunk size must be between 1 and {LIMITS.max_chunk}"),
        (demo_app.world_action, dict(wa, tier=300), "Resolution tier must be one of"),
        (demo_app.world_action, dict(wa, instruction=""), "Instruction is empty"),
        (demo_app.world_action, dict(wa, steps=-3), "Steps must be between"),
    ]
    text = dict(prompt="hi", system_prompt="", max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0)
    cases += [
        (demo_app.generate_text, dict(text, max_new_tokens=10**6), f"between 1 and {LIMITS.max_new_tokens}"),
        (demo_app.generate_text, dict(text, temperature=-0.5), "Temperature must be in [0, 2]"),
        (demo_app.generate_text, dict(text, top_p=0.0), "Top-p must be in (0, 1]"),
        (demo_app.generate_text, dict(text, prompt="x" * 10**5), "Message is 100000 characters"),
    ]
    for handler, kwargs, expected in cases:
        with pytest.raises(gr.Error) as e:
            handler(**kwargs)
        assert expected in message(e.value), (handler.__name__, kwargs, message(e.value))


def test_pipeline_errors_become_short_messages(demo_app, monkeypatch):
    def invalid(*args, **kwargs):
        raise ValueError("`height` must be a multiple of 16, got 40.\n  more detail on a second line")

    monkeypatch.setattr(demo_app, "t2i", invalid)
    with pytest.raises(gr.Error) as e:
        demo_app.text_to_image(**T2I)
    assert message(e.value) == "`height` must be a multiple of 16, got 40."
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback


def test_internal_errors_hide_their_details(demo_app, monkeypatch, caplog):
    def crash(*args, **kwargs):
        raise RuntimeError("secret /srv/weights/model.safetensors\nTraceback (most recent call last): ...")

    monkeypatch.setattr(demo_app, "t2i", crash)
    with pytest.raises(gr.Error) as e:
        demo_app.text_to_image(**T2I)
    text = message(e.value)
    assert text == "Internal error (RuntimeError); the server log has the details."
    assert "secret" not in text and "Traceback" not in text
    assert "secret" in caplog.text  # the operator still sees it, in the server log

    def oom(*args, **kwargs):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB at /dev/nvidia0")

    monkeypatch.setattr(demo_app, "t2i", oom)
    with pytest.raises(gr.Error, match="Out of memory: lower the resolution"):
        demo_app.text_to_image(**T2I)


# ------------------------------------------------------------------------------------------------ safety settings


def test_page_is_queued_one_model_call_at_a_time(demo_app):
    demo = build_page(demo_app)
    config = demo.get_config_file()
    assert config["analytics_enabled"] is False and demo.analytics_enabled is False
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert demo._queue.max_size == demo_app.limits.queue_size
    assert demo.api_open is False
    model_calls = [f for f in demo.fns.values() if f.api_name in ("text_to_image", "image_to_video", "world_action",
                                                                   "text")]
    assert sorted(f.api_name for f in model_calls) == ["image_to_video", "text", "text_to_image", "world_action"]
    for fn in model_calls:
        assert fn.concurrency_id == CONCURRENCY_ID and fn.concurrency_limit == 1
    labels = [c.get("props", {}).get("label") for c in config["components"]]
    assert {"Text to image", "Image to video", "World action", "Text"} <= set(labels)
    examples = [c for c in config["components"] if c["type"] == "dataset"]
    assert len(examples) == 4  # one example set per tab


def test_launch_options_are_safe():
    options = launch_options()
    assert options["server_name"] == "127.0.0.1" and options["share"] is False
    assert options["show_error"] is True and options["max_file_size"] == "10mb"
    assert "allowed_paths" not in options
    assert options["ssr_mode"] is False and options["mcp_server"] is False and options["enable_monitoring"] is False


def test_only_loopback_hosts_count_as_local():
    from cosmos3.io import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org"))


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_steps"):
        DemoLimits(max_steps=0)
    with pytest.raises(ValueError, match="max_frames"):
        DemoLimits(max_frames=2)
    small = DemoApp.__new__(DemoApp)
    small.limits = DemoLimits(max_pixels=256 * 256)
    assert small.tiers == [64, 128]  # 256 and larger: the largest aspect bucket (256x320) is over the pixel cap


def test_command_line_options():
    import argparse

    parser = argparse.ArgumentParser()
    demo_module.add_demo_arguments(parser)
    args = parser.parse_args([])
    assert (args.model, args.host, args.port, args.device) == (None, "127.0.0.1", 7860, None)
    with pytest.raises(ValueError, match="--port"):
        demo_module.run_demo(parser.parse_args(["--port", "70000"]))


def test_app_script_is_a_thin_entry_point(capsys):
    app = runpy.run_path(str(REPO / "demos" / "app.py"), run_name="demos_app")
    with pytest.raises(SystemExit) as e:
        app["main"](["--help"])
    assert e.value.code == 0
    usage = capsys.readouterr().out
    assert all(option in usage for option in ("--model", "--host", "--port", "--device"))
    assert "Cosmos3-Tiny" in usage and "random" not in usage  # the shipped model is trained, not random
    with pytest.raises(SystemExit) as e:  # a missing model folder is a one-line error, not a traceback
        app["main"](["--model", str(REPO / "no-such-folder")])
    assert e.value.code == 2
    assert "is not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- in a real browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Addresses with a listening TCP socket on `port`, from /proc/net/tcp{,6} (LISTEN is state 0A)."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port_hex = local.split(":")
                if state != "0A" or int(port_hex, 16) != port:
                    continue
                raw = bytes.fromhex(address)
                if width == 4:
                    found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def _wait_for_server(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"The demo server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/config", timeout=2) as response:
                return json.load(response)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    pytest.fail(f"The demo server did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _artifacts() -> Path:
    folder = Path(os.environ.get("COSMOS3_TEST_ARTIFACTS") or REPO / "tests" / "demo" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_demo_in_a_real_browser(tmp_path):
    """Serve `demos/app.py` as a user would (no `--model`: the shipped Cosmos3-Tiny), check what the server exposes,
    then drive the page in headless Chromium: an empty prompt gives a short error, a prompt gives an image that
    follows it; a screenshot is kept as an artifact."""
    from cosmos3.demo import default_model_folder
    from cosmos3.training.synthetic import detect

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed. {INSTALL_HINT}")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"No Chromium at {CHROMIUM}. {INSTALL_HINT}")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}  # the demo must turn it off
    env.update(HF_HUB_OFFLINE="1", GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "demos" / "app.py"), "--port", str(port), "--device",
                                 "cpu"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        config = _wait_for_server(proc, url, log, timeout=90)
        assert config["analytics_enabled"] is False
        assert config["max_file_size"] == 10 * 1024 * 1024
        assert _listening_addresses(port) == {"127.0.0.1"}, "the demo must listen on loopback only"
        model_index = os.path.join(default_model_folder(), "model_index.json")
        for path in ("/etc/passwd", model_index):  # no allowed_paths: not served
            assert _status(f"{url}/gradio_api/file={urllib.parse.quote(path)}") in (403, 404)

        # Direct API calls skip the page's sliders: gradio refuses values past a slider's range, the handler what
        # gradio lets through (off the slider's step), both with a short message.
        from gradio_client import Client

        client = Client(url, verbose=False)
        for args, expected in (((10**6, 6.0, 0, 32, 32), f"maximum value {DemoLimits().max_steps}"),
                               ((2, 6.0, 0, 40, 32), "Height must be a multiple of 16, got 40")):
            with pytest.raises(Exception) as e:
                client.predict("a cube", "", *args, api_name="/text_to_image")
            assert expected in str(e.value) and "Traceback" not in str(e.value)

        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
            )
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                outside: list[str] = []

                def only_local(route):
                    if urllib.parse.urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
                        route.continue_()
                    else:
                        outside.append(route.request.url)
                        route.abort()

                page.route("**/*", only_local)
                page.goto(url, wait_until="domcontentloaded", timeout=30_000)
                page.locator("#t2i-run").click(timeout=30_000)  # empty prompt: refused in the page
                page.get_by_text("Prompt is empty").first.wait_for(timeout=15_000)
                assert "Traceback" not in page.content()

                page.locator("#t2i-prompt textarea").fill("a large red circle on the left of a white background")
                page.locator("#t2i-run").click()
                image = page.locator("#t2i-image img").first
                image.wait_for(timeout=30_000)
                page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=image.element_handle(),
                                       timeout=15_000)
                src = image.get_attribute("src")
                assert src and src.startswith(url), src
                # the model's call_defaults.json size, and the picture follows the prompt's background
                assert image.evaluate("el => [el.naturalWidth, el.naturalHeight]") == [64, 64]
                with urllib.request.urlopen(src, timeout=5) as response:
                    served = tmp_path / "served.png"
                    served.write_bytes(response.read())
                assert Image.open(served).size == (64, 64)
                assert detect(Image.open(served))["background"] == "white"
                page.screenshot(path=str(_artifacts() / "demo.png"), full_page=True)
                assert not outside, f"the page reached outside this machine: {outside}"
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_model_examples_stay_inside_the_folder(tmp_path):
    import json

    from PIL import Image

    from cosmos3.demo import _model_examples

    assert _model_examples(str(tmp_path)) == {}
    (tmp_path / "examples").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "examples" / "frame.png")
    Image.new("RGB", (8, 8)).save(tmp_path.parent / "outside.png")
    (tmp_path / "demo_examples.json").write_text(json.dumps({
        "t2i": ["a red circle", 3],
        "world_action": [{"image": "examples/frame.png", "instruction": "reach the goal"},
                         {"image": "../outside.png", "instruction": "escape"},
                         {"image": "examples/missing.png", "instruction": "gone"}]}))
    examples = _model_examples(str(tmp_path))
    assert examples["t2i"] == ["a red circle"]
    assert [e["instruction"] for e in examples["world_action"]] == ["reach the goal"]
