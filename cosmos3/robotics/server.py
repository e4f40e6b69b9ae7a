"""`cosmos3 serve-policy`: serve a policy over WebSocket, speaking openpi's wire protocol.

Any object with ``infer(obs: dict) -> dict`` (openpi's ``BasePolicy`` interface) and an optional ``metadata``
dict can be served; openpi-client's ``WebsocketClientPolicy(host, port)`` talks to it unchanged::

    with PolicyServer(policy, port=0) as server:          # port 0: a free port, read back from server.port
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        actions = client.infer({"state": state, "image": image})["actions"]   # [H, D]

Protocol (the same as openpi's ``WebsocketPolicyServer`` / ``WebsocketClientPolicy``):

* the client opens a WebSocket on ``ws://host:port`` (any path but ``/healthz``); the server first sends the policy
  metadata as one binary frame, a msgpack-numpy packed dict;
* then, per request, the client sends one binary frame, a packed observation dict, and the server replies with one
  binary frame, the packed action dict (``{"actions": ndarray [H, D], ...}``) plus ``"server_timing"``:
  ``{"infer_ms", "queue_ms", "prev_total_ms"}`` (``prev_total_ms``, from the second request on, is the previous
  request's receive-to-sent time, as openpi computes it);
* ``GET /healthz`` answers ``200 OK`` (a plain HTTP request, no WebSocket upgrade).
* ``GET /metrics`` answers the server's metrics in Prometheus' text format (version 0.0.4): request latency
  (a histogram, and p50 / p90 / p99 over the last 1024 requests), queue wait, requests served and errors by type,
  open connections, running and waiting inferences; with dynamic batching (``--max-batch``) also batch sizes
  and the batcher's queue depth (any policy with a ``prometheus_metrics()`` method adds its own lines).

msgpack-numpy: arrays pack as maps ``{b"__ndarray__": True, b"data": bytes, b"dtype": dtype.str, b"shape": [...]}``,
numpy scalars as ``{b"__npgeneric__": True, b"data": item, b"dtype": dtype.str}`` (openpi_client.msgpack_numpy's
format, byte for byte); object / void / complex dtypes are refused. Decoded arrays are writable copies.

Errors (the same contract as openpi's server: a reply that is a text frame is an error, and openpi-client's
``WebsocketClientPolicy.infer`` raises it as a ``RuntimeError`` whose message ends with the frame's text, so a
rejected observation fails at the ``infer`` call, not later on a missing ``"actions"``):

* An error is answered with one text frame ``"<type>: <message>"``. ``type`` is the exception class name for
  errors raised by the policy (``ValueError``, ``KeyError``, ...), ``DecodeError`` for a frame that is not
  msgpack-numpy, ``TypeError`` for a text frame or a message that is not a map, ``TimeoutError`` for an inference
  slower than ``inference_timeout_s``, ``ServerBusy`` when the wait queue is full or a request waited longer than
  ``queue_timeout_s`` for a slot, ``SerializationError`` when the policy's result can't be packed. The traceback
  goes to the server log, not to the client.
* Where this server differs from openpi's (which sends the traceback and then closes the connection with code
  1011): the connection stays open and the server stays up, so a client may catch the error and send the next
  observation on the same connection.
* ``error_format="packed"`` (``--error-format packed``) answers errors as binary frames instead, packed dicts
  ``{"error": message, "type": name, "server_timing": {...}}``, for clients of our own that want the type as data.
  openpi-client returns those from ``infer`` as if they were results: don't use it with openpi clients.

Beyond openpi's server (which serves one request at a time, without limits):

* Concurrency: at most ``max_concurrency`` ``policy.infer`` calls run at once, each in a worker thread, so the event
  loop keeps serving health checks, handshakes and other connections. Each connection handles its requests in
  order. A request that finds every slot taken waits (FIFO) for at most ``queue_timeout_s``; at most
  ``max_pending`` requests wait at once, one more is answered ``ServerBusy`` at once. With ``max_concurrency``
  above 1 the policy's ``infer`` must be thread-safe: ``Cosmos3Policy``'s is, its model calls take turns on one
  pipeline (so extra slots overlap only decoding, encoding and queueing, not the model).
* Timeouts: an inference running longer than ``inference_timeout_s`` is answered ``TimeoutError`` and the
  connection stays usable. A Python thread can't be killed, so the late call keeps its slot until it returns
  (the bound on concurrent inferences holds, e.g. for GPU memory); its result is dropped. A connection that sends
  nothing for ``idle_timeout_s`` is closed (code 1000, reason ``"idle timeout"``); the time a request takes to run
  does not count as idle.
* Messages larger than ``max_message_bytes`` are refused by the WebSocket layer before they are buffered: the
  connection is closed with code 1009 (message too big); the server keeps serving.
* A client that drops mid-request only ends its own connection; its inference finishes (holding its slot) and the
  result is discarded.

Dynamic batching (``--max-batch N``, `cosmos3.robotics.batching.BatchingPolicy`): concurrent requests whose
observations have the same shapes wait up to ``--max-wait-ms`` for each other and run as one batched model call;
each gets what it would have got alone (see that module for the order and the error handling).

The worker threads are fresh daemon threads per request: thread-local state such as torch's grad mode is the
default in each call, so a policy sets ``torch.inference_mode()`` inside ``infer``.

The server binds 127.0.0.1 by default and has no authentication: bind another address only on a trusted network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import itertools
import logging
import math
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import msgpack
import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "PolicyServer",
    "add_serve_arguments",
    "packb",
    "run_serve",
    "unpackb",
]

DEFAULT_PORT = 8000
DEFAULT_INFERENCE_TIMEOUT_S = 120.0
DEFAULT_IDLE_TIMEOUT_S = 600.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
DEFAULT_MAX_PENDING = 8
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
METRICS_PREFIX = "cosmos3_policy"
# seconds; a chunk takes milliseconds on a GPU and up to minutes on a CPU
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_WINDOW = 1024  # requests the latency quantiles are computed over
LATENCY_QUANTILES = (0.5, 0.9, 0.99)
_MAX_ERROR_CHARS = 2000
_REFUSED_KINDS = ("V", "O", "c")  # void/structured, object, complex: as openpi_client.msgpack_numpy refuses


# ----------------------------------------------------------------------------------------------------------------------
# msgpack with numpy arrays, wire-compatible with openpi_client.msgpack_numpy
# ----------------------------------------------------------------------------------------------------------------------


def _encode(obj: Any) -> Any:
    if hasattr(obj, "detach") and hasattr(obj, "cpu") and hasattr(obj, "numpy"):  # a torch tensor
        obj = obj.detach().cpu()
        if str(obj.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            obj = obj.float()
        obj = obj.numpy()
    if isinstance(obj, np.ndarray | np.generic) and obj.dtype.kind in _REFUSED_KINDS:
        raise TypeError(f"unsupported dtype: {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"can't serialize an object of type {type(obj).__name__}")


def _decode_dtype(value: Any) -> np.dtype:
    if not isinstance(value, str | bytes):
        raise ValueError(f"bad dtype field: {value!r}")
    dtype = np.dtype(value)
    if dtype.kind in _REFUSED_KINDS:
        raise ValueError(f"unsupported dtype: {dtype}")
    return dtype


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = _decode_dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if not isinstance(shape, list | tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"bad shape field: {shape!r}")
        if not isinstance(data, bytes):
            raise ValueError("bad data field: expected bytes")
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"array data has {len(data)} bytes, shape {tuple(shape)} of {dtype} needs "
                             f"{math.prod(shape) * dtype.itemsize}")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if b"__npgeneric__" in obj:
        return _decode_dtype(obj.get(b"dtype")).type(obj.get(b"data"))
    return obj


def packb(obj: Any) -> bytes:
    """Pack `obj` (dicts, lists, scalars, str, bytes, numpy arrays / scalars, torch tensors) in openpi's format."""
    return msgpack.packb(obj, default=_encode)


