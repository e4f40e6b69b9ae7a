"""`cosmos3 serve-policy --ray`: the policy server on Ray Serve, model replicas batched with ``@serve.batch``.

    cosmos3 serve-policy --policy FOLDER --ray --replicas 2 --max-batch 8 --port 8000   # one machine
    client = WebsocketClientPolicy("127.0.0.1", 8000)                                  # openpi, unchanged

or from Python::

    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app(FOLDER, replicas=2, max_batch=8), route_prefix="/")

Two deployments (Ray Serve's model composition):

* ``PolicyReplica`` (``replicas`` of them; ``num_gpus=1`` each where the cluster has GPUs, so one per GPU): one
  policy per replica (``Cosmos3Policy.from_pretrained(folder)``, replica ``r`` seeded ``seed + r``). Requests go
  through ``@serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000)``; a batch is split
  into groups whose observations have the same shapes (`cosmos3.robotics.batching.batch_key`), each group run as
  one ``infer_batch`` call (a group of one: ``infer``), groups in arrival order, batches one at a time. When a
  batched call raises, its requests run again one by one, so a bad observation gets its own error and the others
  their actions (as `BatchingPolicy` does). With one replica the results are those of `PolicyServer` with
  `BatchingPolicy` on the same policy and seed (tested).
* ``PolicyIngress`` (one replica, no CPU reserved; FastAPI, which Ray Serve's proxy passes WebSockets to): openpi's
  protocol on ``/`` as `PolicyServer` speaks it (metadata frame on connect, packed observation in, packed actions
  plus ``server_timing`` out, errors as text frames ``"<Type>: <message>"`` and the connection stays open; see
  `cosmos3.robotics.server`), and ``GET /healthz``. It decodes and checks each frame itself, so malformed traffic
  never reaches a replica, and routes each request (not each connection) to a replica: a client's requests may
  be served by different replicas, and the replicas' queues balance per request.

Limits, as `PolicyServer`'s options name them: ``max_message_bytes`` is checked by the ingress after the frame
arrived (Ray Serve's proxy buffers frames up to uvicorn's own 16 MiB limit before any user code runs, and closes
larger ones itself), an over-limit frame closes the connection with code 1009; ``idle_timeout_s`` closes a silent
connection (code 1000, ``"idle timeout"``); ``inference_timeout_s`` answers ``TimeoutError`` (the replica's call is
cancelled); ``max_pending`` bounds the requests queued for each replica beyond those it runs (``max_batch``), more
are answered ``ServerBusy``. A client that drops mid-request ends only its own connection; its result is dropped.

Metrics: Ray Serve's own (request counts, latencies, queue lengths, batch sizes and wait times per deployment)
through Ray's Prometheus export (``ray start --head --metrics-export-port 8080``); the ingress has no ``/metrics``.

On a Ray cluster: ``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the others, then
``RAY_ADDRESS=HEAD:6379 cosmos3 serve-policy --ray --replicas N ...`` anywhere (``ray.init()`` reads
``RAY_ADDRESS``); ``FOLDER`` must be readable at the same path on every node with a replica.

Needs the ``serve`` extra (``pip install 'cosmos3[serve]'``).
"""

# no `from __future__ import annotations`: FastAPI reads the WebSocket handler's annotations, and Ray Serve's
# ingress rebuilds the methods' signatures outside this module, where string annotations don't resolve

import argparse
import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

try:
    from fastapi import FastAPI, WebSocket
    from fastapi.responses import PlainTextResponse
    from ray import serve
    from ray.serve.exceptions import BackPressureError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"cosmos3.robotics.ray_serve needs Ray Serve: pip install 'cosmos3[serve]' ({exc})") from exc

from .batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS, batch_key
from .server import (
    _CLIENT_ERRORS,
    _MAX_ERROR_CHARS,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_INFERENCE_TIMEOUT_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_PENDING,
    HEALTH_PATH,
    PolicyServer,
    RequestError,
    _exc_message,
    packb,
)

logger = logging.getLogger(__name__)

__all__ = ["PolicyIngress", "PolicyReplica", "build_app", "run_ray_serve"]

# what a replica answers per request: (None, result) or (error type name, message)
Outcome = tuple[str | None, Any]


def _call(fn: Callable[[Any], Any], arg: Any) -> tuple[Any, BaseException | None]:
    try:
        return fn(arg), None
    except Exception as exc:
        return None, exc


def _outcome(result: Any, error: BaseException | None) -> Outcome:
    if error is None:
        return None, result
    if not isinstance(error, _CLIENT_ERRORS):
        logger.error("inference failed", exc_info=error)
    return type(error).__name__, _exc_message(error)


