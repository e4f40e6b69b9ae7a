"""Where a run's records go: stdout (JSON lines), a JSONL file, TensorBoard and a progress bar; rank 0 only.

Records are the dicts the trainers emit: step records (`step`, `loss`, `loss_<modality>`, `grad_norm`, `seconds`,
...) and events (`event`, ...). The JSONL file is appended to, so a resumed run continues the same log.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO

from .parallel import world


class RunLogger:
    """Callable sink for trainer records.

    Args:
        output_dir: where `log.jsonl` and `tensorboard/` go.
        total_steps: the run's `max_steps` (for the progress bar).
        tensorboard: also write TensorBoard scalars (needs the `tensorboard` package).
        stdout: print every record as a JSON line (off when a progress bar is shown on a terminal).
        progress: show a tqdm progress bar on stderr.
    """

    def __init__(self, output_dir: str, total_steps: int, *, tensorboard: bool = True, stdout: bool = True,
                 progress: bool = True, stream: IO[str] | None = None):
        self.active = world()[0] == 0
        self.stream = stream or sys.stdout
        self.stdout = stdout
        self._file = self._writer = self._bar = None
        if not self.active:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(os.path.join(output_dir, "log.jsonl"), "a", buffering=1)  # noqa: SIM115 (closed in close)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("TensorBoard logging needs the `tensorboard` package (pip install "
                                  "'cosmos3[train]'); set `log_tensorboard = false` in the recipe to skip it.") from e
            self._writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc="training", unit="step", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, record: dict) -> None:
        if not self.active:
            return
        record = {"time": round(time.time(), 3), **record}
        line = json.dumps(record, default=str)
        self._file.write(line + "\n")
        if self.stdout:
            print(line, file=self.stream, flush=True)
        step = record.get("step")
        if record.get("event") == "resumed" and self._bar is not None:
            self._bar.n = int(record["step"])
            self._bar.refresh()
        if step is None or "event" in record:
            return
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"train/{key}", value, int(step))
        if self._bar is not None:
            self._bar.n = int(step)
            shown = {k: f"{v:.4g}" for k, v in record.items() if k.startswith("loss") and isinstance(v, float)}
            self._bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
