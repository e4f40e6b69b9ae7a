"""Where the model shipped inside the package lies. `cosmos3 generate` and `cosmos3 demo` default to it; nothing here
imports the rest of cosmos3, so finding the folder costs neither the demo nor gradio."""

from __future__ import annotations

import os

_TINY_MODEL = "cosmos3-tiny"  # a folder next to this file


def default_model_folder() -> str:
    """Cosmos3-Tiny, the small model trained by this project and shipped inside the package
    (`cosmos3/assets/cosmos3-tiny`): a demo that starts without downloading anything. Real checkpoints are passed
    with `--model`."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), _TINY_MODEL)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"No model to run: the tiny demo model is not installed with this copy of cosmos3 (looked for {path}). "
            "Pass a checkpoint folder: `cosmos3 demo --model PATH` or `python demos/app.py --model PATH`."
        )
    return path
