"""`cosmos3 demo`: a local browser page with one tab per task of a checkpoint folder.

    python demos/app.py                               # the tiny model shipped in the package, on 127.0.0.1:7860
    cosmos3 demo --model ./Cosmos3-Nano --device cuda

Tabs: text to image, image to video, world action (a robot policy: the action chunk as a plot, and the predicted
video) and text (the understanding tower). The pipelines are loaded once and share one set of weights: each task
pipeline is built from the same component objects, so one transformer is in memory for all tabs. A tab whose task
the checkpoint cannot do (no action heads, a tokenizer without a chat template) says so instead of failing.

`handlers` loads the checkpoint and answers the requests (`DemoApp`), `page` lays out the gradio page on those
handlers and says how it is served, `plotting` draws the examples and the action plot; this module starts it.

Safe by default, because a demo is a web server that runs a model on what anyone who can reach it sends:

* it binds 127.0.0.1, never opens a share link, and turns gradio's analytics off (`GRADIO_ANALYTICS_ENABLED` is set
  before gradio is imported, and `analytics_enabled=False`), so starting it makes no outbound connection;
* uploads are capped (`max_file_size`), the queue is bounded, and one model call runs at a time across all tabs
  (one shared `concurrency_id` with limit 1: the tabs share the weights and the scheduler state);
* every handler re-checks its numbers (steps, frames, resolution, prompt length, ...) against `DemoLimits`, since
  the API can be called without the page's sliders; out-of-range values are refused with a message naming the range;
* errors reach the user as short `gr.Error` messages (a pipeline's `ValueError` text, or "internal error" with the
  details in the server log), never as tracebacks; no `allowed_paths` are given, so only gradio's own cache is served.

gradio is imported lazily, so `cosmos3 --help` and the other subcommands neither need nor pay for it.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from ..assets import default_model_folder
from ..io import is_loopback
from .handlers import MAX_SEED, TABS, DemoApp, DemoLimits, user_facing_errors
from .page import (
    CONCURRENCY_ID,
    DEFAULT_HOST,
    DEFAULT_PORT,
    EXAMPLES_FILE,
    _model_examples,  # noqa: F401 - tests and the Tiny packaging tests read a folder's examples through here
    build_demo,
    build_page,
    launch_options,
)
from .plotting import action_labels, draw_landscape, draw_tabletop, plot_actions

if TYPE_CHECKING:
    import gradio as gr

__all__ = [
    "CONCURRENCY_ID",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "EXAMPLES_FILE",
    "MAX_SEED",
    "TABS",
    "DemoApp",
    "DemoLimits",
    "action_labels",
    "add_demo_arguments",
    "build_demo",
    "build_page",
    "default_model_folder",
    "draw_landscape",
    "draw_tabletop",
    "launch",
    "launch_options",
    "plot_actions",
    "run_demo",
    "user_facing_errors",
]

logger = logging.getLogger(__name__)


def launch(model_folder: str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
           device: str | None = None, limits: DemoLimits | None = None, prevent_thread_lock: bool = False,
           quiet: bool = False) -> gr.Blocks:
    """Build and serve the demo (blocks until stopped unless `prevent_thread_lock`); returns the Blocks."""
    folder = model_folder if model_folder is not None else default_model_folder()
    if not is_loopback(host):
        logger.warning("cosmos3 demo: binding %s makes the demo reachable from other machines; it has no login.", host)
        print(f"Warning: --host {host} makes the demo reachable from other machines, and it has no login.")
    limits = limits or DemoLimits()
    demo = build_demo(folder, device=device, limits=limits)
    demo.launch(**launch_options(host, port, limits), prevent_thread_lock=prevent_thread_lock, quiet=quiet)
    return demo


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The `cosmos3 demo` / `demos/app.py` options (gradio is not imported here)."""
    parser.add_argument("--model", default=None,
                        help="checkpoint folder (default: Cosmos3-Tiny, the small trained model shipped in the "
                             "package)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it, no login)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")


def run_demo(args: argparse.Namespace) -> None:
    """Serve the demo for parsed `add_demo_arguments` options (until Ctrl-C)."""
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}.")
    launch(args.model, host=args.host, port=args.port, device=args.device)
