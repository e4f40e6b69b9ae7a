"""`cosmos3.robotics.ray_serve`: the policy on Ray Serve answers as `PolicyServer` does, on a local CPU Ray.

One local Ray and one Serve HTTP proxy for the module (`ray.init(num_cpus=2)`); each test deploys its own
application (`serve.run` replaces the previous one), so each starts from a freshly seeded policy.
"""

from __future__ import annotations

import socket
import sys
import threading
import urllib.request

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (the `serve` extra)")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (the `serve` extra)")
pytest.importorskip("fastapi", reason="ray[serve] is not installed (the `serve` extra)")
client_module = pytest.importorskip("openpi_client.websocket_client_policy")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from cosmos3.robotics.batching import BatchingPolicy  # noqa: E402
from cosmos3.robotics.policy import Cosmos3Policy  # noqa: E402
from cosmos3.robotics.ray_serve import build_app, run_grouped  # noqa: E402
from cosmos3.robotics.server import PolicyServer, packb, unpackb  # noqa: E402

# as in test_batching: batched and single float32 model calls round differently, on an action scale of 256
ATOL = 256.0 * 1e-4


def observation(request_id: int, prompt: str = "push the T into the target") -> dict:
    rng = np.random.default_rng(request_id)
    return {"observation/image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
            "observation/state": np.array([request_id, 0.0], np.float32), "prompt": prompt}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_port():
    # the replicas build their policies from this module's classes: ship them by value, not by an import path
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def deploy(app) -> None:
    serve.run(app, name="policy", route_prefix="/")


def raw(port: int):
    ws = connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None, open_timeout=10)
    unpackb(ws.recv(timeout=10))
    return ws


def exchange(ws, payload, timeout: float = 60.0):
    ws.send(payload)
    reply = ws.recv(timeout=timeout)
    return reply if isinstance(reply, str) else unpackb(reply)


# the same requests, good and bad, in one connection's order: what both servers must answer alike
def session_payloads() -> list:
    return [
        packb(observation(0)),
        b"\xc1\xc1 not msgpack",                                        # DecodeError
        "a text frame",                                                 # TypeError
        packb([1, 2, 3]),                                               # TypeError: not a map
        packb({"observation/state": np.zeros(2, np.float32)}),          # the policy's ValueError: no instruction
        packb({**observation(1), "prompt": "   "}),                     # ValueError: blank instruction
        packb(observation(2, prompt="push the T to the left")),
        packb(observation(3)),
    ]


def test_same_requests_same_replies_as_policy_server(ray_port, tiny_policy_folder):
    folder = str(tiny_policy_folder)
    plain = Cosmos3Policy.from_pretrained(folder, device="cpu", seed=0)
    with PolicyServer(plain, port=0) as server, raw(server.port) as ws:
        expected = [exchange(ws, p) for p in session_payloads()]

    deploy(build_app(folder, replicas=1, max_batch=4, max_wait_ms=1, num_gpus=0, device="cpu", seed=0))
    with urllib.request.urlopen(f"http://127.0.0.1:{ray_port}/healthz", timeout=10) as response:
        assert response.status == 200 and response.read() == b"OK\n"
    client = client_module.WebsocketClientPolicy(host="127.0.0.1", port=ray_port)
    assert client.get_server_metadata() == plain.metadata
    client._ws.close()
    with raw(ray_port) as ws:
        got = [exchange(ws, p) for p in session_payloads()]

    for i, (want, have) in enumerate(zip(expected, got)):
        if isinstance(want, str):
            assert have == want, f"request {i}"
        else:
            assert isinstance(have, dict), f"request {i}: {have!r}"
            # one request at a time: a batch of one, the same `infer` call as the plain server's
            np.testing.assert_array_equal(have["actions"], want["actions"], err_msg=f"request {i}")
            assert set(have["server_timing"]) <= {"infer_ms", "prev_total_ms", "queue_ms"}
    assert sum(isinstance(r, dict) for r in got) == 3