def unpackb(data: bytes) -> Any:
    """Unpack what `packb` or openpi_client.msgpack_numpy packed; arrays come back as writable numpy arrays."""
    return msgpack.unpackb(data, object_hook=_decode)


# ----------------------------------------------------------------------------------------------------------------------
# the server
# ----------------------------------------------------------------------------------------------------------------------


class RequestError(Exception):
    """An error answered to the client as ``"<type_name>: <message>"`` (or, packed, ``{"error", "type"}``)."""

    def __init__(self, message: str, type_name: str):
        super().__init__(message)
        self.type_name = type_name


class _ConnectionGone(Exception):
    pass


_CLIENT_ERRORS = (ValueError, TypeError, KeyError, IndexError)  # the policy rejecting an observation: no traceback


def _resolve_metadata(policy: Any, metadata: Mapping | None) -> dict:
    if metadata is None:
        metadata = getattr(policy, "metadata", None)
        if callable(metadata):
            metadata = metadata()
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"policy metadata must be a dict, got {type(metadata).__name__}")
    return dict(metadata)


class _Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{bound:g}"}} {n}' for bound, n in zip(self.bounds, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                f"{name}_count {self.count}"]
        return out


class _Metrics:
    """What `GET /metrics` reports. Updated and read on the server's event loop only, so it needs no lock."""

    def __init__(self):
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.queue_wait = _Histogram(LATENCY_BUCKETS)
        self.recent: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.outcomes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.connections = 0

    def observe_request(self, seconds: float, ok: bool) -> None:
        self.latency.observe(seconds)
        self.recent.append(seconds)
        self.outcomes["ok" if ok else "error"] += 1

    def render(self, running: int, waiting: int, max_concurrency: int) -> str:
        p = METRICS_PREFIX
        lines = self.latency.lines(f"{p}_request_duration_seconds",
                                   "Seconds from receiving a request to sending its reply.")
        lines += [f"# HELP {p}_request_latency_seconds Request latency quantiles over the last {LATENCY_WINDOW} "
                  "requests.", f"# TYPE {p}_request_latency_seconds summary"]
        recent = np.asarray(self.recent, dtype=np.float64)
        for q in LATENCY_QUANTILES:
            value = f"{np.quantile(recent, q):.6f}" if recent.size else "NaN"
            lines.append(f'{p}_request_latency_seconds{{quantile="{q:g}"}} {value}')
        # a summary's sum and count are cumulative, as Prometheus expects; only the quantiles are windowed
        lines += [f"{p}_request_latency_seconds_sum {self.latency.total:.6f}",
                  f"{p}_request_latency_seconds_count {self.latency.count}"]
        lines += self.queue_wait.lines(f"{p}_queue_wait_seconds", "Seconds requests waited for an inference slot.")
        lines += [f"# HELP {p}_requests_total Requests answered, by outcome.", f"# TYPE {p}_requests_total counter"]
        lines += [f'{p}_requests_total{{outcome="{o}"}} {self.outcomes[o]}' for o in ("ok", "error")]
        lines += [f"# HELP {p}_errors_total Error replies, by error type.", f"# TYPE {p}_errors_total counter"]
        lines += [f'{p}_errors_total{{type="{t}"}} {n}' for t, n in sorted(self.errors.items())]
        for name, value, help_text in (
            ("connections", self.connections, "Open WebSocket connections."),
            ("inferences_running", running, "Inference calls running (a timed-out one until it returns)."),
            ("requests_waiting", waiting, "Requests waiting for an inference slot."),
            ("max_concurrency", max_concurrency, "Inference slots."),
        ):
            lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} gauge", f"{p}_{name} {value}"]
        return "\n".join(lines) + "\n"


