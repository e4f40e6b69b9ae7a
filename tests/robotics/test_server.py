"""`cosmos3.robotics.server`: the openpi-protocol WebSocket policy server.

The wire-compatibility tests use the real openpi-client (`pip install --no-deps openpi-client`: its metadata pins
numpy<2, which its code does not need); without it they skip, and the other tests talk through `_MiniClient`, a
copy of what `WebsocketClientPolicy` does.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

msgpack = pytest.importorskip("msgpack")
pytest.importorskip("websockets")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from cosmos3.robotics.server import PolicyServer, add_serve_arguments, packb, run_serve, unpackb  # noqa: E402

try:
    from openpi_client import msgpack_numpy as openpi_msgpack
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
except ImportError:
    openpi_msgpack = WebsocketClientPolicy = None

requires_openpi = pytest.mark.skipif(WebsocketClientPolicy is None, reason="openpi-client is not installed")
CLIENTS = [pytest.param("openpi", marks=requires_openpi), "mini"]


class _MiniClient:
    """What openpi_client.WebsocketClientPolicy does: connect, read the metadata, then send / receive packed dicts."""

    def __init__(self, host: str, port: int):
        self._ws = connect(f"ws://{host}:{port}", compression=None, max_size=None, open_timeout=5)
        self._metadata = unpackb(self._ws.recv(timeout=5))

    def get_server_metadata(self) -> dict:
        return self._metadata

    def infer(self, obs: dict) -> dict:
        self._ws.send(packb(obs))
        response = self._ws.recv(timeout=30)
        if isinstance(response, str):
            raise RuntimeError(f"Error in inference server:\n{response}")
        return unpackb(response)


def _client(server):
    """The real openpi client when installed, else the stand-in."""
    return (WebsocketClientPolicy or _MiniClient)("127.0.0.1", server.port)


H, D = 4, 3


class FakePolicy:
    """Actions = state * 2 tiled to [H, D]; records how many `infer` calls overlap."""

    def __init__(self, delay: float = 0.0, slow_delay: float = 0.0, gate: threading.Event | None = None):
        self.delay = delay
        self.gate = gate  # when given, infer blocks until it is set
        self.slow_delay = slow_delay
        self.metadata = {"embodiment": "fake", "action_horizon": H, "action_dim": D}
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.calls = 0
        self.started = threading.Event()

    def infer(self, obs: dict) -> dict:
        state = obs["state"]  # KeyError when missing
        if not isinstance(state, np.ndarray) or state.shape != (D,):
            raise ValueError(f"state must be an array of shape ({D},)")
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls += 1
        self.started.set()
        try:
            time.sleep(self.slow_delay if obs.get("slow") else self.delay)
            if self.gate is not None:
                assert self.gate.wait(10)
            out = {"actions": np.tile(state.astype(np.float32) * 2, (H, 1))}
            if "image" in obs:
                image = obs["image"]
                out["image_sum"] = np.int64(image.astype(np.int64).sum())
                out["image_dtype"] = str(image.dtype)
                out["image_shape"] = list(image.shape)
            return out
        finally:
            with self.lock:
                self.active -= 1


def _obs(value: float = 1.0) -> dict:
    rng = np.random.default_rng(0)
    return {
        "state": np.array([value, value + 1, value + 2], dtype=np.float64),
        "image": rng.integers(0, 256, size=(8, 10, 3), dtype=np.uint8),
        "prompt": "push the T",
    }


def _expected(value: float = 1.0) -> np.ndarray:
    return np.tile(np.array([value, value + 1, value + 2], dtype=np.float32) * 2, (H, 1))


@pytest.fixture
def serve():
    servers = []

    def _serve(policy, **kwargs):
        kwargs.setdefault("port", 0)
        server = PolicyServer(policy, **kwargs).start()
        servers.append(server)
        return server

    yield _serve
    for server in servers:
        server.stop()


def _raw(server):
    """A bare websocket connection (metadata frame consumed)."""
    ws = connect(f"ws://127.0.0.1:{server.port}", compression=None, max_size=None, open_timeout=5)
    unpackb(ws.recv(timeout=5))
    return ws


def _request(ws, payload, timeout: float = 10.0) -> dict | str:
    """The reply: a packed dict unpacked, or an error's text frame as it came."""
    ws.send(payload)
    reply = ws.recv(timeout=timeout)
    return reply if isinstance(reply, str) else unpackb(reply)


