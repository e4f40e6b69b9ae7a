"""`cosmos3 serve`: an HTTP generation API in the shape of OpenAI's images and videos APIs, on one loaded model.

    cosmos3 serve                                   # Cosmos3-Tiny, shipped in the package, on 127.0.0.1:8080
    cosmos3 serve --model ./Cosmos3-Nano --device cuda --port 8000 --max-frames 93

Endpoints (every error is ``{"error": {"message", "type", "param", "code"}}``, `param` naming the field):

* ``POST /v1/images/generations`` (OpenAI's images API): JSON ``{prompt, n, size: "WxH", response_format: "b64_json",
  output_format: png|jpeg|webp, seed, negative_prompt, num_inference_steps, guidance_scale, model}`` ->
  ``{created, data: [{b64_json, seed}], size, output_format}``; image `i` is seeded `seed + i`, the `n` in one call.
* ``POST /v1/videos`` (OpenAI's videos API, job style; JSON, or multipart with files): ``{prompt, size, seconds |
  num_frames, fps, seed, ...}`` is text-to-video; with ``input_reference`` (an image) image-to-video; with
  ``input_video`` (an mp4) video-to-video; with ``control`` (edge, blur: computed from ``input_video``) and/or
  ``control_videos`` (``{name: mp4}``; in a form ``control_videos[name]`` files) transfer. Files are base64 in JSON
  (a ``data:`` URL works) or multipart files. Answers the video object (``id``, ``status`` queued / in_progress /
  cancelling / completed / failed / cancelled, ``progress`` 0-100 from the denoising steps, ``seed``...).
  ``GET /v1/videos/{id}`` the object, ``GET /v1/videos/{id}/content`` the mp4, ``POST /v1/videos/{id}/cancel``
  stops it at the next denoising step, ``DELETE /v1/videos/{id}`` cancels and forgets it, ``GET /v1/videos`` lists.
* ``POST /v1/actions`` (world action, JSON arrays): ``{mode: policy | forward_dynamics | inverse_dynamics, prompt,
  image | video (base64), actions: [[...]], embodiment, chunk_size, resolution_tier, seed, return_video, ...}`` ->
  ``{actions: [[...]], normalized, video: {b64_json} | null, seed, ...}``; with the folder's `policy_config.json`
  and `action_normalizer.json`, actions of its embodiment are in the robot's units (in and out).
* ``GET /health``, ``GET /metrics`` (Prometheus text: HTTP latency histogram by route, replies by code, job queue
  and run time histograms, job latency p50/p90/p99, jobs by state, queue depth), ``GET /v1/models``.

Same safety defaults as the demo: a loopback bind (another host is refused without ``--allow-remote``: there is no
authentication), bounded bodies (413), queue (429), pixels, frames, steps, `n`, chunk and prompt length (400 naming
the field), uploads decoded in the isolated decoder process of `cosmos3.io`, no tracebacks in replies. One model is
loaded once; jobs run one at a time on a worker thread in arrival order. Same seed, same bytes as calling the
pipeline directly (`model`'s docstring says how).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from .api import ApiError, ServeLimits
from .http import DEFAULT_HOST, DEFAULT_PORT, GenerationServer, check_bind, is_loopback
from .model import ServedModel

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ApiError",
    "GenerationServer",
    "ServeLimits",
    "ServedModel",
    "add_serve_arguments",
    "check_bind",
    "is_loopback",
    "run_serve",
]

logger = logging.getLogger(__name__)

_LIMIT_FLAGS = {  # --max-* flag -> ServeLimits field
    "max_pixels": "max_pixels", "max_frames": "max_frames", "max_steps": "max_steps", "max_n": "max_n",
    "max_chunk": "max_chunk", "max_prompt_chars": "max_prompt_chars", "max_body_bytes": "max_body_bytes",
    "max_queue": "max_queue", "max_jobs": "max_finished_jobs",
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The `cosmos3 serve` options."""
    parser.add_argument("--model", default=None, help="checkpoint folder (default: Cosmos3-Tiny, shipped in the "
                        "package)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a non-loopback --host: the API has no authentication")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    defaults = ServeLimits()
    helps = {"max_pixels": "output width x height", "max_frames": "video frames (generated and uploaded)",
             "max_steps": "denoising steps", "max_n": "images per request", "max_chunk": "actions per chunk",
             "max_prompt_chars": "prompt length", "max_body_bytes": "request body (413 beyond)",
             "max_queue": "jobs waiting (429 beyond)", "max_jobs": "finished jobs kept for reading"}
    for flag, name in _LIMIT_FLAGS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=getattr(defaults, name),
                            help=f"{helps[flag]} (default %(default)s)")


def run_serve(args: argparse.Namespace) -> None:
    """Load the model and serve until SIGINT / SIGTERM."""
    import torch

    from ..assets import default_model_folder

    check_bind(args.host, args.port, args.allow_remote)  # before minutes of loading
    limits = ServeLimits(**{name: getattr(args, flag) for flag, name in _LIMIT_FLAGS.items()})
    folder = args.model if args.model is not None else default_model_folder()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    server = GenerationServer(folder, args.host, args.port, limits=limits, allow_remote=args.allow_remote,
                              device=args.device, dtype=dtype)
    if not is_loopback(args.host):
        logger.warning("cosmos3 serve: %s is reachable from other machines and has no authentication.", args.host)
    print(f"cosmos3 serve: {server.model.id} on {server.url} (Ctrl-C to stop)", flush=True)

    def stop(signum, frame):  # shutdown() waits for serve_forever, so it must run on another thread
        threading.Thread(target=server.httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
