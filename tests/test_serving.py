"""`cosmos3 serve`: the generation HTTP API on a tiny random pipeline folder.

One server (module scope) answers every test; the outputs are compared byte for byte with the pipelines loaded
separately from the same folder and called directly with the same seeds. Progress and cancellation are made
deterministic by holding the worker inside a denoising step (a wrapped `guided_velocity`) while the test asks.
"""

import base64
import http.client
import io
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from cosmos3 import cli
from cosmos3 import io as cio
from cosmos3.pipelines import (
    ActionRequest,
    Cosmos3ImageToVideoPipeline,
    Cosmos3TextToImagePipeline,
    Cosmos3TextToVideoPipeline,
    Cosmos3TransferPipeline,
    Cosmos3VideoToVideoPipeline,
    Cosmos3WorldActionPipeline,
)
from cosmos3.serving import GenerationServer, ServeLimits, check_bind
from cosmos3.serving.model import to_uint8
from cosmos3.testing import save_tiny_pipeline

LIMITS = ServeLimits(max_pixels=128 * 32, max_frames=9, max_steps=60, max_n=2, max_queue=2, max_body_bytes=1 << 20)
STEPS = 2
EMBODIMENT = "bridge_orig_lerobot"  # 10-wide actions, a fixed width


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_tokenizer):
    """A tiny random folder with the call defaults the server takes where a request gives none (as Tiny's)."""
    folder = save_tiny_pipeline(tmp_path_factory.mktemp("serve") / "tiny", tiny_tokenizer)
    cio.atomic_write_json(f"{folder}/call_defaults.json", {"height": 32, "width": 32, "num_frames": 5, "fps": 8.0,
                                                           "num_inference_steps": STEPS})
    return folder


@pytest.fixture(scope="module")
def server(folder):
    with GenerationServer(folder, port=0, limits=LIMITS, device="cpu", dtype=torch.float32) as s:
        yield s


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory):
    """A 9-frame 32x32 mp4 (moving gradient) and its decoded frames, as the server will decode them."""
    path = tmp_path_factory.mktemp("media") / "in.mp4"
    t, y, x = np.meshgrid(np.arange(9), np.arange(32), np.arange(32), indexing="ij")
    frames = np.stack([(x * 8 + t * 10) % 256, (y * 8) % 256, (x + y + t * 20) % 256], -1).astype(np.uint8)
    cio.write_video(path, frames, 8.0)
    return path.read_bytes(), cio.read_video(path).frames