# ----------------------------------------------------------------------------------------------------------------------


@requires_openpi
def test_codec_matches_openpi_msgpack_numpy():
    obj = {
        "state": np.arange(6, dtype=np.float64).reshape(2, 3),
        "image": np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
        "mask": np.array([True, False]),
        "half": np.ones(3, dtype=np.float16),
        "big_endian": np.arange(3, dtype=">i4"),
        "scalar_i": np.int32(7),
        "scalar_b": np.bool_(True),
        "text": "hello",
        "nested": {"x": [1, 2.5, None], "y": np.zeros((0, 2), dtype=np.int16)},
    }
    ours = packb(obj)
    assert ours == openpi_msgpack.packb(obj)  # byte for byte
    for decoded in (unpackb(ours), unpackb(openpi_msgpack.Packer().pack(obj)), openpi_msgpack.unpackb(ours)):
        for key in ("state", "image", "mask", "half", "big_endian"):
            assert decoded[key].dtype == obj[key].dtype and decoded[key].shape == obj[key].shape
            np.testing.assert_array_equal(decoded[key], obj[key])
        assert decoded["scalar_i"] == 7 and decoded["scalar_i"].dtype == np.int32
        assert decoded["scalar_b"] is np.True_ or decoded["scalar_b"] == np.True_
        assert decoded["nested"]["y"].shape == (0, 2) and decoded["nested"]["y"].dtype == np.int16
        assert decoded["text"] == "hello"
    assert unpackb(ours)["image"].flags.writeable  # ours hands the policy writable arrays


def test_codec_packs_torch_tensors():
    torch = pytest.importorskip("torch")
    tensors = {"a": torch.arange(6, dtype=torch.int16).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    out = unpackb(packb(tensors))
    assert out["a"].dtype == np.int16 and out["a"].shape == (2, 3) and out["a"][1, 2] == 5
    assert out["b"].dtype == np.float32 and out["b"].tolist() == [1.0, 1.0]


def test_codec_refuses_bad_arrays():
    with pytest.raises(TypeError):
        packb({"x": np.array([object()])})
    with pytest.raises(TypeError):
        packb({"x": object()})
    lying = msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 3, b"dtype": "<f4", b"shape": [1000]})
    with pytest.raises(ValueError):
        unpackb(lying)
    obj_dtype = msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]})
    with pytest.raises(ValueError):
        unpackb(obj_dtype)


@pytest.mark.parametrize("client_kind", CLIENTS)
def test_roundtrip(serve, client_kind):
    policy = FakePolicy()
    server = serve(policy)
    client = (WebsocketClientPolicy if client_kind == "openpi" else _MiniClient)("127.0.0.1", server.port)
    assert client.get_server_metadata() == policy.metadata
    obs = _obs(1.5)
    for value in (1.5, -2.0):
        obs["state"] = np.array([value, value + 1, value + 2])
        out = client.infer(obs)
        assert out["actions"].dtype == np.float32 and out["actions"].shape == (H, D)
        np.testing.assert_array_equal(out["actions"], _expected(value))
    # the uint8 image arrived as uint8 with its shape and values
    assert out["image_dtype"] == "uint8" and out["image_shape"] == [8, 10, 3]
    assert out["image_sum"] == int(obs["image"].astype(np.int64).sum()) and out["image_sum"].dtype == np.int64
    assert out["server_timing"]["infer_ms"] >= 0 and "prev_total_ms" in out["server_timing"]
    client._ws.close()


def test_healthz(serve):
    server = serve(FakePolicy())
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as response:
        assert response.status == 200 and response.read() == b"OK\n"
    with pytest.raises(urllib.error.HTTPError):  # any other plain HTTP request is not a websocket upgrade
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=5)


