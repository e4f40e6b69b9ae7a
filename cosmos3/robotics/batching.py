"""Dynamic batching for `cosmos3 serve-policy --max-batch N`: concurrent requests run as one batched model call.

    policy = BatchingPolicy(Cosmos3Policy.from_pretrained(folder), max_batch=8, max_wait_ms=5)
    PolicyServer(policy, max_concurrency=8).serve_forever()   # the server's worker threads call policy.infer(obs)

The wrapped policy needs ``infer_batch(list[dict]) -> list[dict]`` (entry ``i`` what ``infer(obs[i])`` would
return, the list run in order) besides ``infer``; ``Cosmos3Policy`` has both.

How requests are grouped and ordered:

* Requests batch together only when their observations have the same keys, array shapes and dtypes, and equal
  non-array values except the instruction (``prompt`` / ``task`` / ...), which may differ within a batch. Others go
  into separate batches (a batched model call needs one frame size, and a per-request setting must not be
  silently overridden by another request's).
* One dispatcher thread runs the batches one after another (the model runs one call at a time anyway). A group is
  dispatched when it holds ``max_batch`` requests, or when its oldest request has waited ``max_wait_ms``; when
  several are due, the one whose oldest request came first goes first. A request arriving while a batch runs
  waits for the next one, so under load batches fill up without waiting ``max_wait_ms``.
* The dispatch order is the serial order: the results equal running the requests one at a time in the order
  the batches ran, each batch in arrival order (``Cosmos3Policy`` draws one seed per request from its stream in
  that order). With one group that is the arrival order; with several, a request may be overtaken by later
  requests of another group that joined a batch dispatched before its own.
* Errors: when a batched call raises, its requests are run again one by one with ``infer`` (in order), so a bad
  observation gets its own error and the others their actions. ``Cosmos3Policy`` rejects a bad observation before
  it draws any seed, so the retried requests get the seeds (and results) they would have had alone; an error
  inside the model itself after the seeds were drawn (out of memory, say) shifts the stream for that batch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["BatchingPolicy", "batch_key"]

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_WAIT_MS = 5.0
# values that may differ within one batch: the instruction keys `Cosmos3Policy` reads (`_standardize`)
PROMPT_KEYS = frozenset({"prompt", "task", "instruction", "language_instruction"})


def batch_key(obs: Mapping) -> tuple:
    """What must be equal for two observations to share a batch: keys, array shapes and dtypes, other values
    (the instruction's excepted). An unhashable value makes the request a group of its own."""
    parts = []
    for name in sorted(obs, key=str):
        value = obs[name]
        if isinstance(value, np.ndarray | np.generic):
            parts.append((name, "array", value.shape, value.dtype.str))
        elif hasattr(value, "shape") and hasattr(value, "dtype"):  # a torch tensor, from an in-process caller
            parts.append((name, "tensor", tuple(value.shape), str(value.dtype)))
        elif isinstance(value, str) and name in PROMPT_KEYS:
            parts.append((name, "str"))
        else:
            try:
                hash(value)
            except TypeError:
                return ("unbatchable", object())  # a fresh object: equal to no other key
            parts.append((name, type(value).__name__, value))
    return tuple(parts)


class _Request:
    __slots__ = ("obs", "key", "arrived", "done", "result", "error")

    def __init__(self, obs: Any, key: tuple):
        self.obs, self.key, self.arrived = obs, key, time.monotonic()
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class BatchingPolicy:
    """Wrap `policy` so that concurrent ``infer(obs)`` calls run as batched ``policy.infer_batch`` calls.

    Args:
        policy: has ``infer(obs)`` and ``infer_batch(list_of_obs)``; its ``metadata`` is passed through.
        max_batch: the most requests in one model call (1: every request alone, through the same queue).
        max_wait_ms: how long a request waits for others to join its batch.

    ``infer`` blocks its calling thread until its batch ran (the server's worker threads: give the server at
    least ``max_batch`` slots, or batches can't fill). ``close()`` stops the dispatcher after the queued requests.
    """

    def __init__(self, policy: Any, max_batch: int = DEFAULT_MAX_BATCH, max_wait_ms: float = DEFAULT_MAX_WAIT_MS):
        for method in ("infer", "infer_batch"):
            if not callable(getattr(policy, method, None)):
                raise TypeError(f"{type(policy).__name__} has no {method}() method: BatchingPolicy needs infer(obs) "
                                "and infer_batch(list_of_obs)")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not isinstance(max_wait_ms, int | float) or not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        self.policy = policy
        self.max_batch = max_batch
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self._cond = threading.Condition()
        self._groups: dict[tuple, collections.deque[_Request]] = {}
        self._pending = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        # metrics, read by `prometheus_metrics` (under `_cond`)
        self._sizes: collections.Counter[int] = collections.Counter()
        self._batch_count = 0
        self._fallbacks = 0
        self._model_seconds = 0.0

    @property
    def metadata(self) -> dict:
        metadata = getattr(self.policy, "metadata", None)
        if callable(metadata):
            metadata = metadata()
        return dict(metadata or {})

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch running)."""
        with self._cond:
            return self._pending

    def batch_sizes(self) -> dict[int, int]:
        """How many batches ran with each size so far."""
        with self._cond:
            return dict(self._sizes)

    # -- the caller's side ------------------------------------------------------------------------------------------

    def infer(self, obs: Any) -> Any:
        """``policy.infer(obs)``'s result, computed in a batch with concurrent requests of the same shapes."""
        if not isinstance(obs, Mapping):
            raise TypeError(f"An observation must be a dict, got {type(obs).__name__}.")
        request = _Request(obs, batch_key(obs))
        with self._cond:
            if self._closed:
                raise RuntimeError("the BatchingPolicy is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._dispatch_loop, name="cosmos3-batcher", daemon=True)
                self._thread.start()
            self._groups.setdefault(request.key, collections.deque()).append(request)
            self._pending += 1
            self._cond.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def close(self, timeout: float | None = 30.0) -> None:
        """Run what is queued, then stop the dispatcher thread; later ``infer`` calls raise."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> BatchingPolicy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the dispatcher ---------------------------------------------------------------------------------------------

    def _next_batch(self) -> list[_Request] | None:
        """Block until a group is due; take up to `max_batch` of its requests. None: closed and drained."""
        with self._cond:
            while True:
                if not self._groups:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                now = time.monotonic()
                due = [q for q in self._groups.values()
                       if len(q) >= self.max_batch or now - q[0].arrived >= self.max_wait_s or self._closed]
                if not due:
                    first_deadline = min(q[0].arrived for q in self._groups.values()) + self.max_wait_s
                    self._cond.wait(max(first_deadline - now, 0.0))
                    continue
                queue = min(due, key=lambda q: q[0].arrived)
                batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
                if not queue:
                    del self._groups[batch[0].key]
                self._pending -= len(batch)
                return batch

    def _dispatch_loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            t0 = time.monotonic()
            fell_back = self._run(batch)
            with self._cond:
                self._sizes[len(batch)] += 1
                self._batch_count += 1
                self._fallbacks += fell_back
                self._model_seconds += time.monotonic() - t0
            for request in batch:
                request.done.set()

    def _run(self, batch: list[_Request]) -> bool:
        """Run `batch`, setting each request's result or error; True when it fell back to single calls."""
        if len(batch) == 1:
            request = batch[0]
            request.result, request.error = _call(self.policy.infer, request.obs)
            return False
        results, error = _call(self.policy.infer_batch, [r.obs for r in batch])
        if error is None and isinstance(results, list | tuple) and len(results) == len(batch):
            for request, result in zip(batch, results):
                request.result = result
            return False
        # one bad observation fails the whole batched call: find out whose, one request at a time
        logger.info("a batch of %d failed (%s): running its requests one by one", len(batch),
                    error if error is not None else f"infer_batch returned {type(results).__name__}, not "
                                                    f"{len(batch)} results")
        for request in batch:
            request.result, request.error = _call(self.policy.infer, request.obs)
        return True

    # -- metrics ------------------------------------------------------------------------------------------------------

    def prometheus_metrics(self, prefix: str = "cosmos3_policy") -> str:
        """The batcher's metrics in Prometheus' text format: batch sizes (histogram), batches, fallbacks to single
        calls, time in model calls, requests waiting for a batch."""
        with self._cond:
            sizes, count, fallbacks = dict(self._sizes), self._batch_count, self._fallbacks
            seconds, pending = self._model_seconds, self._pending
        bounds = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b < self.max_batch} | {self.max_batch})
        name = f"{prefix}_batch_size"
        lines = [f"# HELP {name} Requests per batched model call.", f"# TYPE {name} histogram"]
        for bound in bounds:
            lines.append(f'{name}_bucket{{le="{bound}"}} {sum(n for s, n in sizes.items() if s <= bound)}')
        lines += [f'{name}_bucket{{le="+Inf"}} {count}', f"{name}_sum {sum(s * n for s, n in sizes.items())}",
                  f"{name}_count {count}"]
        for metric, kind, text, value in (
            ("batch_fallbacks_total", "counter", "Batched calls that failed and were rerun one request at a time.",
             fallbacks),
            ("batch_seconds_total", "counter", "Seconds spent running batches (model calls and fallbacks).",
             f"{seconds:.6f}"),
            ("batch_queue_depth", "gauge", "Requests waiting for a batch.", pending),
            ("max_batch", "gauge", "The configured largest batch.", self.max_batch),
        ):
            lines += [f"# HELP {prefix}_{metric} {text}", f"# TYPE {prefix}_{metric} {kind}",
                      f"{prefix}_{metric} {value}"]
        return "\n".join(lines) + "\n"


def _call(fn: Any, arg: Any) -> tuple[Any, BaseException | None]:
    try:
        return fn(arg), None
    except Exception as exc:
        return None, exc
    except BaseException as exc:  # noqa: BLE001 - SystemExit & co. must not kill the dispatcher thread
        return None, RuntimeError(f"policy raised {type(exc).__name__}: {exc}")
