"""Serving load: throughput and latency of `cosmos3 serve-policy` under 1, 4 and 16 concurrent openpi clients,
with and without dynamic batching, on loopback, while malformed traffic and dropping clients hit the server.

    python benchmarks/serve_load.py                                    # the shipped tiny model, CPU, K=4
    python benchmarks/serve_load.py --no-abuse                         # clean traffic only
    python benchmarks/serve_load.py --device cuda --requests 32 --clients 1 4 16 32 --max-batch 16

The server (`PolicyServer`, in a background thread of this process) serves `Cosmos3Policy` loaded from
`--policy` (default: the shipped model, `cosmos3.assets.default_model_folder()`). Each client is an
`openpi_client.WebsocketClientPolicy` in its own thread, sending one warm-up request and then `--requests`
requests back to back (the next once the previous reply came, as a control loop does). Both modes get the same
inference slots, so the only difference is whether concurrent requests share a model call. Throughput: the good
clients' requests answered per second from the first timed request to the last reply. Latency: each request's
round trip seen by its client. Bounded: clients x (requests + 1) requests per row, plus the abuse.

Abuse (on by default): while the clients run, bad connections bring garbage bytes, msgpack that is not a map,
a text frame, wrong observation keys, a blank instruction (same shapes as the good requests, so it joins their
batches and makes them fall back to single calls), an oversized frame (over the server's 1 MiB limit), a
half-open TCP connection (an unfinished HTTP upgrade, left open), a WebSocket that never sends, and a client that
sends a valid request and vanishes without a close frame: one of each at once from the start of the timed load,
then again every `--abuse-interval` seconds until the good clients are done. Each bad request must get its own
error (or, oversized, the 1009 close). Then the check: every good reply equals what the policy gives when the
requests it ran (the dropped clients' included) are replayed one by one in the order it ran them, from the same
seed (within 1e-4 of the action scale: batched and single float32 calls round differently); no good request got
an error; the server still answers /healthz and a new client.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import threading
import time
import urllib.request
import warnings

import numpy as np
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cosmos3.assets import default_model_folder
from cosmos3.robotics.batching import BatchingPolicy
from cosmos3.robotics.policy import Cosmos3Policy
from cosmos3.robotics.server import PolicyServer, packb, unpackb

MAX_MESSAGE_BYTES = 2**20
ACTION_TOLERANCE = 1e-4  # of the largest action magnitude in the replay


def make_observation(policy: Cosmos3Policy, request_id: int, seed: int) -> dict:
    """A good request; the state (which the model ignores) carries the request's id, so the order the policy ran
    the requests in can be read back."""
    rng = np.random.default_rng(seed)
    side = max(policy.config.resolution_tier, 64)
    state = rng.standard_normal(8).astype(np.float32)
    state[0] = request_id
    return {"observation/image": rng.integers(0, 255, (side, side, 3), dtype=np.uint8),
            "observation/state": state, "prompt": "put the marker in the cup"}


class Recording:
    """Passes calls through and records, in order, the ids of the requests whose calls succeeded."""

    def __init__(self, policy: Cosmos3Policy):
        self.policy, self.order, self.running = policy, [], 0
        self.metadata = policy.metadata
        self.idle = threading.Condition()

    def _run(self, fn, arg, ids: list[int]):
        with self.idle:
            self.running += 1
        try:
            out = fn(arg)
            with self.idle:
                self.order += ids
            return out
        finally:
            with self.idle:
                self.running -= 1
                self.idle.notify_all()

    def infer(self, obs: dict) -> dict:
        return self._run(self.policy.infer, obs, [int(obs["observation/state"][0])])

    def infer_batch(self, observations: list[dict]) -> list[dict]:
        return self._run(self.policy.infer_batch, observations, [int(o["observation/state"][0]) for o in observations])

    def wait_idle(self, timeout: float = 600) -> None:
        """Until no call runs: a dropped client's call outlives the server, and the replay must not overlap it."""
        with self.idle:
            self.idle.wait_for(lambda: self.running == 0, timeout)