def test_malformed_messages_get_error_replies_and_the_connection_stays(serve):
    policy = FakePolicy()
    server = serve(policy)
    with _raw(server) as ws:
        # errors are text frames, as openpi's server sends them (its client raises on a str reply)
        garbage = _request(ws, b"\xc1\xc1 definitely not msgpack")
        assert garbage.startswith("DecodeError: ") and "malformed" in garbage
        listing = _request(ws, packb([1, 2, 3]))
        assert listing.startswith("TypeError: ") and "map" in listing
        text = _request(ws, "a text frame")
        assert text.startswith("TypeError: ")
        missing = _request(ws, packb({"image": np.zeros((2, 2), np.uint8)}))
        assert missing.startswith("KeyError: ") and "state" in missing
        wrong = _request(ws, packb({"state": np.zeros(5)}))
        assert wrong.startswith("ValueError: ") and "Traceback" not in wrong
        ok = _request(ws, packb(_obs(3.0)))  # same connection still works
        np.testing.assert_array_equal(ok["actions"], _expected(3.0))
    client = _client(server)  # and new connections too
    np.testing.assert_array_equal(client.infer(_obs(0.5))["actions"], _expected(0.5))
    client._ws.close()


@pytest.mark.parametrize("client_kind", CLIENTS)
def test_errors_raise_in_openpi_client_and_the_connection_stays(serve, client_kind):
    """openpi-client's `infer` returns any packed dict as the result: an error must come as a text frame, which it
    raises, or user code fails later on a missing "actions"."""
    server = serve(FakePolicy())
    client = (WebsocketClientPolicy if client_kind == "openpi" else _MiniClient)("127.0.0.1", server.port)
    with pytest.raises(RuntimeError, match="KeyError: missing key 'state'"):
        client.infer({"nothing": np.zeros(1)})
    with pytest.raises(RuntimeError, match="ValueError: state must be an array"):
        client.infer({"state": np.zeros(5)})
    np.testing.assert_array_equal(client.infer(_obs(1.0))["actions"], _expected(1.0))
    client._ws.close()


def test_packed_error_format_answers_dicts(serve):
    """`error_format="packed"`, for clients of our own that want the error's type as data."""
    server = serve(FakePolicy(), error_format="packed")
    with _raw(server) as ws:
        missing = _request(ws, packb({"image": np.zeros((2, 2), np.uint8)}))
        timing = missing["server_timing"]
        assert missing == {"error": "missing key 'state'", "type": "KeyError", "server_timing": timing}
        assert _request(ws, b"\xc1")["type"] == "DecodeError"
        np.testing.assert_array_equal(_request(ws, packb(_obs(3.0)))["actions"], _expected(3.0))


def test_oversized_message_is_rejected(serve):
    server = serve(FakePolicy(), max_message_bytes=4096)
    with _raw(server) as ws:
        ws.send(packb({"state": np.zeros(3), "image": np.zeros((64, 64, 3), np.uint8)}))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    client = _client(server)
    np.testing.assert_array_equal(client.infer(_obs(1.0))["actions"], _expected(1.0))
    client._ws.close()


def test_client_dropping_mid_request_leaves_server_serving(serve):
    policy = FakePolicy(delay=0.3)
    server = serve(policy)
    ws = _raw(server)
    ws.send(packb(_obs(1.0)))
    ws.socket.shutdown(socket.SHUT_RDWR)  # killed client: no close frame
    ws.socket.close()
    assert policy.started.wait(5)
    client = _client(server)
    np.testing.assert_array_equal(client.infer(_obs(2.0))["actions"], _expected(2.0))
    assert policy.max_active == 1
    client._ws.close()


def _concurrent(server, n: int) -> list:
    """`n` openpi clients, connected first, then each sending one request from its own thread at the same time."""
    clients = [_client(server) for _ in range(n)]
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait(5)
        results[i] = clients[i].infer(_obs(float(i)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for client in clients:
        client._ws.close()
    return results


def test_concurrency_bound_serialises_inferences(serve):
    policy = FakePolicy(delay=0.25)
    server = serve(policy, max_concurrency=1)
    start = time.monotonic()
    results = _concurrent(server, 2)
    elapsed = time.monotonic() - start
    assert policy.max_active == 1 and policy.calls == 2
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out["actions"], _expected(float(i)))
    assert elapsed >= 0.45
    assert max(out["server_timing"]["queue_ms"] for out in results) >= 100  # one of them waited for the other


def test_concurrency_two_slots_overlap(serve):
    # Both inferences are held until both are running (or 10 s pass), so a loaded machine cannot make them miss
    # each other.
    gate = threading.Event()
    policy = FakePolicy(gate=gate)
    server = serve(policy, max_concurrency=2)

    def open_when_both_run():
        deadline = time.monotonic() + 10
        while policy.active < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()

    threading.Thread(target=open_when_both_run, daemon=True).start()
    results = _concurrent(server, 2)
    assert policy.max_active == 2 and all(out is not None and "actions" in out for out in results)


def test_busy_when_queue_is_full(serve):
    gate = threading.Event()
    policy = FakePolicy(gate=gate)
    server = serve(policy, max_concurrency=1, max_pending=0)
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(_concurrent(server, 1)[0]))
    thread.start()
    assert policy.started.wait(5)
    with _raw(server) as ws:
        busy = _request(ws, packb(_obs(1.0)))
        assert busy.startswith("ServerBusy: ")
    gate.set()
    thread.join(10)
    np.testing.assert_array_equal(first["actions"], _expected(0.0))


