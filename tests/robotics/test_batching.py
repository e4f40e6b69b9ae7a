"""Dynamic batching in `cosmos3 serve-policy` (`BatchingPolicy`) and the server's `/metrics` endpoint."""

from __future__ import annotations

import argparse
import math
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("msgpack")
pytest.importorskip("websockets")
client_module = pytest.importorskip("openpi_client.websocket_client_policy")

from cosmos3.robotics.batching import BatchingPolicy, batch_key  # noqa: E402
from cosmos3.robotics.policy import Cosmos3Policy  # noqa: E402
from cosmos3.robotics.server import PolicyServer, add_serve_arguments, run_serve  # noqa: E402

# The tiny policy's normalizer maps [-1, 1] onto [0, 512]: actions are on a scale of 256. Batched and single float32
# model calls round differently; 1e-4 of that scale is the tolerance.
ACTION_SCALE = 256.0
ATOL = ACTION_SCALE * 1e-4


def observation(request_id: int, prompt: str = "push the T into the target") -> dict:
    """An openpi-style observation; the state (which the model ignores) carries the request's id, so the order the
    policy saw the requests in can be read back without changing what batches with what."""
    rng = np.random.default_rng(request_id)
    return {"observation/image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
            "observation/state": np.array([request_id, 0.0], np.float32), "prompt": prompt}


def request_id(obs: dict) -> int:
    return int(obs["observation/state"][0])


class Recording:
    """Passes calls through to a policy and records, in order, the requests whose calls succeeded (a call that
    fails on a bad observation draws no seed)."""

    def __init__(self, policy):
        self.policy, self.order, self.batches = policy, [], []
        self.metadata = policy.metadata

    def infer(self, obs):
        out = self.policy.infer(obs)
        self.order.append(request_id(obs))
        return out

    def infer_batch(self, observations):
        out = self.policy.infer_batch(observations)
        self.order += [request_id(o) for o in observations]
        self.batches.append(len(observations))
        return out


@pytest.fixture(scope="module")
def policy(tiny_policy_folder):
    return Cosmos3Policy.from_pretrained(str(tiny_policy_folder), device="cpu")


def serial_replay(policy, seed: int, order: list[int], requests: dict[int, dict]) -> dict[int, np.ndarray]:
    """What each request gets when the requests run one by one in `order` from a freshly seeded policy."""
    policy.reset(seed=seed)
    return {i: policy.infer(requests[i])["actions"] for i in order}


