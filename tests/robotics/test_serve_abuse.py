"""The policy server under good and bad traffic at once: malformed frames, wrong observations, oversized frames,
half-open connections and clients dropping mid-request, while openpi clients are being served (with dynamic
batching). test_server.py checks each bad input alone on an idle server; here no good client may notice them.
benchmarks/serve_load.py does the same on the shipped model under 1 / 4 / 16 clients."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("msgpack")
pytest.importorskip("websockets")
client_module = pytest.importorskip("openpi_client.websocket_client_policy")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from cosmos3.robotics.batching import BatchingPolicy  # noqa: E402
from cosmos3.robotics.server import PolicyServer, packb, unpackb  # noqa: E402


class SlowEcho:
    """actions = state * 2, tiled to [4, D]; `infer_batch` takes 30 ms per call so requests overlap and batch."""

    metadata = {"policy": "echo"}

    def __init__(self):
        self.batches: list[int] = []

    def _check(self, obs):
        if not isinstance(obs.get("prompt"), str) or not obs["prompt"].strip():
            raise ValueError("the observation needs a non-empty `prompt`")
        return np.tile(np.asarray(obs["state"], np.float32) * 2, (4, 1))  # KeyError without a state

    def infer(self, obs):
        return self.infer_batch([obs])[0]

    def infer_batch(self, observations):
        actions = [self._check(o) for o in observations]  # one bad observation fails the whole call
        time.sleep(0.03)
        self.batches.append(len(observations))
        return [{"actions": a} for a in actions]


def good_obs(client: int, step: int) -> dict:
    return {"state": np.array([client, step, 1.0], np.float32), "image": np.zeros((8, 8, 3), np.uint8),
            "prompt": f"client {client}"}


def test_bad_traffic_and_drops_during_load_leave_good_clients_untouched():
    policy = SlowEcho()
    batching = BatchingPolicy(policy, max_batch=4, max_wait_ms=10)
    n_clients, n_steps = 3, 6
    with batching, PolicyServer(batching, port=0, max_concurrency=8, max_pending=16,
                                max_message_bytes=4096) as server:
        url = f"ws://127.0.0.1:{server.port}"
        replies: dict[tuple[int, int], object] = {}
        bad_answers: dict[str, object] = {}
        held: list = []
        go = threading.Barrier(n_clients + 1)

        def good(k: int) -> None:
            client = client_module.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
            go.wait(30)
            for j in range(n_steps):
                try:
                    replies[k, j] = client.infer(good_obs(k, j))
                except Exception as exc:  # noqa: BLE001 - the test looks at it
                    replies[k, j] = exc
            client._ws.close()

        def ws():
            conn = connect(url, compression=None, max_size=None, open_timeout=10)
            unpackb(conn.recv(timeout=10))
            return conn

        def ask(name: str, payload) -> None:
            with ws() as conn:
                conn.send(payload)
                bad_answers[name] = conn.recv(timeout=30)

        def oversized() -> None:
            with ws() as conn:
                conn.send(packb({"state": np.zeros(3), "image": np.zeros((64, 64, 3), np.uint8), "prompt": "x"}))
                try:
                    conn.recv(timeout=30)
                    bad_answers["oversized"] = "a reply"
                except ConnectionClosed as exc:
                    bad_answers["oversized"] = exc.rcvd.code if exc.rcvd else None

        def drop() -> None:
            conn = ws()
            conn.send(packb(good_obs(99, 0)))
            conn.socket.shutdown(socket.SHUT_RDWR)  # killed mid-request: no close frame
            conn.socket.close()
            bad_answers["drop"] = "sent"

        def half_open() -> None:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")  # never finished
            held.append(sock)
            held.append(ws())  # and a WebSocket that never sends
            bad_answers["half-open"] = "held"

        bad = [
            lambda: ask("garbage", b"\xc1\xc1 not msgpack"),
            lambda: ask("not a map", packb([1, 2])),
            lambda: ask("text", "hello"),
            lambda: ask("no state", packb({"image": np.zeros((8, 8, 3), np.uint8), "prompt": "x"})),
            # same shapes as the good requests: it joins their batch, which then falls back to single calls
            lambda: ask("blank prompt", packb({**good_obs(98, 0), "prompt": " "})),
            oversized, drop, half_open,
        ]
        threads = [threading.Thread(target=good, args=(k,)) for k in range(n_clients)]
        for t in threads:
            t.start()
        go.wait(30)
        attackers = [threading.Thread(target=b) for b in bad * 2]  # each kind twice, all during the load
        for t in attackers:
            t.start()
            time.sleep(0.01)
        for t in threads + attackers:
            t.join(60)

        # no good client noticed: every reply is its own, none failed or went missing
        assert len(replies) == n_clients * n_steps
        for (k, j), reply in replies.items():
            assert isinstance(reply, dict), f"client {k} step {j}: {reply!r}"
            np.testing.assert_array_equal(reply["actions"], np.tile(np.array([k, j, 1.0], np.float32) * 2, (4, 1)))
        # each bad request got its own answer
        assert bad_answers["garbage"].startswith("DecodeError: ")
        assert bad_answers["not a map"].startswith("TypeError: ") and bad_answers["text"].startswith("TypeError: ")
        assert bad_answers["no state"] == "KeyError: missing key 'state'"
        assert bad_answers["blank prompt"].startswith("ValueError: ")
        assert bad_answers["oversized"] == 1009
        assert max(policy.batches) > 1, f"no batch formed: {policy.batches}"
        # and the server is still up for everyone
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as response:
            assert response.status == 200
        after = client_module.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        np.testing.assert_array_equal(after.infer(good_obs(7, 7))["actions"][0], [14.0, 14.0, 2.0])
        after._ws.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert 'cosmos3_policy_errors_total{type="DecodeError"} 2' in metrics
        assert 'cosmos3_policy_requests_total{outcome="ok"}' in metrics
        for item in held:
            item.close()