class Abuser:
    """The malformed traffic and client drops, one kind after another until `stop` is set (see the docstring)."""

    def __init__(self, port: int, policy: Cosmos3Policy, interval_s: float, requests: dict[int, dict]):
        self.port, self.policy, self.interval_s, self.requests = port, policy, interval_s, requests
        self.stop = threading.Event()
        self.sent: dict[str, int] = {}
        self.unexpected: list[str] = []
        self.held: list = []  # half-open sockets and silent WebSockets, closed at the end
        self.next_drop_id = 900_000
        self.lock = threading.Lock()

    def _ws(self):
        ws = connect(f"ws://127.0.0.1:{self.port}", compression=None, max_size=None, open_timeout=30)
        unpackb(ws.recv(timeout=30))
        return ws

    def _expect_error(self, kind: str, payload, prefix: str) -> None:
        with self._ws() as ws:
            ws.send(payload)
            reply = ws.recv(timeout=600)
        if not (isinstance(reply, str) and reply.startswith(prefix)):
            self.unexpected.append(f"{kind}: {reply!r:.120}")

    def _oversized(self) -> None:
        with self._ws() as ws:
            ws.send(b"\x00" * (2 * MAX_MESSAGE_BYTES))
            try:
                ws.recv(timeout=30)
                self.unexpected.append("oversized: got a reply")
            except ConnectionClosed as exc:
                if exc.rcvd is None or exc.rcvd.code != 1009:
                    self.unexpected.append(f"oversized: closed with {exc.rcvd}")

    def _drop(self) -> None:
        with self.lock:
            rid, self.next_drop_id = self.next_drop_id, self.next_drop_id + 1
        obs = make_observation(self.policy, rid, rid)
        self.requests[rid] = obs
        ws = self._ws()
        ws.send(packb(obs))
        ws.socket.shutdown(socket.SHUT_RDWR)  # killed mid-request: no close frame
        ws.socket.close()

    def _half_open(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")  # never finished
        with self.lock:
            self.held.append(sock)

    def _silent(self) -> None:
        ws = self._ws()
        with self.lock:
            self.held.append(ws)

    def run(self) -> None:
        good = make_observation(self.policy, 0, 0)
        attacks = [
            ("garbage", lambda: self._expect_error("garbage", b"\xc1\xc1 not msgpack \x00\xff", "DecodeError: ")),
            ("not a map", lambda: self._expect_error("not a map", packb([1, 2, 3]), "TypeError: ")),
            ("text frame", lambda: self._expect_error("text frame", "hello", "TypeError: ")),
            ("wrong keys", lambda: self._expect_error(
                "wrong keys", packb({"foo": np.zeros(3), "observation/state": np.zeros(8, np.float32)}),
                "ValueError: ")),
            ("blank instruction", lambda: self._expect_error(
                "blank instruction", packb({**good, "prompt": "   "}), "ValueError: ")),
            ("oversized", self._oversized),
            ("half-open", self._half_open),
            ("silent", self._silent),
            ("drop", self._drop),
        ]
        def launch(kind: str, attack) -> None:
            try:
                attack()
                with self.lock:
                    self.sent[kind] = self.sent.get(kind, 0) + 1
            except Exception as exc:  # noqa: BLE001 - a failed attack is reported, not fatal
                self.unexpected.append(f"{kind}: {exc!r:.120}")

        # every kind at once, from the first moment of the load on, then again each interval
        rounds: list[threading.Thread] = []
        while not self.stop.is_set():
            for kind, attack in attacks:
                rounds.append(threading.Thread(target=launch, args=(kind, attack), daemon=True))
                rounds[-1].start()
            self.stop.wait(self.interval_s)
        for t in rounds:
            t.join(600)

    def close(self) -> None:
        for held in self.held:
            held.close()


def run_load(policy: Cosmos3Policy, n_clients: int, n_requests: int, max_batch: int, max_wait_ms: float,
             abuse_interval_s: float | None, seed: int = 0) -> dict:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    recording = Recording(policy)
    served = BatchingPolicy(recording, max_batch=max_batch, max_wait_ms=max_wait_ms) if max_batch > 1 else recording
    slots = max(max_batch, n_clients + 2)  # the attacker's requests hold slots too; good clients must not wait on it
    requests: dict[int, dict] = {}
    replies: dict[int, object] = {}
    latencies: list[float] = []
    policy.reset(seed=seed)
    with PolicyServer(served, port=0, max_concurrency=slots, max_pending=n_clients + 8, inference_timeout_s=600,
                      max_message_bytes=MAX_MESSAGE_BYTES) as server:
        clients = [WebsocketClientPolicy(host="127.0.0.1", port=server.port) for _ in range(n_clients)]
        warm, go = threading.Barrier(n_clients + 1), threading.Barrier(n_clients + 1)

        def drive(k: int) -> None:
            for j in range(n_requests + 1):  # request 0: warm-up (lazy initialization, the first batch's shapes)
                rid = 1000 * (k + 1) + j
                requests[rid] = make_observation(policy, rid, k)
                if j == 1:
                    warm.wait()
                    go.wait()
                t0 = time.perf_counter()
                try:
                    replies[rid] = clients[k].infer(requests[rid])
                except Exception as exc:  # noqa: BLE001 - reported in the row
                    replies[rid] = exc
                if j:
                    latencies.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=drive, args=(k,), daemon=True) for k in range(n_clients)]
        for t in threads:
            t.start()
        warm.wait()
        sizes_before = dict(served.batch_sizes()) if isinstance(served, BatchingPolicy) else {}
        abuser = Abuser(server.port, policy, abuse_interval_s, requests) if abuse_interval_s is not None else None
        abuse_thread = threading.Thread(target=abuser.run, daemon=True) if abuser else None
        go.wait()
        start = time.perf_counter()
        if abuse_thread:
            abuse_thread.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        if abuser:
            abuser.stop.set()
            abuse_thread.join()
        # the server survived: health check and a new client
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=30) as response:
            healthy = response.status == 200
        after = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        after_ok = "actions" in after.infer(make_observation(policy, 999_999, 1))
        after._ws.close()
        for client in clients:
            client._ws.close()
        if abuser:
            abuser.close()
    if isinstance(served, BatchingPolicy):
        sizes = {s: n - sizes_before.get(s, 0) for s, n in served.batch_sizes().items()}
        served.close()
        batches = sum(sizes.values())
        mean_batch = sum(s * n for s, n in sizes.items()) / batches if batches else float("nan")
    else:
        mean_batch = 1.0

    recording.wait_idle()
    # correctness: replay what the policy ran, one by one in its order, from the same seed
    errors = [f"{rid}: {r!r:.120}" for rid, r in replies.items() if not isinstance(r, dict)]
    policy.reset(seed=seed)
    expected = {rid: policy.infer(requests[rid])["actions"] for rid in recording.order if rid != 999_999}
    scale = max(float(np.abs(a).max()) for a in expected.values())
    wrong = [rid for rid, r in replies.items() if isinstance(r, dict) and (
        rid not in expected or not np.allclose(r["actions"], expected[rid], rtol=0, atol=scale * ACTION_TOLERANCE))]
    flat = np.asarray(latencies)
    return {"clients": n_clients, "batching": max_batch > 1, "abuse": abuser is not None,
            "requests": int(flat.size), "throughput_rps": flat.size / wall,
            "p50_ms": float(np.percentile(flat, 50) * 1000), "p99_ms": float(np.percentile(flat, 99) * 1000),
            "mean_batch": mean_batch, "errors": len(errors), "wrong": len(wrong),
            "missing": sum(1 for rid in requests if rid < 900_000 and rid not in replies),
            "attacks": dict(abuser.sent) if abuser else {}, "unexpected": abuser.unexpected if abuser else [],
            "survived": healthy and after_ok, "error_samples": errors[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default=None, help="policy folder (default: the shipped model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=4, help="timed requests per client (K)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--no-abuse", action="store_true", help="clean traffic only")
    parser.add_argument("--abuse-interval", type=float, default=1.0,
                        help="seconds between two rounds of bad connections, one of each kind (default 1)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    args = parser.parse_args()
    if args.requests < 1 or min(args.clients) < 1 or args.max_batch < 2 or args.abuse_interval < 0:
        parser.error(f"--requests and --clients must be >= 1, --max-batch >= 2 and --abuse-interval >= 0, got "
                     f"--requests {args.requests} --clients {args.clients} --max-batch {args.max_batch} "
                     f"--abuse-interval {args.abuse_interval}")
    warnings.filterwarnings("ignore", "connect\\(\\) must be used as a context manager", DeprecationWarning)
    logging.getLogger("cosmos3.robotics.server").setLevel(logging.ERROR)
    logging.getLogger("cosmos3.robotics.batching").setLevel(logging.WARNING)
    folder = args.policy or default_model_folder()
    policy = Cosmos3Policy.from_pretrained(str(folder), device=args.device)
    abuse = "off" if args.no_abuse else f"a round of 9 bad connections every {args.abuse_interval:g} s"
    print(f"policy {folder} on {args.device} ({torch.get_num_threads()} torch threads); "
          f"K={args.requests} requests per client; batching: --max-batch {args.max_batch} "
          f"--max-wait-ms {args.max_wait_ms:g}; abuse: {abuse}")
    rows = []
    for n_clients in args.clients:
        for max_batch in (1, args.max_batch):
            rows.append(run_load(policy, n_clients, args.requests, max_batch, args.max_wait_ms,
                                 None if args.no_abuse else args.abuse_interval))
            if args.json:
                print(json.dumps(rows[-1]))
    print("| clients | batching | requests | throughput (req/s) | p50 (ms) | p99 (ms) | mean batch | good-client "
          "errors / wrong / missing | bad connections (unexpected answers) | server up after |")
    print("|--:|:--|--:|--:|--:|--:|--:|--:|--:|:--|")
    for r in rows:
        print(f"| {r['clients']} | {'on' if r['batching'] else 'off'} | {r['requests']} | {r['throughput_rps']:.2f} "
              f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.2f} "
              f"| {r['errors']} / {r['wrong']} / {r['missing']} | {sum(r['attacks'].values())} "
              f"({len(r['unexpected'])}) | {'yes' if r['survived'] else 'NO'} |")
    for r in rows:
        if r["unexpected"] or r["error_samples"]:
            print(f"clients {r['clients']}, batching {r['batching']}: unexpected {r['unexpected'][:3]}, "
                  f"good-client errors {r['error_samples']}")
    if rows and rows[-1]["attacks"]:
        print("bad connections in the last row, by kind:", json.dumps(rows[-1]["attacks"]))


if __name__ == "__main__":
    main()