class PolicyServer:
    """Serve ``policy.infer`` over WebSocket (openpi's protocol); see the module docstring for the behaviour.

    ``serve_forever()`` blocks (Ctrl-C / SIGTERM stop it); ``start()`` / ``stop()`` (or ``with PolicyServer(...)``)
    run it in a background thread with its own event loop, and ``port`` is the bound port (useful with ``port=0``).
    """

    def __init__(
        self,
        policy: Any,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        metadata: Mapping | None = None,
        max_concurrency: int = 1,
        inference_timeout_s: float | None = DEFAULT_INFERENCE_TIMEOUT_S,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
        max_pending: int = DEFAULT_MAX_PENDING,
        queue_timeout_s: float | None = None,
        error_format: str = "text",
    ):
        if not callable(getattr(policy, "infer", None)):
            raise TypeError(f"{type(policy).__name__} has no infer(obs) method")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_pending < 0:
            raise ValueError(f"max_pending must be >= 0, got {max_pending}")
        if error_format not in ("text", "packed"):
            raise ValueError(f"error_format must be 'text' or 'packed', got {error_format!r}")
        self.policy = policy
        self.host = host
        self._requested_port = port
        self.metadata = _resolve_metadata(policy, metadata)
        try:
            self._metadata_frame = packb(self.metadata)
        except Exception as exc:
            raise TypeError(f"policy metadata can't be serialized: {exc}") from exc
        self.max_concurrency = max_concurrency
        self.inference_timeout_s = _positive_or_none(inference_timeout_s)
        self.max_message_bytes = max_message_bytes if max_message_bytes and max_message_bytes > 0 else None
        self.idle_timeout_s = _positive_or_none(idle_timeout_s)
        self.max_pending = max_pending
        self.queue_timeout_s = self.inference_timeout_s if queue_timeout_s is None else _positive_or_none(
            queue_timeout_s)
        self.error_format = error_format

        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._running = 0  # inference threads alive (a timed-out one included until it returns)
        self._metrics = _Metrics()
        self._conn_ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (after start)."""
        if self._port is None:
            raise RuntimeError("the server is not running")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve until Ctrl-C or SIGTERM (or `stop()` from another thread)."""
        install = threading.current_thread() is threading.main_thread()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(self._main(install_signal_handlers=install))
        logger.info("policy server stopped")

    def start(self, timeout: float = 30.0) -> PolicyServer:
        """Serve in a background thread; returns once the port is bound (or raises the bind error)."""
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        self._ready.clear()
        self._startup_error = None
        self._thread = threading.Thread(target=self._thread_main, name="cosmos3-policy-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the policy server did not start in time")
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise self._startup_error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Close every connection (code 1001) and the listening socket; join the background thread."""
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(event.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the policy server thread did not stop within %.1f s", timeout)
            self._thread = None

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _stopping(self) -> bool:
        return self._stop_event is not None and self._stop_event.is_set()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main(install_signal_handlers=False))
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            if not self._ready.is_set():
                self._startup_error = exc
                self._ready.set()
            else:
                logger.exception("policy server crashed")

    async def _main(self, install_signal_handlers: bool) -> None:
        from websockets.asyncio.server import serve

        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_event = asyncio.Event()
        self._slots = asyncio.Semaphore(self.max_concurrency)
        self._waiting = 0
        try:
            async with serve(
                self._handler,
                self.host,
                self._requested_port,
                compression=None,
                max_size=self.max_message_bytes,
                process_request=self._process_request,
            ) as server:
                self._port = server.sockets[0].getsockname()[1]
                logger.info(
                    "serving policy %s on %s (max_concurrency=%d, inference timeout %s s, idle timeout %s s); "
                    "health check: http://%s:%d%s",
                    type(self.policy).__name__, self.url, self.max_concurrency, self.inference_timeout_s,
                    self.idle_timeout_s, self.host, self._port, HEALTH_PATH,
                )
                if self.host not in ("127.0.0.1", "localhost", "::1"):
                    logger.warning("listening on %s: the policy server has no authentication", self.host)
                if install_signal_handlers:
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.add_signal_handler(signal.SIGTERM, self._stop_event.set)
                self._ready.set()
                await self._stop_event.wait()
                logger.info("policy server shutting down")
        finally:
            self._port = None
            self._loop = None

    # -- HTTP ----------------------------------------------------------------------------------------------------------

    def _process_request(self, connection: Any, request: Any) -> Any:
        path = urlsplit(request.path).path
        if path == HEALTH_PATH:
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if path == METRICS_PATH:
            response = connection.respond(http.HTTPStatus.OK, self.metrics_text())
            del response.headers["Content-Type"]  # Headers is a multi-dict: assigning would add a second one
            response.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
            return response
        return None  # go on with the WebSocket handshake

    def metrics_text(self) -> str:
        """What `GET /metrics` answers: Prometheus' text format, the policy's own metrics appended."""
        text = self._metrics.render(self._running, self._waiting, self.max_concurrency)
        extra = getattr(self.policy, "prometheus_metrics", None)
        if callable(extra):
            try:
                text += extra(METRICS_PREFIX)
            except Exception:  # a broken policy hook must not take the server's own metrics down
                logger.exception("the policy's prometheus_metrics() failed")
        return text

    # -- WebSocket -----------------------------------------------------------------------------------------------------

    async def _handler(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.frames import CloseCode

        cid = next(self._conn_ids)
        peer = _format_peer(ws.remote_address)
        logger.info("connection %d from %s opened", cid, peer)
        closed = asyncio.ensure_future(ws.wait_closed())
        served = errors = 0
        self._metrics.connections += 1
        prev_total_s: float | None = None
        try:
            await ws.send(self._metadata_frame)
            while True:
                recv = asyncio.ensure_future(ws.recv())
                await asyncio.wait({recv}, timeout=self.idle_timeout_s)
                if not recv.done():  # idle: recv() is cancellation-safe, no message is lost
                    recv.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await recv
                    logger.info("connection %d from %s idle for %.1f s: closing", cid, peer, self.idle_timeout_s)
                    await ws.close(CloseCode.NORMAL_CLOSURE, "idle timeout")
                    break
                message = recv.result()
                start = time.monotonic()
                reply, ok = await self._serve_request(message, prev_total_s, closed, cid)
                await ws.send(reply)
                prev_total_s = time.monotonic() - start
                self._metrics.observe_request(prev_total_s, ok)
                served += ok
                errors += not ok
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            if rcvd is not None and rcvd.code not in (CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY):
                logger.info("connection %d from %s closed by the client: %s", cid, peer, rcvd)
            sent = exc.sent
            if sent is not None and sent.code == CloseCode.MESSAGE_TOO_BIG:
                logger.warning("connection %d from %s: message over %s bytes, connection closed", cid, peer,
                               self.max_message_bytes)
        except _ConnectionGone:
            why = "closed by the server's shutdown" if self._stopping() else "dropped by the client"
            logger.info("connection %d from %s %s during a request", cid, peer, why)
        except Exception:
            logger.exception("connection %d from %s: unexpected server error", cid, peer)
        finally:
            closed.cancel()
            self._metrics.connections -= 1
            logger.info("connection %d from %s closed (%d requests served, %d errors)", cid, peer, served, errors)

    async def _serve_request(
        self, message: Any, prev_total_s: float | None, closed: asyncio.Future, cid: int
    ) -> tuple[bytes | str, bool]:
        timing: dict[str, float] = {}
        if prev_total_s is not None:
            timing["prev_total_ms"] = prev_total_s * 1000
        try:
            obs = self._decode_observation(message)
            result = await self._infer(obs, timing, closed)
            if not isinstance(result, Mapping):
                raise RequestError(f"the policy returned {type(result).__name__}, not a dict", "TypeError")
            reply = dict(result)
            reply["server_timing"] = timing
            try:
                return packb(reply), True
            except Exception as exc:
                raise RequestError(f"can't serialize the policy's result: {exc}", "SerializationError") from exc
        except _ConnectionGone:
            raise
        except RequestError as exc:
            logger.warning("connection %d: %s: %s", cid, exc.type_name, exc)
            return self._error_frame(str(exc), exc.type_name, timing), False
        except _CLIENT_ERRORS as exc:
            logger.warning("connection %d: the policy rejected the observation: %s: %s", cid, type(exc).__name__, exc)
            return self._error_frame(_exc_message(exc), type(exc).__name__, timing), False
        except Exception as exc:
            logger.error("connection %d: inference failed", cid, exc_info=exc)
            return self._error_frame(_exc_message(exc), type(exc).__name__, timing), False

    def _error_frame(self, message: str, type_name: str, timing: dict) -> bytes | str:
        self._metrics.errors[type_name] += 1  # every error reply is built here
        message = message[:_MAX_ERROR_CHARS]
        if self.error_format == "text":
            return f"{type_name}: {message}"
        return packb({"error": message, "type": type_name, "server_timing": timing})

    @staticmethod
    def _decode_observation(message: Any) -> dict:
        if isinstance(message, str):
            raise RequestError("expected a binary frame (a msgpack-numpy packed dict), got a text frame", "TypeError")
        try:
            obs = unpackb(message)
        except Exception as exc:
            raise RequestError(f"malformed message (not msgpack-numpy): {_exc_message(exc)}", "DecodeError") from exc
        if not isinstance(obs, dict):
            raise RequestError(f"the observation must be a map, got {type(obs).__name__}", "TypeError")
        return obs

    async def _infer(self, obs: dict, timing: dict, closed: asyncio.Future) -> Any:
        slots = self._slots
        assert slots is not None
        t0 = time.monotonic()
        if slots.locked():
            if self._waiting >= self.max_pending:
                raise RequestError(
                    f"server busy: {self._running} inference(s) running and {self._waiting} waiting",
                    "ServerBusy")
            self._waiting += 1
            acquire = asyncio.ensure_future(slots.acquire())
            try:
                done, _ = await asyncio.wait({acquire, closed}, timeout=self.queue_timeout_s,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._waiting -= 1
                if not acquire.done():
                    acquire.cancel()
            if acquire not in done or acquire.cancelled():
                if acquire.done() and not acquire.cancelled():  # acquired in the meantime: give it back
                    slots.release()
                if closed in done:
                    raise _ConnectionGone
                raise RequestError(f"server busy: no free inference slot within {self.queue_timeout_s} s",
                                   "ServerBusy")
        else:
            await slots.acquire()
        timing["queue_ms"] = (time.monotonic() - t0) * 1000
        self._metrics.queue_wait.observe(timing["queue_ms"] / 1000)

        t1 = time.monotonic()
        self._running += 1
        fut = self._run_in_thread(self.policy.infer, obs)
        fut.add_done_callback(self._release_slot)
        done, _ = await asyncio.wait({fut, closed}, timeout=self.inference_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        timing["infer_ms"] = (time.monotonic() - t1) * 1000
        if fut in done:
            return fut.result()
        if closed in done:
            raise _ConnectionGone
        raise RequestError(f"inference took longer than {self.inference_timeout_s} s", "TimeoutError")

    def _release_slot(self, fut: asyncio.Future) -> None:
        self._running -= 1
        if self._slots is not None:
            self._slots.release()
        if not fut.cancelled():
            fut.exception()  # mark retrieved: a late (timed-out) failure is not "never retrieved"

    @staticmethod
    def _run_in_thread(fn: Callable[[Any], Any], arg: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if fut.cancelled():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

        def target() -> None:
            try:
                ok, value = True, fn(arg)
            except Exception as exc:
                ok, value = False, exc
            except BaseException as exc:  # noqa: BLE001 - SystemExit & co. must not kill the server from a thread
                ok, value = False, RuntimeError(f"policy raised {type(exc).__name__}: {exc}")
            with contextlib.suppress(RuntimeError):  # the loop closed: the server stopped meanwhile
                loop.call_soon_threadsafe(settle, ok, value)

        threading.Thread(target=target, name="cosmos3-policy-infer", daemon=True).start()
        return fut


def _positive_or_none(value: float | None) -> float | None:
    return float(value) if value is not None and value > 0 else None


def _exc_message(exc: BaseException) -> str:
    text = str(exc) if not isinstance(exc, KeyError) else f"missing key {exc}"
    return text or type(exc).__name__


def _format_peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


# ----------------------------------------------------------------------------------------------------------------------
# CLI helpers: `cosmos3 serve-policy`
# ----------------------------------------------------------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `serve-policy` options (``--policy --host --port --max-concurrency --timeout ...``) to `parser`."""
    parser.add_argument("--policy", required=True, help="policy checkpoint folder to serve")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the unauthenticated server)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    parser.add_argument("--max-concurrency", type=int, default=1,
                        help="inferences running at once (default 1); a Cosmos 3 policy still runs its model calls "
                             "one at a time, and the wait for the model counts towards --timeout")
    parser.add_argument("--max-pending", type=int, default=DEFAULT_MAX_PENDING,
                        help=f"requests waiting for a slot before new ones get a busy error "
                             f"(default {DEFAULT_MAX_PENDING})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_INFERENCE_TIMEOUT_S,
                        help=f"seconds an inference (and, separately, the wait for a slot) may take before an "
                             f"error reply (default {DEFAULT_INFERENCE_TIMEOUT_S:g}; 0: none)")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S,
                        help=f"close connections idle this many seconds (default {DEFAULT_IDLE_TIMEOUT_S:g}; 0: never)")
    parser.add_argument("--max-message-mb", type=float, default=DEFAULT_MAX_MESSAGE_BYTES / 2**20,
                        help=f"largest observation message in MiB (default {DEFAULT_MAX_MESSAGE_BYTES // 2**20})")
    parser.add_argument("--error-format", choices=["text", "packed"], default="text",
                        help="error replies as text frames, which openpi-client raises as RuntimeError (default, "
                             "openpi's convention), or as packed dicts {'error', 'type'}, which it returns as results")
    parser.add_argument("--max-batch", type=int, default=1,
                        help="dynamic batching: run up to this many concurrent requests whose observations have the "
                             "same shapes as one batched model call (default 1: no batching); raises "
                             "--max-concurrency to at least this, so that batches can fill")
    parser.add_argument("--max-wait-ms", type=float, default=None,
                        help="dynamic batching: how long a request waits for others to join its batch (default "
                             "5 ms; needs --max-batch above 1)")
    return parser


