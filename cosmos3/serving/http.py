"""The HTTP server of the generation API (`http.server.ThreadingHTTPServer`: the standard library, no extra).

Each connection gets a thread that reads and checks the request, plans its `Job` and either waits for it
(images, world actions: synchronous, as OpenAI's images API) or answers the job object at once (videos, as
OpenAI's `/v1/videos`). The model runs on `JobRunner`'s single worker thread.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..io import is_loopback
from .api import ApiError, Fields, ServeLimits, parse_body
from .jobs import FINISHED, Job, JobRunner, Metrics
from .model import ServedModel

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
SOCKET_TIMEOUT_S = 60.0  # a client that stops sending mid-request loses its connection, not a thread forever


def check_bind(host: Any, port: Any, allow_remote: bool) -> None:
    """The API has no authentication: it binds a loopback address unless `allow_remote` says otherwise."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"`host` must be an address string, got {host!r}.")
    if not is_loopback(host) and not allow_remote:
        raise ValueError(f"`host` {host!r} is not a loopback address: the generation API has no authentication, so "
                         "anyone who can reach it could run the model. Bind 127.0.0.1 (and put an authenticating "
                         "proxy in front), or pass --allow-remote (allow_remote=True) to expose it anyway.")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"`port` must be an int in 0..65535 (0: any free port), got {port!r}.")


class GenerationServer:
    """Serve `model` (a `ServedModel`, or a checkpoint folder to load) over HTTP.

        with GenerationServer("path/to/model", port=0) as server:     # port 0: a free port, read back
            print(server.url)                                           # http://127.0.0.1:PORT

    Args:
        model: a loaded `ServedModel` or a pipeline folder.
        host, port: where to listen; a non-loopback host needs `allow_remote=True`.
        limits: request limits (`ServeLimits`).
        device, dtype: where to load a folder (default CUDA when available; bfloat16 there, float32 on CPU).
    """

    def __init__(self, model: ServedModel | str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                 limits: ServeLimits | None = None, allow_remote: bool = False, device: str | None = None,
                 dtype=None):
        check_bind(host, port, allow_remote)
        self.limits = limits or (model.limits if isinstance(model, ServedModel) else ServeLimits())
        if not isinstance(model, ServedModel):
            model = ServedModel(model, device=device, dtype=dtype, limits=self.limits)
        self.model = model
        self.model.limits = self.limits
        self.metrics = Metrics()
        self.runner = JobRunner(max_queue=self.limits.max_queue, max_finished=self.limits.max_finished_jobs,
                                ttl_s=self.limits.job_ttl_s, metrics=self.metrics)
        handler = type("Handler", (_Handler,), {"app": self})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError:
            self.runner.close()
            raise
        self.httpd.daemon_threads = True
        self.host = host
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def start(self) -> GenerationServer:
        """Serve on a background thread (tests, notebooks)."""
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="cosmos3-serve-http", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join()
            self.thread = None
        self.runner.close()
        self.httpd.server_close()

    def __enter__(self) -> GenerationServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------- replies

    def video_object(self, job: Job) -> dict:
        """A job as OpenAI's video object (`id`, `object`, `status`, `progress`, `created_at`, `completed_at`,
        `expires_at`, `model`, `size`, `seconds`, `error`), plus `task`, `seed`, `num_frames`, `fps`."""
        info = job.info
        frames, fps = info.get("num_frames"), info.get("fps")
        return {
            "id": job.id, "object": "video", "model": self.model.id, "status": job.status, "progress": job.progress,
            "created_at": int(job.created_at),
            "completed_at": None if job.completed_at is None else int(job.completed_at),
            "expires_at": None if job.completed_at is None else int(job.completed_at + self.limits.job_ttl_s),
            "size": info.get("size"), "seconds": None if not frames else f"{(frames - 1) / fps:g}",
            "error": job.error, "task": job.task, "seed": info.get("seed"), "num_frames": frames, "fps": fps,
        }

    def wait(self, job: Job) -> Job:
        """Submit and wait (the synchronous endpoints); a job that did not complete is an error reply."""
        self.runner.submit(job)
        job.done.wait()
        if job.status == "cancelled":
            raise ApiError(503, "The request was cancelled (the server is shutting down).", code="cancelled",
                           type="server_error")
        if job.status == "failed":
            internal = job.error["code"] in ("internal_error", "out_of_memory", "missing_dependency")
            raise ApiError(500 if internal else 400, job.error["message"], code=job.error["code"],
                           type="server_error" if internal else "invalid_request_error")
        return job