def png(seed: int = 0, size: tuple[int, int] = (40, 56)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def call(server, method: str, path: str, body=None, content_type: str = "application/json"):
    """(status, parsed JSON or raw bytes, content type)."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    headers = {"Content-Type": content_type} if data is not None else {}
    request = urllib.request.Request(server.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, raw, kind = r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, raw, kind = e.code, e.read(), e.headers["Content-Type"]
    return status, (json.loads(raw) if kind == "application/json" else raw), kind


def multipart(fields: dict) -> tuple[bytes, str]:
    boundary = "cosmos3testboundary"
    parts = []
    for name, value in fields.items():
        if isinstance(value, bytes):
            head = f'Content-Disposition: form-data; name="{name}"; filename="{name}.bin"\r\n' \
                   "Content-Type: application/octet-stream\r\n\r\n"
            parts.append(f"--{boundary}\r\n{head}".encode() + value + b"\r\n")
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wait_video(server, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, obj, _ = call(server, "GET", f"/v1/videos/{job_id}")
        if obj["status"] in ("completed", "failed", "cancelled"):
            return obj
        time.sleep(0.02)
    raise AssertionError(f"video job {job_id} did not finish: {obj}")


def generators(seed: int, n: int = 1):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def assert_same_video(data: bytes, out, fps: float, tmp_path) -> None:
    """`data` (the server's mp4) is what `out.save` writes. The videos here are 128 pixels wide: at widths that are
    not a multiple of 128, libx264 codes identical frames differently now and then (`encode_video`)."""
    out.save(str(tmp_path / "direct.mp4"), fps)
    assert data == (tmp_path / "direct.mp4").read_bytes()


def load(cls, folder):
    pipe = cls.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------------------------


def test_health_models_and_routing(server):
    status, health, _ = call(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny"
    status, models, _ = call(server, "GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny"
    assert set(models["data"][0]["tasks"]) == {"t2i", "t2v", "i2v", "v2v", "transfer", "action"}
    status, err, _ = call(server, "GET", "/v1/nothing")
    assert status == 404 and err["error"]["code"] == "not_found"
    status, err, _ = call(server, "POST", "/health", {})
    assert status == 405
    status, err, _ = call(server, "GET", "/v1/videos/video_unknown")
    assert status == 404 and err["error"]["param"] == "id"


def test_images_equal_the_pipeline_called_directly(server, folder):
    body = {"prompt": "a red circle", "n": 2, "size": "48x32", "seed": 5, "num_inference_steps": STEPS,
            "guidance_scale": 3.0, "response_format": "b64_json"}
    status, reply, _ = call(server, "POST", "/v1/images/generations", body)
    assert status == 200, reply
    assert [d["seed"] for d in reply["data"]] == [5, 6] and reply["size"] == "48x32"
    got = [base64.b64decode(d["b64_json"]) for d in reply["data"]]

    pipe = load(Cosmos3TextToImagePipeline, folder)
    out = pipe("a red circle", height=32, width=48, num_images_per_prompt=2, num_inference_steps=STEPS,
               guidance_scale=3.0, generator=generators(5, 2), output_type="np")
    expected = to_uint8(out.images)
    for data, image in zip(got, expected):
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), image)  # [32, 48, 3]
    # a different seed gives a different image (the comparison above can fail)
    _, other, _ = call(server, "POST", "/v1/images/generations", {**body, "n": 1, "seed": 6})
    assert base64.b64decode(other["data"][0]["b64_json"]) == got[1]
    _, other, _ = call(server, "POST", "/v1/images/generations", {**body, "n": 1, "seed": 7})
    assert base64.b64decode(other["data"][0]["b64_json"]) != got[0]


def test_video_jobs_equal_the_pipelines_called_directly(server, folder, clip_bytes, tmp_path):
    clip, frames = clip_bytes
    image = png(1)
    common = {"prompt": "a ball rolls", "size": "128x32", "num_frames": 5, "fps": 8.0,
              "num_inference_steps": STEPS, "seed": 3}
    ids = {}
    status, obj, _ = call(server, "POST", "/v1/videos", common)
    assert status == 200 and obj["object"] == "video" and obj["status"] in ("queued", "in_progress"), obj
    ids["t2v"] = obj["id"]
    status, obj, _ = call(server, "POST", "/v1/videos", {**common, "input_reference": "data:image/png;base64," +
                                                         b64(image)})
    ids["i2v"] = obj["id"]
    # Sora's form: multipart with the file, numbers as text, `seconds` (1 + 0.5 s x 8 fps = 5 frames)
    form = {k: str(v) for k, v in common.items() if k != "num_frames"}
    body, kind = multipart({**form, "seconds": "0.5", "input_video": clip})
    status, obj, _ = call(server, "POST", "/v1/videos", body, kind)
    assert status == 200, obj
    ids["v2v"] = obj["id"]
    status, obj, _ = call(server, "POST", "/v1/videos", {**common, "num_frames": None, "control": ["edge"],
                                                         "input_video": b64(clip)})
    assert status == 200, obj
    ids["transfer"] = obj["id"]
    results = {task: wait_video(server, job_id) for task, job_id in ids.items()}
    for task, obj in results.items():
        assert obj["status"] == "completed" and obj["progress"] == 100 and obj["task"] == task, obj
    assert results["t2v"]["seconds"] == "0.5" and results["transfer"]["num_frames"] == 9
    assert results["i2v"]["size"] == "128x32"

    kwargs = dict(height=32, width=128, fps=8.0, num_inference_steps=STEPS, output_type="np")
    pil = [Image.fromarray(f) for f in frames]
    from cosmos3.tokenizers.control import edge_map

    direct = {  # each call its own generator: a shared one would carry its state from call to call
        "t2v": load(Cosmos3TextToVideoPipeline, folder)("a ball rolls", num_frames=5, generator=generators(3),
                                                        **kwargs),
        "i2v": load(Cosmos3ImageToVideoPipeline, folder)(Image.open(io.BytesIO(image)).convert("RGB"),
                                                         "a ball rolls", num_frames=5, generator=generators(3),
                                                         **kwargs),
        "v2v": load(Cosmos3VideoToVideoPipeline, folder)(pil, "a ball rolls", num_frames=5, generator=generators(3),
                                                         **kwargs),
        "transfer": load(Cosmos3TransferPipeline, folder)("a ball rolls", control_videos={"edge": edge_map(frames)},
                                                          generator=generators(3), **kwargs),
    }
    thumbnails = {}
    for task, job_id in ids.items():
        status, thumbnail, kind = call(server, "GET", f"/v1/videos/{job_id}/content?variant=thumbnail")
        assert status == 200 and kind == "image/png"
        first = to_uint8(direct[task].frames[0][0])  # [32, 128, 3]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(thumbnail)).convert("RGB")), first), task
        thumbnails[task] = thumbnail
        status, data, kind = call(server, "GET", f"/v1/videos/{job_id}/content")
        assert status == 200 and kind == "video/mp4"
        assert_same_video(data, direct[task], 8.0, tmp_path)
    assert len(set(thumbnails.values())) == 4  # four different videos: each comparison above can fail
    assert call(server, "GET", f"/v1/videos/{ids['t2v']}/content?variant=spritesheet")[1]["error"]["param"] == \
        "variant"
    status, listed, _ = call(server, "GET", "/v1/videos")
    assert {o["id"] for o in listed["data"]} >= set(ids.values())
    status, gone, _ = call(server, "DELETE", f"/v1/videos/{ids['t2v']}")
    assert status == 200 and gone == {"id": ids["t2v"], "object": "video.deleted", "deleted": True}
    assert call(server, "GET", f"/v1/videos/{ids['t2v']}")[0] == 404


def test_world_action_modes_equal_the_pipeline(server, folder, clip_bytes, tmp_path):
    clip, frames = clip_bytes
    image = png(2)
    pipe = load(Cosmos3WorldActionPipeline, folder)
    common = {"embodiment": EMBODIMENT, "chunk_size": 4, "resolution_tier": 256, "num_inference_steps": STEPS,
              "fps": 10.0, "seed": 9}

    def direct(mode, **media):
        request = ActionRequest(mode=mode, chunk_size=4, domain_name=EMBODIMENT, resolution_tier=256, **media)
        return pipe("pick up the cup", request, fps=10.0, num_inference_steps=STEPS, generator=generators(9),
                    output_type="np")

    status, reply, _ = call(server, "POST", "/v1/actions", {"mode": "policy", "prompt": "pick up the cup",
                                                            "image": b64(image), **common})
    assert status == 200, reply
    expected = direct("policy", image=Image.open(io.BytesIO(image)).convert("RGB")).action[0]
    assert reply["video"] is None and reply["normalized"] is True
    assert np.array_equal(np.array(reply["actions"], dtype=np.float32), expected.float().numpy())  # [4, 10]

    status, reply, _ = call(server, "POST", "/v1/actions", {"mode": "inverse_dynamics", "prompt": "pick up the cup",
                                                            "video": b64(clip), **common})
    assert status == 200, reply
    expected = direct("inverse_dynamics", video=[Image.fromarray(f) for f in frames]).action[0]
    assert np.array_equal(np.array(reply["actions"], dtype=np.float32), expected.float().numpy())

    actions = np.linspace(-1, 1, 40).reshape(4, 10).round(3).tolist()
    status, reply, _ = call(server, "POST", "/v1/actions", {"mode": "forward_dynamics", "prompt": "pick up the cup",
                                                            "image": b64(image), "actions": actions, **common})
    assert status == 200 and reply["actions"] is None, reply
    out = direct("forward_dynamics", image=Image.open(io.BytesIO(image)).convert("RGB"),
                 actions=torch.tensor(actions, dtype=torch.float32))
    assert_same_video(base64.b64decode(reply["video"]["b64_json"]), out, 10.0, tmp_path)  # [5, H, W, 3]


def test_progress_cancellation_and_the_queue_bound(server, monkeypatch):
    pipe = server.model.pipes["t2v"]
    original, calls = pipe.guided_velocity, []
    entered, release = threading.Event(), threading.Event()

    def held(state, t):  # the worker waits inside step 2 (0-based) of the first job until the test lets it go
        calls.append(float(t))
        if len(calls) == 3:
            entered.set()
            release.wait(30)
        return original(state, t)

    monkeypatch.setattr(pipe, "guided_velocity", held)
    body = {"prompt": "slow", "size": "32x32", "num_frames": 5, "num_inference_steps": 6, "seed": 1}
    try:
        _, running, _ = call(server, "POST", "/v1/videos", body)
        assert entered.wait(30)
        _, obj, _ = call(server, "GET", f"/v1/videos/{running['id']}")
        assert obj["status"] == "in_progress" and obj["progress"] == 33  # 2 of 6 steps done
        _, queued, _ = call(server, "POST", "/v1/videos", body)
        _, third, _ = call(server, "POST", "/v1/videos", body)
        status, full, _ = call(server, "POST", "/v1/videos", body)  # max_queue=2 are waiting
        assert status == 429 and full["error"]["code"] == "queue_full"
        status, health, _ = call(server, "GET", "/health")
        assert health["queue_depth"] == 2 and health["jobs"]["in_progress"] == 1
        _, obj, _ = call(server, "POST", f"/v1/videos/{queued['id']}/cancel")
        assert obj["status"] == "cancelled"  # a queued job is cancelled at once
        assert call(server, "DELETE", f"/v1/videos/{third['id']}")[0] == 200
        _, obj, _ = call(server, "POST", f"/v1/videos/{running['id']}/cancel")
        assert obj["status"] == "cancelling"
        status, err, _ = call(server, "GET", f"/v1/videos/{running['id']}/content")
        assert status == 409 and err["error"]["code"] == "video_not_ready"
    finally:
        release.set()
    obj = wait_video(server, running["id"])
    assert obj["status"] == "cancelled" and obj["progress"] == 50  # stopped after step 3 of 6
    assert len(calls) == 3  # no step ran after the cancel, and neither of the others ran at all
    assert call(server, "GET", f"/v1/videos/{third['id']}")[0] == 404
    status, err, _ = call(server, "GET", f"/v1/videos/{running['id']}/content")
    assert status == 400 and err["error"]["code"] == "video_not_ready"


BAD_REQUESTS = [  # (path, body, status, param)
    ("/v1/images/generations", {"prompt": "x", "size": "128x48"}, 400, "size"),  # over max_pixels
    ("/v1/images/generations", {"prompt": "x", "size": "40x32"}, 400, "size"),  # not a multiple of 16
    ("/v1/images/generations", {"prompt": "x", "size": "32*32"}, 400, "size"),
    ("/v1/images/generations", {"prompt": "x", "n": 3}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "n": "2"}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "n": True}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "num_inference_steps": 61}, 400, "num_inference_steps"),
    ("/v1/images/generations", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/images/generations", {"n": 1}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": 5}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x" * 2001}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, 400, "response_format"),
    ("/v1/images/generations", {"prompt": "x", "quality": "hd"}, 400, "quality"),
    ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, 404, "model"),
    ("/v1/images/generations", [1, 2], 400, None),
    ("/v1/videos", {"prompt": "x", "num_frames": 6}, 400, "num_frames"),
    ("/v1/videos", {"prompt": "x", "num_frames": 13}, 400, "num_frames"),  # over max_frames
    ("/v1/videos", {"prompt": "x", "seconds": "0.3", "fps": 8}, 400, "seconds"),
    ("/v1/videos", {"prompt": "x", "seconds": "1", "num_frames": 9}, 400, "seconds"),
    ("/v1/videos", {"prompt": "x", "input_reference": "not base64!"}, 400, "input_reference"),
    ("/v1/videos", {"prompt": "x", "input_reference": b64(b"GIF89a garbage")}, 400, "input_reference"),
    ("/v1/videos", {"prompt": "x", "input_reference": b64(png()), "input_video": b64(b"x")}, 400, "input_video"),
    ("/v1/videos", {"prompt": "x", "control": ["depth"]}, 400, "control"),
    ("/v1/videos", {"prompt": "x", "fps": 0}, 400, "fps"),
    ("/v1/actions", {"prompt": "x", "mode": "dance"}, 400, "mode"),
    ("/v1/actions", {"prompt": "x", "embodiment": "robot"}, 400, "embodiment"),
    ("/v1/actions", {"prompt": "x", "embodiment": EMBODIMENT, "chunk_size": 33}, 400, "chunk_size"),
    ("/v1/actions", {"prompt": "x", "embodiment": EMBODIMENT}, 400, "image"),
    ("/v1/actions", {"prompt": "x", "embodiment": EMBODIMENT, "mode": "inverse_dynamics"}, 400, "video"),
    ("/v1/actions", {"prompt": "x", "embodiment": EMBODIMENT, "mode": "forward_dynamics", "image": b64(png()),
                     "actions": [[0.0] * 9]}, 400, "actions"),
    ("/v1/actions", {"prompt": "x", "embodiment": EMBODIMENT, "image": b64(png()), "resolution_tier": 100}, 400,
     "resolution_tier"),
]


def test_limits_and_bad_input_get_4xx_naming_the_field(server):
    for path, body, status, param in BAD_REQUESTS:
        got, reply, kind = call(server, "POST", path, body)
        assert kind == "application/json", (path, body)
        assert (got, reply["error"]["param"]) == (status, param), (path, body, reply)
        assert reply["error"]["message"] and set(reply["error"]) == {"message", "type", "param", "code"}
        if param is not None:
            assert f"`{param}`" in reply["error"]["message"] or repr(param) in reply["error"]["message"], reply
    status, reply, _ = call(server, "POST", "/v1/images/generations", b'{"prompt": "x", "n": ')
    assert status == 400 and reply["error"]["code"] == "invalid_json"
    assert call(server, "POST", "/v1/images/generations", b"prompt=x", "text/plain")[0] == 415
    body, kind = multipart({"prompt": "x", "n": "two"})
    status, reply, _ = call(server, "POST", "/v1/images/generations", body, kind)
    assert status == 400 and reply["error"]["param"] == "n"

    # the raw socket: no Content-Length, and a body over --max-body-bytes refused before it is read
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", "/v1/images/generations")
    connection.putheader("Content-Type", "application/json")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411 and json.loads(response.read())["error"]["code"] == "length_required"
    connection.close()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", "/v1/videos")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(LIMITS.max_body_bytes + 1))
    connection.endheaders()
    response = connection.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 413 and error["code"] == "body_too_large" and "1048576" in error["message"]
    connection.close()
    assert call(server, "GET", "/health")[0] == 200  # still serving


def test_non_loopback_hosts_are_refused_unless_allowed(folder, capsys):
    for host in ("0.0.0.0", "192.168.1.2", "::", "example.com"):
        with pytest.raises(ValueError, match="not a loopback address.*--allow-remote"):
            GenerationServer(folder, host=host, port=0)
    for host in ("127.0.0.1", "localhost", "::1"):
        check_bind(host, 0, allow_remote=False)
    check_bind("0.0.0.0", 0, allow_remote=True)
    with pytest.raises(ValueError, match="`port`"):
        check_bind("127.0.0.1", 70000, allow_remote=False)
    with pytest.raises(SystemExit) as exit_info:  # refused before the model loads
        cli.main(["serve", "--model", "/nonexistent", "--host", "0.0.0.0"])
    assert exit_info.value.code == 2 and "--allow-remote" in capsys.readouterr().err


def scrape(server) -> tuple[dict, dict]:
    """GET /metrics, parsed as Prometheus' text format (0.0.4): samples keyed by (name, labels) and each family's
    TYPE; fails on any line that is not a comment or `name{labels} value`."""
    status, raw, kind = call(server, "GET", "/metrics")
    assert status == 200 and kind.startswith("text/plain; version=0.0.4")
    text = raw.decode()
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, labels = head, frozenset()
        if "{" in head:
            name, rest = head.split("{", 1)
            assert rest.endswith("}"), line
            labels = frozenset(tuple(p.split("=", 1)) for p in rest[:-1].split(",") if p)
        assert any(name == f or name.startswith(f + "_") for f in types), f"{name} before its TYPE line"
        samples[(name, labels)] = float(value)
    try:  # the reference parser, where installed, must read it too
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        pass
    else:
        families = {f.name: f.type for f in text_string_to_metric_families(text)}
        assert families["cosmos3_serve_job_latency_seconds"] == "summary"
        assert families["cosmos3_serve_http_request_duration_seconds"] == "histogram"
    return samples, types


def test_metrics_parse_and_count(server):
    before, _ = scrape(server)
    route = frozenset({("route", '"/v1/images/generations"')})
    key = ("cosmos3_serve_http_request_duration_seconds_count", route)
    assert call(server, "POST", "/v1/images/generations", {"prompt": "x", "size": "32x32", "seed": 0,
                                                           "num_inference_steps": 1})[0] == 200
    assert call(server, "POST", "/v1/images/generations", {"prompt": "x", "n": 0})[0] == 400
    samples, types = scrape(server)
    assert samples[key] == before.get(key, 0) + 2
    bad = ("cosmos3_serve_http_responses_total", route | {("code", '"400"')})
    assert samples[bad] == before.get(bad, 0) + 1
    done = ("cosmos3_serve_jobs_finished_total", frozenset({("task", '"t2i"'), ("state", '"completed"')}))
    assert samples[done] == before.get(done, 0) + 1
    assert types["cosmos3_serve_http_request_duration_seconds"] == "histogram"
    assert types["cosmos3_serve_job_latency_seconds"] == "summary"
    assert samples[("cosmos3_serve_queue_depth", frozenset())] == 0
    states = {dict(labels)["state"] for name, labels in samples if name == "cosmos3_serve_jobs"}
    assert states == {'"queued"', '"in_progress"', '"cancelling"', '"completed"', '"failed"', '"cancelled"'}
    p50 = samples[("cosmos3_serve_job_latency_seconds", frozenset({("quantile", '"0.5"')}))]
    assert 0 < p50 < 60
    buckets = [v for (name, labels), v in samples.items()
               if name == "cosmos3_serve_http_request_duration_seconds_bucket" and ("route", route_value(route)) in
               labels]
    assert buckets == sorted(buckets) and buckets[-1] == samples[key]  # cumulative, +Inf = count


def route_value(route: frozenset) -> str:
    return dict(route)["route"]


def test_cli_parses_the_limits():
    args = cli._parser().parse_args(["serve", "--max-frames", "9", "--max-queue", "3", "--port", "0"])
    assert (args.max_frames, args.max_queue, args.host, args.allow_remote) == (9, 3, "127.0.0.1", False)
