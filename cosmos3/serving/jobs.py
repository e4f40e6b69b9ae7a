"""Jobs of the generation API: a bounded queue, one worker thread that runs them in order, and the metrics.

One model is loaded once and its pipelines share one set of weights and per-call state (`_interrupt`, the
scheduler's step index), so jobs run one at a time on a single worker thread; HTTP threads only parse, enqueue and
wait. A job's `run(step)` is handed a `step(done, total)` function that the pipeline's `callback_on_step_end` calls
after every denoising step: it updates the job's progress and raises `Cancelled` when a cancel was asked for, which
ends the pipeline call at that step boundary (nothing is decoded; the transfer pipeline has no `_interrupt`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .api import ApiError

logger = logging.getLogger(__name__)

STATES = ("queued", "in_progress", "cancelling", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
LATENCY_WINDOW = 1024  # jobs the latency quantiles are computed over
LATENCY_QUANTILES = (0.5, 0.9, 0.99)
METRICS_PREFIX = "cosmos3_serve"


class Cancelled(Exception):
    """Raised from a step callback to end a cancelled job's pipeline call at the step boundary."""


@dataclass(eq=False)
class Job:
    """One request's work. `run(step)` returns the result; `info` holds what the API echoes back (size, seed...)."""

    kind: str  # "image", "video" or "action": the endpoint family, and the id prefix
    task: str  # t2i, t2v, i2v, v2v, transfer, policy, forward_dynamics, inverse_dynamics
    run: Callable[[Callable[[int, int], None]], Any]
    info: dict = field(default_factory=dict)
    id: str = ""
    status: str = "queued"
    progress: int = 0  # percent of denoising steps done; 100 only once the result is encoded
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    result: Any = None
    error: dict | None = None  # {"code", "message"} when failed
    cancel_requested: bool = False
    deleted: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        if not self.id:
            self.id = f"{self.kind}_{uuid.uuid4().hex}"


class _Histogram:
    """A Prometheus histogram per label tuple: cumulative bucket counts, sum and count."""

    def __init__(self, label_names: tuple[str, ...], bounds: tuple[float, ...] = LATENCY_BUCKETS):
        self.label_names, self.bounds = label_names, bounds
        self.series: dict[tuple, dict] = {}

    def observe(self, labels: tuple, value: float) -> None:
        s = self.series.setdefault(labels, {"buckets": [0] * len(self.bounds), "sum": 0.0, "count": 0})
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                s["buckets"][i] += 1
        s["sum"] += value
        s["count"] += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for labels, s in sorted(self.series.items()):
            tags = [f'{k}="{v}"' for k, v in zip(self.label_names, labels)]
            plain = "{" + ",".join(tags) + "}" if tags else ""
            for bound, n in [*zip((f"{b:g}" for b in self.bounds), s["buckets"]), ("+Inf", s["count"])]:
                le = f'le="{bound}"'
                out.append(f"{name}_bucket{{{','.join([*tags, le])}}} {n}")
            out += [f"{name}_sum{plain} {s['sum']:.6f}", f"{name}_count{plain} {s['count']}"]
        return out