def test_concurrent_clients_batch_and_get_what_they_would_get_alone(ray_port, tiny_policy_folder):
    folder = str(tiny_policy_folder)

    def make_policy():
        # defined here so Ray ships it by value to the replica: each result says where it ran in the serial order
        from cosmos3.robotics.policy import Cosmos3Policy

        class Numbered:
            def __init__(self):
                self.policy = Cosmos3Policy.from_pretrained(folder, device="cpu", seed=5)
                self.metadata = self.policy.metadata
                self.count = 0
                self.batches = []

            def _number(self, results):
                for result in results:
                    result["order"], result["batch"] = self.count, len(results)
                    self.count += 1
                return results

            def infer(self, obs):
                return self._number([self.policy.infer(obs)])[0]

            def infer_batch(self, observations):
                return self._number(self.policy.infer_batch(observations))

        return Numbered()

    # a long wait so that the batch forms on a loaded CPU; a full batch goes at once
    deploy(build_app(make_policy, replicas=1, max_batch=4, max_wait_ms=2000, num_gpus=0))
    requests = {i: observation(10 + i, prompt=f"push the T, variant {i % 2}") for i in range(4)}
    clients = [client_module.WebsocketClientPolicy(host="127.0.0.1", port=ray_port) for _ in requests]
    replies: dict[int, object] = {}
    barrier = threading.Barrier(len(clients))

    def drive(i: int) -> None:
        barrier.wait(30)
        try:
            replies[i] = clients[i].infer(requests[i])
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            replies[i] = exc

    threads = [threading.Thread(target=drive, args=(i,)) for i in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for client in clients:
        client._ws.close()
    assert all(isinstance(r, dict) for r in replies.values()), replies
    assert max(int(r["batch"]) for r in replies.values()) > 1, "no batch formed"
    order = sorted(requests, key=lambda i: int(replies[i]["order"]))
    assert [int(replies[i]["order"]) for i in order] == list(range(len(requests)))
    replay = Cosmos3Policy.from_pretrained(folder, device="cpu", seed=5)
    expected = {i: replay.infer(requests[i])["actions"] for i in order}
    assert len({a.tobytes() for a in expected.values()}) == len(expected)  # distinct seeds: a mix-up would show
    for i in requests:
        np.testing.assert_allclose(replies[i]["actions"], expected[i], rtol=0, atol=ATOL, err_msg=f"request {i}")


class Echo:
    """actions = 2 * state; `infer_batch` fails the whole batch when one observation has no state."""

    metadata = {"policy": "echo"}

    def infer(self, obs):
        return {"actions": np.asarray(obs["state"]) * 2}

    def infer_batch(self, observations):
        return [{"actions": np.asarray(o["state"]) * 2} for o in observations]


def test_run_grouped_splits_by_shape_and_isolates_a_bad_observation():
    calls = []

    class Recorder(Echo):
        def infer(self, obs):
            calls.append(("infer", float(obs["state"][0]) if "state" in obs else None))
            return super().infer(obs)

        def infer_batch(self, observations):
            calls.append(("batch", [float(o["state"][0]) for o in observations if "state" in o]))
            return super().infer_batch(observations)

    small = [{"state": np.array([float(i)])} for i in range(2)]
    wide = {"state": np.array([5.0, 0.0])}
    bad = {"state": np.array([7.0]), "extra": 1}
    outcomes = run_grouped(Recorder(), [small[0], wide, small[1], bad])
    assert calls == [("batch", [0.0, 1.0]), ("infer", 5.0), ("infer", 7.0)]
    assert [o[0] for o in outcomes] == [None] * 4
    np.testing.assert_array_equal(outcomes[1][1]["actions"], [10.0, 0.0])

    calls.clear()
    outcomes = run_grouped(Recorder(), [small[0], {"image": np.zeros(1)}, small[1]])
    assert outcomes[1] == ("KeyError", "missing key 'state'")  # other keys: a group of its own, failing alone
    assert calls == [("batch", [0.0, 1.0]), ("infer", None)] and outcomes[2][0] is None
    same_shape_bad = {"state": np.array([3.0]), "prompt": "x"}
    calls.clear()
    outcomes = run_grouped(type("Strict", (Recorder,), {"infer_batch": lambda self, obs: 1 / 0})(),
                           [{**small[0], "prompt": "a"}, same_shape_bad])
    assert calls == [("infer", 0.0), ("infer", 3.0)]  # the failed batch reran one by one
    assert [o[0] for o in outcomes] == [None, None]


def test_malformed_traffic_and_drops_leave_other_clients_served(ray_port):
    deploy(build_app(Echo, replicas=1, max_batch=4, max_wait_ms=5, num_gpus=0, max_message_bytes=4096,
                     idle_timeout_s=30))
    good = client_module.WebsocketClientPolicy(host="127.0.0.1", port=ray_port)
    np.testing.assert_array_equal(good.infer({"state": np.array([1.0])})["actions"], [2.0])
    with raw(ray_port) as ws:
        assert exchange(ws, b"\xc1 garbage").startswith("DecodeError: ")
        assert exchange(ws, packb({"image": np.zeros(2)})) == "KeyError: missing key 'state'"
        np.testing.assert_array_equal(exchange(ws, packb({"state": np.array([4.0])}))["actions"], [8.0])
        ws.send(packb({"state": np.zeros(4096)}))  # 32 kB: over the limit
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=30)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    dropped = raw(ray_port)  # sends a request and vanishes without a close frame
    dropped.send(packb({"state": np.array([9.0])}))
    dropped.socket.shutdown(socket.SHUT_RDWR)
    dropped.socket.close()
    half_open = socket.create_connection(("127.0.0.1", ray_port), timeout=5)  # never finishes the handshake
    half_open.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    for value in (2.0, 3.0):  # the first client, on its same connection, is unaffected
        np.testing.assert_array_equal(good.infer({"state": np.array([value])})["actions"], [value * 2])
    half_open.close()
    good._ws.close()