def run_grouped(policy: Any, observations: list[dict]) -> list[Outcome]:
    """Run `observations` (one ``@serve.batch`` batch, in arrival order) on `policy`: one ``infer_batch`` call per
    group of equal `batch_key`, groups in the order of their first request; a failed batched call is rerun one
    observation at a time. Entry ``i`` is observation ``i``'s outcome."""
    groups: dict[tuple, list[int]] = {}
    for i, obs in enumerate(observations):
        groups.setdefault(batch_key(obs), []).append(i)
    outcomes: list[Outcome] = [(None, None)] * len(observations)
    for members in groups.values():
        if len(members) > 1:
            results, error = _call(policy.infer_batch, [observations[i] for i in members])
            if error is None and isinstance(results, list | tuple) and len(results) == len(members):
                for i, result in zip(members, results):
                    outcomes[i] = (None, result)
                continue
            logger.info("a batch of %d failed (%s): running its requests one by one", len(members), error)
        for i in members:
            outcomes[i] = _outcome(*_call(policy.infer, observations[i]))
    return outcomes


@serve.deployment(name="PolicyReplica", max_ongoing_requests=2 * DEFAULT_MAX_BATCH,
                  max_queued_requests=DEFAULT_MAX_PENDING, graceful_shutdown_timeout_s=5)
class PolicyReplica:
    """One policy per replica; ``infer(obs)`` calls are batched with ``@serve.batch`` and run by `run_grouped`.

    Args:
        policy: a checkpoint folder (loaded as ``Cosmos3Policy.from_pretrained(policy, device=device,
            seed=seed + rank)``, ``rank`` the replica's) or a callable returning the policy (called once in each
            replica; it must be serializable by Ray, and have ``infer`` and ``infer_batch``).
        max_batch, max_wait_ms: the ``@serve.batch`` settings (``max_batch_size``, ``batch_wait_timeout_s``).
        device, seed, steps, cuda_graphs: for a folder, as ``cosmos3 serve-policy`` takes them.
    """

    def __init__(self, policy: str | Callable[[], Any], max_batch: int = DEFAULT_MAX_BATCH,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS, device: str | None = None, seed: int = 0,
                 steps: int | None = None, cuda_graphs: bool = False):
        if isinstance(policy, str):
            from .policy import Cosmos3Policy

            rank = serve.get_replica_context().rank
            rank = getattr(rank, "rank", rank)  # a ReplicaRank model in Ray 2.5x, an int before
            overrides = {"num_inference_steps": steps} if steps else {}
            self.policy = Cosmos3Policy.from_pretrained(policy, device=device, seed=seed + int(rank), **overrides)
            if cuda_graphs:
                self.policy.pipeline.enable_cuda_graphs()
        else:
            self.policy = policy()
        self.infer.set_max_batch_size(max_batch)
        self.infer.set_batch_wait_timeout_s(max_wait_ms / 1000.0)

    def metadata(self) -> dict:
        metadata = getattr(self.policy, "metadata", None)
        if callable(metadata):
            metadata = metadata()
        return dict(metadata or {})

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH, batch_wait_timeout_s=DEFAULT_MAX_WAIT_MS / 1000.0)
    async def infer(self, observations: list[dict]) -> list[Outcome]:
        # in a worker thread: the replica's event loop keeps queueing the next batch while this one runs
        return await asyncio.to_thread(run_grouped, self.policy, observations)


_http = FastAPI()