def run_clients(port: int, per_client: list[list[dict]]) -> list[list]:
    """One openpi client per thread, each sending its observations in turn; the replies (or the exceptions)."""
    results: list[list] = [[] for _ in per_client]
    clients = [client_module.WebsocketClientPolicy(host="127.0.0.1", port=port) for _ in per_client]
    start = threading.Barrier(len(per_client))

    def drive(k: int) -> None:
        start.wait(timeout=30)
        for obs in per_client[k]:
            try:
                results[k].append(clients[k].infer(obs))
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                results[k].append(exc)

    threads = [threading.Thread(target=drive, args=(k,)) for k in range(len(per_client))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for client in clients:
        client._ws.close()
    return results


def scrape(port: int) -> tuple[dict[tuple[str, frozenset], float], str, dict[str, str]]:
    """GET /metrics, parsed as Prometheus' text format: samples keyed by (name, labels), the content type, and
    each metric family's TYPE. Fails on a line that is not a comment or `name{labels} value`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        content_type, text = response.headers["Content-Type"], response.read().decode()
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
            labels = frozenset(tuple(part.split("=", 1)) for part in rest[:-1].split(",") if part)
        family = next((f for f in types if name == f or name.startswith(f + "_")), None)
        assert family is not None, f"sample {name} before its # TYPE line"
        samples[(name, labels)] = float(value)
    return samples, content_type, types


def test_concurrent_clients_get_what_they_would_get_alone_and_batches_form(policy):
    n_clients, per_client = 6, 2
    requests = {k * per_client + j: observation(k * per_client + j, prompt=f"push the T, variant {k % 3}")
                for k in range(n_clients) for j in range(per_client)}
    recording = Recording(policy)
    # a long max_wait so batches form on a loaded CPU; a full batch goes at once
    batching = BatchingPolicy(recording, max_batch=4, max_wait_ms=200)
    policy.reset(seed=11)
    with batching, PolicyServer(batching, port=0, max_concurrency=4, max_pending=8) as server:
        replies = run_clients(server.port, [[requests[k * per_client + j] for j in range(per_client)]
                                            for k in range(n_clients)])
        samples, content_type, types = scrape(server.port)
    errors = [r for rs in replies for r in rs if isinstance(r, Exception)]
    assert not errors, errors
    assert sorted(recording.order) == sorted(requests)
    assert max(recording.batches) > 1, f"no batch formed: batch sizes {recording.batches}"
    assert sum(batching.batch_sizes().values()) == len(recording.batches) + (len(requests) - sum(recording.batches))

    expected = serial_replay(policy, 11, recording.order, requests)
    assert len({a.tobytes() for a in expected.values()}) == len(expected)  # distinct seeds: a mix-up would show
    for k, rs in enumerate(replies):
        for j, reply in enumerate(rs):
            i = k * per_client + j
            np.testing.assert_allclose(reply["actions"], expected[i], rtol=0, atol=ATOL, err_msg=f"request {i}")

    assert content_type.startswith("text/plain; version=0.0.4")
    assert types["cosmos3_policy_request_duration_seconds"] == "histogram"
    assert types["cosmos3_policy_batch_size"] == "histogram"
    assert samples[("cosmos3_policy_requests_total", frozenset({("outcome", '"ok"')}))] == len(requests)
    assert samples[("cosmos3_policy_request_duration_seconds_count", frozenset())] == len(requests)
    assert samples[("cosmos3_policy_batch_size_sum", frozenset())] == len(requests)
    assert samples[("cosmos3_policy_batch_size_count", frozenset())] == sum(batching.batch_sizes().values())
    assert samples[("cosmos3_policy_batch_size_bucket", frozenset({("le", '"1"')}))] < len(requests)
    p50 = samples[("cosmos3_policy_request_latency_seconds", frozenset({("quantile", '"0.5"')}))]
    p99 = samples[("cosmos3_policy_request_latency_seconds", frozenset({("quantile", '"0.99"')}))]
    assert 0 < p50 <= p99 < 120
    assert samples[("cosmos3_policy_batch_queue_depth", frozenset())] == 0


def test_a_malformed_request_in_a_batch_gets_its_error_and_the_others_their_actions(policy):
    requests = {i: observation(i) for i in range(3)}
    requests[1] = {**requests[1], "prompt": "   "}  # same shapes, so the same batch, but no instruction
    recording = Recording(policy)
    # max_wait far beyond the test: the batch goes when it is full, so all three are in it
    batching = BatchingPolicy(recording, max_batch=3, max_wait_ms=60_000)
    policy.reset(seed=4)
    with batching, PolicyServer(batching, port=0, max_concurrency=3) as server:
        replies = run_clients(server.port, [[requests[i]] for i in range(3)])
        samples, _, _ = scrape(server.port)
    assert batching.batch_sizes() == {3: 1}
    bad = replies[1][0]
    assert isinstance(bad, RuntimeError) and "ValueError: " in str(bad) and "instruction" in str(bad)
    # the fallback ran the batch's requests one by one, in arrival order; the bad one drew no seed
    assert sorted(recording.order) == [0, 2]
    expected = serial_replay(policy, 4, recording.order, requests)
    for i in recording.order:
        np.testing.assert_allclose(replies[i][0]["actions"], expected[i], rtol=0, atol=ATOL)
    assert samples[("cosmos3_policy_requests_total", frozenset({("outcome", '"ok"')}))] == 2
    assert samples[("cosmos3_policy_requests_total", frozenset({("outcome", '"error"')}))] == 1
    assert samples[("cosmos3_policy_errors_total", frozenset({("type", '"ValueError"')}))] == 1
    assert samples[("cosmos3_policy_batch_fallbacks_total", frozenset())] == 1


class EchoPolicy:
    """Answers each observation's state; records the batches it was called with."""

    metadata = {"policy": "echo"}

    def __init__(self, delay_s: float = 0.0):
        self.calls: list[list[float]] = []
        self.delay_s = delay_s
        self._lock = threading.Lock()

    def infer(self, obs):
        return self.infer_batch([obs])[0]

    def infer_batch(self, observations):
        time.sleep(self.delay_s)
        if any("state" not in o for o in observations):
            raise KeyError("state")
        with self._lock:
            self.calls.append([float(o["state"][0]) for o in observations])
        return [{"actions": o["state"] * 2} for o in observations]


def test_batches_group_by_shapes_not_prompts():
    assert batch_key({"image": np.zeros((4, 4, 3), np.uint8), "prompt": "a"}) == batch_key(
        {"prompt": "b", "image": np.ones((4, 4, 3), np.uint8)})
    assert batch_key({"image": np.zeros((4, 4, 3), np.uint8)}) != batch_key({"image": np.zeros((4, 5, 3), np.uint8)})
    assert batch_key({"image": np.zeros(3, np.uint8)}) != batch_key({"image": np.zeros(3, np.float32)})
    assert batch_key({"steps": 4}) != batch_key({"steps": 8})  # a per-request setting: only equal ones batch
    assert batch_key({"x": [1]}) != batch_key({"x": [1]})  # unhashable: a batch of its own

    echo = EchoPolicy()
    batching = BatchingPolicy(echo, max_batch=8, max_wait_ms=300)
    small = [{"state": np.array([float(i)]), "prompt": f"p{i}"} for i in range(3)]
    wide = [{"state": np.array([10.0 + i, 0.0]), "prompt": "p"} for i in range(2)]
    out: dict[float, np.ndarray] = {}

    def call(obs):
        out[float(obs["state"][0])] = batching.infer(obs)["actions"]

    with batching:
        threads = [threading.Thread(target=call, args=(o,)) for o in small + wide]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert sorted(map(sorted, echo.calls)) == [[0.0, 1.0, 2.0], [10.0, 11.0]]
    for obs in small + wide:
        np.testing.assert_array_equal(out[float(obs["state"][0])], obs["state"] * 2)
    with pytest.raises(RuntimeError, match="closed"):
        batching.infer(small[0])


def test_metrics_without_batching_and_a_policy_error_counted():
    with PolicyServer(EchoPolicy(), port=0) as server:
        client = client_module.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        client.infer({"state": np.ones(2)})
        with pytest.raises(RuntimeError, match="KeyError"):
            client.infer({"image": np.ones(2)})
        samples, _, types = scrape(server.port)
        client._ws.close()
    assert samples[("cosmos3_policy_requests_total", frozenset({("outcome", '"ok"')}))] == 1
    assert samples[("cosmos3_policy_errors_total", frozenset({("type", '"KeyError"')}))] == 1
    assert samples[("cosmos3_policy_connections", frozenset())] == 1
    assert samples[("cosmos3_policy_request_latency_seconds_count", frozenset())] == 2
    assert types["cosmos3_policy_request_latency_seconds"] == "summary"
    assert "cosmos3_policy_batch_size" not in types  # no batcher, no batch metrics
    with PolicyServer(EchoPolicy(), port=0) as server:  # nothing served yet: quantiles are NaN, not an error
        samples, _, _ = scrape(server.port)
    assert math.isnan(samples[("cosmos3_policy_request_latency_seconds", frozenset({("quantile", '"0.5"')}))])


def test_options_and_wiring(monkeypatch):
    with pytest.raises(TypeError, match="infer_batch"):
        BatchingPolicy(type("OnlyInfer", (), {"infer": lambda self, obs: obs})())
    with pytest.raises(ValueError, match="max_batch must be an int >= 1, got 0"):
        BatchingPolicy(EchoPolicy(), max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms must be a number >= 0, got -1"):
        BatchingPolicy(EchoPolicy(), max_wait_ms=-1)

    parser = add_serve_arguments(argparse.ArgumentParser())
    seen = {}
    monkeypatch.setattr(PolicyServer, "serve_forever",
                        lambda self: seen.update(policy=self.policy, conc=self.max_concurrency))
    args = parser.parse_args(["--policy", "ckpt", "--max-batch", "4", "--max-wait-ms", "7"])
    assert run_serve(args, lambda path, a: EchoPolicy()) == 0
    assert isinstance(seen["policy"], BatchingPolicy) and seen["conc"] == 4  # slots raised so batches can fill
    assert seen["policy"].max_batch == 4 and seen["policy"].max_wait_s == pytest.approx(0.007)
    args = parser.parse_args(["--policy", "ckpt"])
    assert run_serve(args, lambda path, a: EchoPolicy()) == 0
    assert isinstance(seen["policy"], EchoPolicy) and seen["conc"] == 1  # no batching by default
    with pytest.raises(ValueError, match="--max-wait-ms 7 needs --max-batch above 1"):
        run_serve(parser.parse_args(["--policy", "ckpt", "--max-wait-ms", "7"]), lambda path, a: EchoPolicy())
    with pytest.raises(ValueError, match="--max-batch must be >= 1, got 0"):
        run_serve(parser.parse_args(["--policy", "ckpt", "--max-batch", "0"]), lambda path, a: EchoPolicy())