def test_build_app_validates_its_arguments():
    with pytest.raises(ValueError, match="`replicas` must be an int >= 1, got 0"):
        build_app("folder", replicas=0, num_gpus=0)
    with pytest.raises(ValueError, match="`max_batch` must be an int >= 1, got 1.5"):
        build_app("folder", max_batch=1.5, num_gpus=0)
    with pytest.raises(ValueError, match="`max_wait_ms` must be a number >= 0, got -1"):
        build_app("folder", max_wait_ms=-1, num_gpus=0)
    with pytest.raises(TypeError, match="checkpoint folder or a callable"):
        build_app(3, num_gpus=0)


def test_batching_policy_and_ray_agree_on_the_grouping_rule():
    """`run_grouped` (Ray) and `BatchingPolicy` (the plain server) batch the same observations together."""
    seen = []

    class Spy(Echo):
        def infer_batch(self, observations):
            seen.append(sorted(float(o["state"][0]) for o in observations))
            return super().infer_batch(observations)

    observations = [{"state": np.array([float(i)]), "prompt": f"p{i}"} for i in range(3)]
    observations.append({"state": np.array([9.0, 9.0]), "prompt": "p"})
    run_grouped(Spy(), observations)
    ray_groups = list(seen)
    seen.clear()
    batching = BatchingPolicy(Spy(), max_batch=8, max_wait_ms=500)
    threads = [threading.Thread(target=batching.infer, args=(o,)) for o in observations]
    with batching:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert sorted(ray_groups) == sorted(seen) == [[0.0, 1.0, 2.0]]


def test_cli_wiring(monkeypatch, capsys, tiny_policy_folder):
    from cosmos3 import cli
    from cosmos3.robotics import ray_serve

    seen = {}
    monkeypatch.setattr(ray_serve, "build_app", lambda policy, **kw: seen.update(policy=policy, **kw) or "app")
    monkeypatch.setattr(ray_serve.serve, "start", lambda http_options: seen.update(http=http_options))
    monkeypatch.setattr(ray_serve.serve, "run", lambda app, name, route_prefix: seen.update(
        app=app, route=route_prefix))
    monkeypatch.setattr(ray_serve.serve, "delete", lambda name: seen.update(deleted=name))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # no Ray needed: nothing is deployed

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_serve.time, "sleep", interrupt)
    folder = str(tiny_policy_folder)
    monkeypatch.setattr("sys.argv", ["cosmos3", "serve-policy", "--policy", folder, "--ray", "--replicas", "3",
                                     "--max-batch", "4", "--port", "9100", "--gpus-per-replica", "0"])
    cli.main()
    assert seen["policy"] == folder and seen["replicas"] == 3 and seen["max_batch"] == 4 and seen["num_gpus"] == 0
    assert seen["num_cpus"] == 1 and seen["max_wait_ms"] == 5.0
    assert seen["http"] == {"host": "127.0.0.1", "port": 9100} and seen["route"] == "/" and seen["app"] == "app"
    assert seen["deleted"] == "cosmos3-policy"
    monkeypatch.setattr("sys.argv", ["cosmos3", "serve-policy", "--policy", folder, "--replicas", "2"])
    with pytest.raises(SystemExit):
        cli.main()
    assert "--replicas needs --ray" in capsys.readouterr().err