@serve.deployment(name="PolicyIngress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  graceful_shutdown_timeout_s=5)
@serve.ingress(_http)
class PolicyIngress:
    """openpi's WebSocket protocol in front of `PolicyReplica` (see the module docstring)."""

    def __init__(self, replica: Any, inference_timeout_s: float | None = DEFAULT_INFERENCE_TIMEOUT_S,
                 idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
                 max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES):
        self.replica = replica
        self.inference_timeout_s = inference_timeout_s if inference_timeout_s and inference_timeout_s > 0 else None
        self.idle_timeout_s = idle_timeout_s if idle_timeout_s and idle_timeout_s > 0 else None
        self.max_message_bytes = max_message_bytes if max_message_bytes and max_message_bytes > 0 else None
        self._metadata_frame: bytes | None = None

    @_http.get(HEALTH_PATH, response_class=PlainTextResponse)
    def healthz(self) -> str:
        return "OK\n"

    @_http.websocket("/")
    async def policy(self, ws: WebSocket) -> None:
        from starlette.websockets import WebSocketDisconnect

        await ws.accept()
        if self._metadata_frame is None:
            self._metadata_frame = packb(await self.replica.metadata.remote())
        prev_total_s: float | None = None
        try:
            await ws.send_bytes(self._metadata_frame)
            while True:
                try:
                    message = await asyncio.wait_for(ws.receive(), self.idle_timeout_s)
                except TimeoutError:
                    await ws.close(1000, "idle timeout")
                    return
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                if data is None:
                    data = message.get("text")
                size = len(data) if isinstance(data, bytes) else len((data or "").encode())
                if self.max_message_bytes is not None and size > self.max_message_bytes:
                    await ws.close(1009, f"message over {self.max_message_bytes} bytes")
                    return
                start = time.monotonic()
                reply = await self._serve_request(data, prev_total_s)
                if isinstance(reply, str):
                    await ws.send_text(reply)
                else:
                    await ws.send_bytes(reply)
                prev_total_s = time.monotonic() - start
        except (WebSocketDisconnect, RuntimeError, OSError):  # the client went away mid-request
            return

    async def _serve_request(self, data: Any, prev_total_s: float | None) -> bytes | str:
        timing: dict[str, float] = {}
        if prev_total_s is not None:
            timing["prev_total_ms"] = prev_total_s * 1000
        try:
            obs = PolicyServer._decode_observation(data)
            t0 = time.monotonic()
            response = self.replica.infer.remote(obs)
            try:
                error_type, value = await asyncio.wait_for(response, self.inference_timeout_s)
            except TimeoutError:
                response.cancel()
                raise RequestError(f"inference took longer than {self.inference_timeout_s} s",
                                   "TimeoutError") from None
            except BackPressureError as exc:
                raise RequestError(f"server busy: {exc}", "ServerBusy") from None
            timing["infer_ms"] = (time.monotonic() - t0) * 1000
            if error_type is not None:
                return f"{error_type}: {str(value)[:_MAX_ERROR_CHARS]}"
            if not isinstance(value, dict):
                raise RequestError(f"the policy returned {type(value).__name__}, not a dict", "TypeError")
            try:
                return packb({**value, "server_timing": timing})
            except Exception as exc:
                raise RequestError(f"can't serialize the policy's result: {exc}", "SerializationError") from exc
        except RequestError as exc:
            return f"{exc.type_name}: {str(exc)[:_MAX_ERROR_CHARS]}"
        except Exception as exc:  # a replica died, Ray lost an object, ...: this request fails, the server stays
            logger.exception("request failed")
            return f"{type(exc).__name__}: {_exc_message(exc)[:_MAX_ERROR_CHARS]}"


def build_app(
    policy: str | Callable[[], Any],
    *,
    replicas: int = 1,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    num_gpus: float | None = None,
    num_cpus: float = 1,
    max_pending: int = DEFAULT_MAX_PENDING,
    inference_timeout_s: float | None = DEFAULT_INFERENCE_TIMEOUT_S,
    idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
    max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
    device: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    cuda_graphs: bool = False,
) -> Any:
    """The Ray Serve application (ingress bound to `replicas` ``PolicyReplica``s); pass it to ``serve.run``.

    ``num_gpus`` per replica defaults to 1 when the connected Ray cluster has GPUs, else 0; ``num_cpus`` (default
    1) is what each replica reserves. The other arguments are `PolicyReplica`'s and `PolicyServer`'s.
    """
    for name, value in (("replicas", replicas), ("max_batch", max_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    if not isinstance(max_wait_ms, int | float) or not max_wait_ms >= 0:
        raise ValueError(f"`max_wait_ms` must be a number >= 0, got {max_wait_ms!r}")
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 0:
        raise ValueError(f"`max_pending` must be an int >= 0, got {max_pending!r}")
    if not (isinstance(policy, str) or callable(policy)):
        raise TypeError(f"`policy` must be a checkpoint folder or a callable returning a policy, got "
                        f"{type(policy).__name__}")
    if num_gpus is None:
        import ray

        if not ray.is_initialized():
            ray.init()
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    if num_gpus < 0 or num_cpus < 0:
        raise ValueError(f"`num_gpus` and `num_cpus` must be >= 0, got {num_gpus} and {num_cpus}")
    replica = PolicyReplica.options(
        num_replicas=replicas,
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus},
        # a batch running and the next one filling; beyond that `max_pending` wait, then ServerBusy
        max_ongoing_requests=2 * max_batch,
        max_queued_requests=max_pending,
    ).bind(policy, max_batch=max_batch, max_wait_ms=max_wait_ms, device=device, seed=seed, steps=steps,
           cuda_graphs=cuda_graphs)
    return PolicyIngress.bind(replica, inference_timeout_s=inference_timeout_s, idle_timeout_s=idle_timeout_s,
                              max_message_bytes=max_message_bytes)


def run_ray_serve(args: argparse.Namespace) -> int:
    """`cosmos3 serve-policy --ray`: connect to Ray (``RAY_ADDRESS``, else a local one), deploy, serve until
    Ctrl-C, then take the application down."""
    import ray

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not ray.is_initialized():
        ray.init()
    replicas = 1 if args.replicas is None else args.replicas
    app = build_app(
        args.policy, replicas=replicas, max_batch=args.max_batch,
        max_wait_ms=DEFAULT_MAX_WAIT_MS if args.max_wait_ms is None else args.max_wait_ms,
        num_gpus=args.gpus_per_replica, num_cpus=1 if args.cpus_per_replica is None else args.cpus_per_replica,
        max_pending=args.max_pending,
        inference_timeout_s=args.timeout, idle_timeout_s=args.idle_timeout,
        max_message_bytes=int(args.max_message_mb * 2**20), device=args.device, steps=args.steps,
        cuda_graphs=args.cuda_graphs)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="cosmos3-policy", route_prefix="/")
    logger.info("serving %s on ws://%s:%d with %d replica(s); Ctrl-C stops", args.policy, args.host, args.port,
                replicas)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete("cosmos3-policy")
    return 0