class Metrics:
    """What `GET /metrics` reports, in Prometheus' text format (0.0.4). Updated from the HTTP threads and the worker,
    so every access holds the lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.http = _Histogram(("route",))
        self.job_run = _Histogram(("task",))
        self.job_wait = _Histogram(("task",))
        self.recent: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.responses: Counter[tuple[str, int]] = Counter()
        self.outcomes: Counter[tuple[str, str]] = Counter()

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.http.observe((route,), seconds)
            self.responses[(route, status)] += 1

    def observe_job(self, job: Job) -> None:
        with self.lock:
            self.outcomes[(job.task, job.status)] += 1
            if job.started_at is not None:
                self.job_wait.observe((job.task,), job.started_at - job.created_at)
                self.job_run.observe((job.task,), job.completed_at - job.started_at)
            if job.status == "completed":
                self.recent.append(job.completed_at - job.created_at)

    def render(self, states: Counter, queue_depth: int, max_queue: int) -> str:
        p = METRICS_PREFIX
        with self.lock:
            lines = self.http.lines(f"{p}_http_request_duration_seconds",
                                    "Seconds from reading an HTTP request to its reply (sync endpoints include the "
                                    "generation), by route.")
            lines += [f"# HELP {p}_http_responses_total HTTP replies, by route and status code.",
                      f"# TYPE {p}_http_responses_total counter"]
            lines += [f'{p}_http_responses_total{{route="{r}",code="{c}"}} {n}'
                      for (r, c), n in sorted(self.responses.items())]
            lines += self.job_wait.lines(f"{p}_job_queue_seconds", "Seconds jobs waited in the queue, by task.")
            lines += self.job_run.lines(f"{p}_job_run_seconds", "Seconds jobs ran on the model, by task.")
            lines += [f"# HELP {p}_job_latency_seconds Submit-to-result seconds of completed jobs, quantiles over "
                      f"the last {LATENCY_WINDOW}.", f"# TYPE {p}_job_latency_seconds summary"]
            recent = np.asarray(self.recent, dtype=np.float64)
            for q in LATENCY_QUANTILES:
                value = f"{np.quantile(recent, q):.6f}" if recent.size else "NaN"
                lines.append(f'{p}_job_latency_seconds{{quantile="{q:g}"}} {value}')
            lines += [f"{p}_job_latency_seconds_sum {recent.sum():.6f}", f"{p}_job_latency_seconds_count {recent.size}"]
            lines += [f"# HELP {p}_jobs_finished_total Jobs finished, by task and final state.",
                      f"# TYPE {p}_jobs_finished_total counter"]
            lines += [f'{p}_jobs_finished_total{{task="{t}",state="{s}"}} {n}'
                      for (t, s), n in sorted(self.outcomes.items())]
        lines += [f"# HELP {p}_jobs Jobs held by the server, by state.", f"# TYPE {p}_jobs gauge"]
        lines += [f'{p}_jobs{{state="{s}"}} {states[s]}' for s in STATES]
        for name, value, help_text in (("queue_depth", queue_depth, "Jobs waiting for the model."),
                                       ("max_queue", max_queue, "Jobs that may wait before new ones get 429.")):
            lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} gauge", f"{p}_{name} {value}"]
        return "\n".join(lines) + "\n"


class JobRunner:
    """The job table and the worker thread. At most `max_queue` jobs wait (one more is refused with 429); finished
    jobs are kept for `ttl_s` seconds, at most `max_finished` of them (the oldest go first)."""

    def __init__(self, *, max_queue: int, max_finished: int, ttl_s: float, metrics: Metrics):
        self.max_queue, self.max_finished, self.ttl_s, self.metrics = max_queue, max_finished, ttl_s, metrics
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.queue: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.running: Job | None = None
        self.thread = threading.Thread(target=self._loop, name="cosmos3-serve-worker", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------------ the table

    def submit(self, job: Job) -> Job:
        with self.cond:
            if self.closed:
                raise ApiError(503, "The server is shutting down.", code="shutting_down")
            if len(self.queue) >= self.max_queue:
                raise ApiError(429, f"The queue is full ({self.max_queue} jobs waiting, the server's --max-queue); "
                               "retry later.", code="queue_full")
            self._expire()
            self.jobs[job.id] = job
            self.queue.append(job)
            self.cond.notify_all()
        return job

    def get(self, job_id: str, kind: str) -> Job:
        with self.cond:
            self._expire()
            job = self.jobs.get(job_id)
        if job is None or job.kind != kind or job.deleted:
            raise ApiError(404, f"No {kind} job with id {job_id!r} (finished jobs are kept for {self.ttl_s:g} s).",
                           param="id", code="not_found", type="not_found_error")
        return job

    def list(self, kind: str) -> list[Job]:
        with self.cond:
            self._expire()
            return [j for j in self.jobs.values() if j.kind == kind and not j.deleted]

    def cancel(self, job: Job) -> Job:
        """A queued job is cancelled at once; a running one stops at its next step boundary ("cancelling" until it
        does; if it is past its last step it completes). A finished job is left as it is."""
        with self.cond:
            if job.status == "queued":
                self.queue.remove(job)
                self._finish(job, "cancelled")
            elif job.status == "in_progress":
                job.cancel_requested = True
                job.status = "cancelling"
        return job

    def delete(self, job: Job) -> None:
        self.cancel(job)
        with self.cond:
            job.deleted = True
            if job.status in FINISHED:
                self.jobs.pop(job.id, None)

    def states(self) -> tuple[Counter, int]:
        with self.cond:
            return Counter(j.status for j in self.jobs.values() if not j.deleted), len(self.queue)

    def close(self, timeout: float | None = 60.0) -> None:
        """Cancel what waits and what runs, and stop the worker."""
        with self.cond:
            self.closed = True
            while self.queue:
                self._finish(self.queue.popleft(), "cancelled")
            if self.running is not None:
                self.running.cancel_requested = True
            self.cond.notify_all()
        self.thread.join(timeout)

    def _expire(self) -> None:  # under the lock
        now = time.time()
        finished = [j for j in self.jobs.values() if j.status in FINISHED]
        for j in finished:
            if now - j.completed_at > self.ttl_s or j.deleted:
                del self.jobs[j.id]
        finished = [j for j in self.jobs.values() if j.status in FINISHED]
        for j in finished[: max(0, len(finished) - self.max_finished)]:
            del self.jobs[j.id]

    def _finish(self, job: Job, status: str, error: dict | None = None) -> None:  # under the lock
        job.status, job.error, job.completed_at = status, error, time.time()
        if status == "completed":
            job.progress = 100
        else:
            job.result = None
        if job.deleted:
            self.jobs.pop(job.id, None)
        self.metrics.observe_job(job)
        job.done.set()

    # ----------------------------------------------------------------------------------------------- the worker

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                job = self.queue.popleft()
                job.status, job.started_at, self.running = "in_progress", time.time(), job
            status, error, result = self._run(job)
            with self.cond:
                self.running = None
                job.result = result
                self._finish(job, status, error)

    @staticmethod
    def _run(job: Job) -> tuple[str, dict | None, Any]:
        def step(done: int, total: int) -> None:
            # 99 at most until the result is decoded and encoded, so 100 always means "ready"
            job.progress = min(99, int(100 * done / max(total, 1)))
            if job.cancel_requested:
                raise Cancelled

        try:
            return "completed", None, job.run(step)
        except Cancelled:
            return "cancelled", None, None
        except ApiError as e:
            return "failed", {"code": e.code or "invalid_request", "message": e.message}, None
        except (ValueError, TypeError) as e:  # the pipelines' input checks, written for users
            return "failed", {"code": "invalid_request", "message": _first_line(str(e))}, None
        except ImportError as e:  # an optional extra (PyAV for mp4: `cosmos3[video]`); the message says which
            return "failed", {"code": "missing_dependency", "message": _first_line(str(e))}, None
        except MemoryError:
            return "failed", {"code": "out_of_memory", "message": "Out of memory: ask for fewer pixels, frames or "
                              "samples."}, None
        except Exception as e:  # noqa: BLE001 - a failed job must not end the worker
            import torch

            if isinstance(e, torch.OutOfMemoryError):
                return "failed", {"code": "out_of_memory", "message": "Out of memory: ask for fewer pixels, frames "
                                  "or samples."}, None
            logger.exception("cosmos3 serve: job %s (%s) failed", job.id, job.task)
            return "failed", {"code": "internal_error",
                              "message": f"Internal error ({type(e).__name__}); the server log has the details."}, None


def _first_line(message: str, limit: int = 500) -> str:
    line = (message.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."
