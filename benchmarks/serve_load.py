"""Serving load: throughput and latency of `cosmos3 serve-policy` under 1, 4 and 16 concurrent openpi clients,
with and without dynamic batching, on loopback.

    python benchmarks/serve_load.py                                    # the shipped tiny model, CPU, K=4
    python benchmarks/serve_load.py --device cuda --requests 32 --clients 1 4 16 32 --max-batch 16

The server (`PolicyServer`, in a background thread of this process) serves `Cosmos3Policy` loaded from
`--policy` (default: the shipped model, `cosmos3.assets.default_model_folder()`). Each client is an
`openpi_client.WebsocketClientPolicy` in its own thread, sending one warm-up request and then `--requests`
requests back to back (the next once the previous reply came, as a control loop does). Both modes get the same
inference slots (`max(--max-batch, clients)`), so the only difference is whether concurrent requests share a
model call. Throughput: requests answered per second from the first timed request to the last reply. Latency:
each request's round trip seen by its client. Bounded: clients x (requests + 1) requests per row.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time

import numpy as np
import torch

from cosmos3.assets import default_model_folder
from cosmos3.robotics.batching import BatchingPolicy
from cosmos3.robotics.policy import Cosmos3Policy
from cosmos3.robotics.server import PolicyServer


def make_observation(policy: Cosmos3Policy, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    side = max(policy.config.resolution_tier, 64)
    return {"observation/image": rng.integers(0, 255, (side, side, 3), dtype=np.uint8),
            "observation/state": rng.standard_normal(8).astype(np.float32), "prompt": "put the marker in the cup"}


def run_load(policy: Cosmos3Policy, n_clients: int, n_requests: int, max_batch: int, max_wait_ms: float) -> dict:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    served = BatchingPolicy(policy, max_batch=max_batch, max_wait_ms=max_wait_ms) if max_batch > 1 else policy
    slots = max(max_batch, n_clients)
    latencies: list[list[float]] = [[] for _ in range(n_clients)]
    failures: list[str] = []
    with PolicyServer(served, port=0, max_concurrency=slots, max_pending=n_clients, inference_timeout_s=600) as server:
        clients = [WebsocketClientPolicy(host="127.0.0.1", port=server.port) for _ in range(n_clients)]
        warm, go = threading.Barrier(n_clients + 1), threading.Barrier(n_clients + 1)

        def drive(k: int) -> None:
            obs = make_observation(policy, k)
            try:
                clients[k].infer(obs)  # warm-up, not timed: lazy initialization, the first batch's shapes
            except Exception as exc:  # noqa: BLE001 - reported in the row
                failures.append(repr(exc))
            warm.wait()
            go.wait()
            for _ in range(n_requests):
                t0 = time.perf_counter()
                try:
                    clients[k].infer(obs)
                except Exception as exc:  # noqa: BLE001 - reported in the row
                    failures.append(repr(exc))
                latencies[k].append(time.perf_counter() - t0)

        threads = [threading.Thread(target=drive, args=(k,), daemon=True) for k in range(n_clients)]
        for t in threads:
            t.start()
        warm.wait()
        sizes_before = dict(served.batch_sizes()) if isinstance(served, BatchingPolicy) else {}
        go.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        for client in clients:
            client._ws.close()
    if isinstance(served, BatchingPolicy):
        sizes = {s: n - sizes_before.get(s, 0) for s, n in served.batch_sizes().items()}
        served.close()
        batches = sum(sizes.values())
        mean_batch = sum(s * n for s, n in sizes.items()) / batches if batches else float("nan")
    else:
        mean_batch = 1.0
    flat = np.asarray([x for per in latencies for x in per])
    return {"clients": n_clients, "batching": max_batch > 1, "requests": int(flat.size),
            "throughput_rps": flat.size / wall, "p50_ms": float(np.percentile(flat, 50) * 1000),
            "p99_ms": float(np.percentile(flat, 99) * 1000), "mean_batch": mean_batch, "errors": len(failures)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default=None, help="policy folder (default: the shipped model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=4, help="timed requests per client (K)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    args = parser.parse_args()
    if args.requests < 1 or min(args.clients) < 1 or args.max_batch < 2:
        parser.error(f"--requests and --clients must be >= 1 and --max-batch >= 2, got --requests {args.requests} "
                     f"--clients {args.clients} --max-batch {args.max_batch}")
    logging.getLogger("cosmos3.robotics.server").setLevel(logging.WARNING)
    folder = args.policy or default_model_folder()
    policy = Cosmos3Policy.from_pretrained(str(folder), device=args.device)
    print(f"policy {folder} on {args.device} ({torch.get_num_threads()} torch threads); "
          f"K={args.requests} requests per client; batching: --max-batch {args.max_batch} "
          f"--max-wait-ms {args.max_wait_ms:g}")
    rows = []
    for n_clients in args.clients:
        for max_batch in (1, args.max_batch):
            rows.append(run_load(policy, n_clients, args.requests, max_batch, args.max_wait_ms))
            if args.json:
                print(json.dumps(rows[-1]))
    print("| clients | batching | requests | throughput (req/s) | p50 (ms) | p99 (ms) | mean batch | errors |")
    print("|--:|:--|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['clients']} | {'on' if r['batching'] else 'off'} | {r['requests']} | {r['throughput_rps']:.2f} "
              f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.2f} | {r['errors']} |")


if __name__ == "__main__":
    main()
