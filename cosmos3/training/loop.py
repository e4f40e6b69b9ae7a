"""What every training loop here shares (`Trainer`, `Distiller`, `VAETrainer`): the guarded optimizer step, the EMA,
checkpoints of weights + EMA + Adam moments, and the run from a resumed step to `max_steps`.

    optimizer = adamw(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    grad_norm, skipped = guarded_update(loss, params, optimizer, grad_clip=1.0)
    if skipped is None:
        ema_update(ema, params, decay=0.999)

`save`, `resume` and `run` take the trainer itself, which has `step` (advanced by its own step function),
`log(record)`, `state()` (the flat dict of tensors `checkpoint_state` builds) and, for `run`, `save()`. What differs
between the trainers (what a step computes and logs, distributed reductions, counters) stays in them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from . import checkpoint
from .parallel import full

# ---------------------------------------------------------------------------------------------------------- a step


def adamw(params: dict[str, Tensor], *, lr: float, betas: tuple[float, float], weight_decay: float
          ) -> torch.optim.AdamW:
    """AdamW over `params`, its state created up front (Adam creates it at the first step) so that a checkpoint,
    also one written before any update or after skipped ones only, always holds the same tensors."""
    optimizer = torch.optim.AdamW(params.values(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    for p in params.values():
        optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    return optimizer


def guarded_update(loss: Tensor, params: dict[str, Tensor], optimizer: torch.optim.Optimizer, grad_clip: float, *,
                   loss_value: float | None = None, zero_missing_grads: bool = False
                   ) -> tuple[float | None, str | None]:
    """Backward, clip the gradients to norm `grad_clip` and step, unless the loss or the gradient norm is not finite:
    then the optimizer touches nothing. Gradients are cleared before and after.

    Args:
        loss_value: decides the skip instead of `loss` (data parallelism: the all-reduced loss, so that every rank
            skips the same steps; the norm is made whole with `parallel.full` for the same reason).
        zero_missing_grads: parameters no gradient reached (a head the batch did not use) get a zero one before the
            step, so that Adam treats them alike on one process and under FSDP, where they must have one.

    Returns:
        The gradient norm before clipping (None when the loss already skipped the step), and why the step was
        skipped ("non-finite loss", "non-finite gradient norm") or None.
    """
    optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(float(loss.detach() if loss_value is None else loss_value)):
        return None, "non-finite loss"
    loss.backward()
    grad_norm = float(full(torch.nn.utils.clip_grad_norm_(list(params.values()), grad_clip)))
    skipped = None
    if not math.isfinite(grad_norm):
        skipped = "non-finite gradient norm"
    else:
        if zero_missing_grads:
            for p in params.values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


@torch.no_grad()
def ema_update(ema: dict[str, Tensor], params: dict[str, Tensor], decay: float) -> None:
    """`ema <- decay * ema + (1 - decay) * params`, in place (`decay`: the old average's weight per update)."""
    for name, p in params.items():
        ema[name].lerp_(p.detach(), 1.0 - decay)


# ---------------------------------------------------------------------------------------------------- checkpoints


def checkpoint_state(params: dict[str, Tensor], optimizer: torch.optim.Optimizer, ema: dict[str, Tensor] | None = None,
                     *, prefix: str = "model", optim_prefix: str = "optim") -> dict[str, Tensor]:
    """Weights, EMA (when given and not empty) and optimizer state as one flat dict of tensors, per parameter:
    `{prefix}.{name}`, `ema.{name}`, `{optim_prefix}.{name}.{key}` (the `cosmos3.training.checkpoint` format)."""
    state = {}
    for name, p in params.items():
        state[f"{prefix}.{name}"] = p
        if ema:
            state[f"ema.{name}"] = ema[name]
        for key, value in optimizer.state[p].items():
            state[f"{optim_prefix}.{name}.{key}"] = value
    return state


def save(trainer, root: str, keep: int, counters: tuple[str, ...] = (), **meta) -> str:
    """Write `trainer.state()` as the checkpoint of `trainer.step` under `root` (collective on all ranks), with the
    trainer's attributes named in `counters` and `meta` as its metadata; keeps the newest `keep`. Returns its
    folder."""
    meta = {**{name: getattr(trainer, name) for name in counters}, **meta}
    return checkpoint.save(root, trainer.step, trainer.state(), meta, keep)


def resume(trainer, root: str, counters: tuple[str, ...] = ()) -> int | None:
    """Load the newest complete checkpoint under `root` into `trainer.state()` (partial or corrupt ones are reported
    through `trainer.log` and skipped) and restore `trainer.step` and the `counters`. Returns the step, or None when
    there is no checkpoint."""
    meta = checkpoint.load_latest(root, trainer.state(), trainer.log)
    if meta is None:
        return None
    for name in ("step", *counters):
        setattr(trainer, name, int(meta[name]))
    return trainer.step


# -------------------------------------------------------------------------------------------------------- the run


@contextlib.contextmanager
def cpu_settings(flush_denormal: bool, num_threads: int | None = None) -> Iterator[None]:
    """Flush denormal floats to zero and use `num_threads` intra-op threads inside, restoring both after.

    Adam's second moments of parameters with tiny gradients become denormal and made CPU steps ~25x slower in our
    measurements; values that small change nothing in the update.
    """
    flush = flush_denormal and torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if flush:
            torch.set_flush_denormal(False)
        if num_threads:
            torch.set_num_threads(threads)


def run(trainer, step: Callable[[], dict], max_steps: int, save_every: int | None, *, flush_denormal: bool,
        num_threads: int | None = None, log: Callable[[dict], None] | None = None,
        stop: Callable[[], dict | None] | None = None) -> list[dict]:
    """Call `step` until `trainer.step` reaches `max_steps` (resuming is the caller's, before), under `cpu_settings`.

    Each step's record gets `seconds` (its wall time, unless the step timed itself), goes to `log` (default
    `trainer.log`) and is returned in the list. `trainer.save()` runs every `save_every` steps and at the end
    (`save_every=None`: never). `stop`, asked after every step, returns an event to end the run early: a checkpoint
    is written (with `save_every`), then the event is logged through `trainer.log`.
    """
    log = log or trainer.log
    records = []
    with cpu_settings(flush_denormal, num_threads):
        while trainer.step < max_steps:
            start = time.perf_counter()
            record = step()
            record.setdefault("seconds", round(time.perf_counter() - start, 4))
            log(record)
            records.append(record)
            event = stop() if stop is not None else None
            if save_every and (trainer.step % save_every == 0 or trainer.step == max_steps or event):
                trainer.save()
            if event:
                trainer.log(event)
                break
    return records