class _Handler(BaseHTTPRequestHandler):
    server_version = "cosmos3-serve"
    timeout = SOCKET_TIMEOUT_S
    app: GenerationServer  # set on the subclass each server makes

    # (method, path pattern) -> route name; `{id}` is one path segment
    ROUTES = (
        ("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
        ("POST", "/v1/images/generations"), ("POST", "/v1/actions"),
        ("POST", "/v1/videos"), ("GET", "/v1/videos"), ("GET", "/v1/videos/{id}"), ("DELETE", "/v1/videos/{id}"),
        ("GET", "/v1/videos/{id}/content"), ("POST", "/v1/videos/{id}/cancel"),
    )

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _route(self, method: str) -> tuple[str, str | None]:
        parts = urlsplit(self.path).path.rstrip("/").split("/") or [""]
        allowed = False
        for m, pattern in self.ROUTES:
            want = pattern.split("/")
            if len(want) == len(parts) and all(w == p or (w == "{id}" and p) for w, p in zip(want, parts)):
                if m == method:
                    job_id = parts[want.index("{id}")] if "{id}" in want else None
                    return pattern, job_id
                allowed = True
        if allowed:
            raise ApiError(405, f"{method} is not allowed on {urlsplit(self.path).path}.", code="method_not_allowed")
        raise ApiError(404, f"No endpoint {method} {urlsplit(self.path).path}.", code="not_found",
                       type="not_found_error")

    def _dispatch(self, method: str) -> None:
        start, route, status = time.perf_counter(), "other", 500
        try:
            route, job_id = self._route(method)
            status = self._handle(method, route, job_id)
        except ApiError as e:
            status = e.status
            self._json(e.status, e.body(), close=e.status in (408, 411, 413))
        except Exception as e:  # noqa: BLE001 - one bad request must not take the server down
            logger.exception("cosmos3 serve: %s %s failed", method, self.path)
            status = 500
            self._json(500, ApiError(500, f"Internal error ({type(e).__name__}); the server log has the details.",
                                     code="internal_error", type="server_error").body())
        finally:
            self.app.metrics.observe_http(route, status, time.perf_counter() - start)

    def _body(self) -> Fields:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "Chunked bodies are not accepted: send Content-Length.", code="length_required")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "A POST body needs a Content-Length header.", code="length_required")
        limit = self.app.limits.max_body_bytes
        if int(length) > limit:
            raise ApiError(413, f"The body is {int(length)} bytes; the limit is {limit} (--max-body-bytes).",
                           param="body", code="body_too_large")
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            raise ApiError(408, f"The body did not arrive within {SOCKET_TIMEOUT_S:g} s.", code="timeout") from None
        if len(body) != int(length):
            raise ApiError(400, "The body is shorter than its Content-Length.", code="incomplete_body")
        return Fields(*parse_body(self.headers.get("Content-Type"), body))

    def _handle(self, method: str, route: str, job_id: str | None) -> int:
        app = self.app
        if route == "/health":
            states, depth = app.runner.states()
            return self._json(200, {"status": "ok", "model": app.model.id, "queue_depth": depth,
                                    "jobs": dict(states)})
        if route == "/metrics":
            states, depth = app.runner.states()
            text = app.metrics.render(states, depth, app.limits.max_queue)
            return self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        if route == "/v1/models":
            return self._json(200, {"object": "list", "data": [app.model.describe()]})
        if route == "/v1/images/generations":
            job = app.wait(app.model.plan_images(self._body()))
            return self._json(200, {"created": int(job.created_at),
                                    "data": [{"b64_json": base64.b64encode(b).decode(), "seed": job.info["seed"] + i}
                                             for i, b in enumerate(job.result)],
                                    "output_format": job.info["output_format"], "size": job.info["size"]})
        if route == "/v1/actions":
            job = app.wait(app.model.plan_actions(self._body()))
            video = job.result["video"]
            return self._json(200, {"id": job.id, "object": "world_action", "created": int(job.created_at),
                                    "model": app.model.id, "mode": job.task, **job.info,
                                    "actions": job.result["actions"],
                                    "video": None if video is None else {"b64_json": base64.b64encode(video).decode(),
                                                                         "format": "mp4"}})
        if route == "/v1/videos" and method == "POST":
            job = app.runner.submit(app.model.plan_video(self._body()))
            return self._json(200, app.video_object(job))
        if route == "/v1/videos":
            query = parse_qs(urlsplit(self.path).query)
            jobs = sorted(app.runner.list("video"), key=lambda j: j.created_at,
                          reverse=query.get("order", ["desc"])[0] != "asc")
            return self._json(200, {"object": "list", "data": [app.video_object(j) for j in jobs],
                                    "has_more": False})
        job = app.runner.get(job_id, "video")
        if route == "/v1/videos/{id}" and method == "GET":
            return self._json(200, app.video_object(job))
        if route == "/v1/videos/{id}":  # DELETE: cancel if it still runs, and forget it
            app.runner.delete(job)
            return self._json(200, {"id": job.id, "object": "video.deleted", "deleted": True})
        if route == "/v1/videos/{id}/cancel":
            return self._json(200, app.video_object(app.runner.cancel(job)))
        # /v1/videos/{id}/content
        variant = parse_qs(urlsplit(self.path).query).get("variant", ["video"])[0]
        if variant not in ("video", "thumbnail"):
            raise ApiError(400, f"`variant` {variant!r} is not available; this server has 'video' (the mp4) and "
                           "'thumbnail' (the first frame, PNG).", param="variant")
        if job.status != "completed":
            state = "is still " + job.status if job.status not in FINISHED else f"has status {job.status!r}"
            raise ApiError(409 if job.status not in FINISHED else 400, f"Video {job.id} {state}: no content.",
                           param="id", code="video_not_ready")
        return self._send(200, job.result[variant], "video/mp4" if variant == "video" else "image/png")

    def _json(self, status: int, obj: dict, close: bool = False) -> int:
        return self._send(status, json.dumps(obj).encode(), "application/json", close=close)

    def _send(self, status: int, data: bytes, content_type: str, close: bool = False) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if close:  # an unread body (too large, no length) must not be parsed as the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        try:
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away (or timed out): its reply has nowhere to go
            self.close_connection = True
        return status