def run_serve(args: argparse.Namespace, make_policy: Callable[[str, argparse.Namespace], Any]) -> int:
    """Build the policy with ``make_policy(args.policy, args)`` and serve it until Ctrl-C / SIGTERM."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    max_batch = getattr(args, "max_batch", 1)
    max_wait_ms = getattr(args, "max_wait_ms", None)
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    if max_wait_ms is not None and max_batch == 1:
        raise ValueError(f"--max-wait-ms {max_wait_ms:g} needs --max-batch above 1 (batching is off at 1)")
    if max_wait_ms is not None and max_wait_ms < 0:
        raise ValueError(f"--max-wait-ms must be >= 0, got {max_wait_ms:g}")
    policy = make_policy(args.policy, args)
    max_concurrency = args.max_concurrency
    if max_batch > 1:
        from .batching import DEFAULT_MAX_WAIT_MS, BatchingPolicy

        policy = BatchingPolicy(policy, max_batch=max_batch,
                                max_wait_ms=DEFAULT_MAX_WAIT_MS if max_wait_ms is None else max_wait_ms)
        if max_concurrency < max_batch:
            # each request in a batch holds a server slot while it waits: fewer slots than max_batch cap the batch
            logger.info("--max-batch %d: raising --max-concurrency from %d to %d", max_batch, max_concurrency,
                        max_batch)
            max_concurrency = max_batch
    server = PolicyServer(
        policy,
        host=args.host,
        port=args.port,
        max_concurrency=max_concurrency,
        inference_timeout_s=args.timeout,
        idle_timeout_s=args.idle_timeout,
        max_message_bytes=int(args.max_message_mb * 2**20),
        max_pending=args.max_pending,
        error_format=args.error_format,
    )
    try:
        server.serve_forever()
    finally:
        close = getattr(policy, "close", None)
        if max_batch > 1 and callable(close):
            close()
    return 0