def test_inference_timeout_replies_error_and_keeps_the_slot(serve):
    policy = FakePolicy(slow_delay=2.0)
    server = serve(policy, max_concurrency=1, inference_timeout_s=0.2, queue_timeout_s=5.0)
    client = _client(server)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="TimeoutError: inference took longer than 0.2 s"):
        client.infer({**_obs(1.0), "slow": True})
    assert time.monotonic() - start < 1.5
    # the same connection is usable; the late call still holds the only slot, so this one waits for it
    out = client.infer(_obs(2.0))
    np.testing.assert_array_equal(out["actions"], _expected(2.0))
    assert policy.max_active == 1
    client._ws.close()


def test_idle_connections_are_closed(serve):
    server = serve(FakePolicy(), idle_timeout_s=0.2)
    with _raw(server) as ws:
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd.code == 1000 and info.value.rcvd.reason == "idle timeout"
    client = _client(server)
    np.testing.assert_array_equal(client.infer(_obs(1.0))["actions"], _expected(1.0))
    client._ws.close()


def test_policy_crash_and_bad_result_keep_serving(serve):
    class Flaky(FakePolicy):
        def infer(self, obs):
            if obs.get("crash"):
                raise RuntimeError("CUDA out of memory (pretend)")
            if obs.get("unserializable"):
                return {"actions": object()}
            return super().infer(obs)

    server = serve(Flaky())
    with _raw(server) as ws:
        assert _request(ws, packb({**_obs(), "crash": True})) == "RuntimeError: CUDA out of memory (pretend)"
        assert _request(ws, packb({**_obs(), "unserializable": True})).startswith("SerializationError: ")
        np.testing.assert_array_equal(_request(ws, packb(_obs(4.0)))["actions"], _expected(4.0))


def test_stop_is_prompt_with_inference_in_flight_and_releases_the_port():
    policy = FakePolicy(delay=2.0)
    server = PolicyServer(policy, port=0).start()
    port = server.port
    ws = _raw(server)
    ws.send(packb(_obs()))
    assert policy.started.wait(5)
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 1.5
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_metadata_from_argument_and_validation():
    class NoMeta:
        def infer(self, obs):
            return {"actions": np.zeros((1, 1))}

    assert PolicyServer(NoMeta()).metadata == {}
    assert PolicyServer(NoMeta(), metadata={"a": 1}).metadata == {"a": 1}
    assert PolicyServer(FakePolicy()).metadata["action_dim"] == D
    with pytest.raises(TypeError):
        PolicyServer(object())
    with pytest.raises(TypeError):
        PolicyServer(NoMeta(), metadata={"bad": object()})
    with pytest.raises(ValueError):
        PolicyServer(NoMeta(), max_concurrency=0)


def test_cli_helpers(monkeypatch):
    parser = add_serve_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--policy", "ckpt", "--port", "0", "--max-concurrency", "2", "--timeout", "5"])
    assert args.host == "127.0.0.1" and args.idle_timeout > 0 and args.error_format == "text"
    made, seen = [], {}

    def make_policy(path, a):
        made.append((path, a))
        return FakePolicy()

    def fake_serve_forever(self):
        seen.update(host=self.host, port=self._requested_port, conc=self.max_concurrency,
                    timeout=self.inference_timeout_s, meta=self.metadata)

    monkeypatch.setattr(PolicyServer, "serve_forever", fake_serve_forever)
    assert run_serve(args, make_policy) == 0
    assert made[0][0] == "ckpt" and made[0][1] is args
    assert seen == {"host": "127.0.0.1", "port": 0, "conc": 2, "timeout": 5.0, "meta": FakePolicy().metadata}
