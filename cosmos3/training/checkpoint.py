"""Resumable training checkpoints: sharded safetensors through `torch.distributed.checkpoint`, written atomically.

A checkpoint is a folder `checkpoint-<step>/` holding

* `state/`: every rank's shard of a flat `{name: tensor}` dict (trainable weights, EMA, optimizer moments), written
  by `torch.distributed.checkpoint` with its safetensors storage (`HuggingFaceStorageWriter(save_distributed=True)`:
  one file per rank, shard offsets in the safetensors header). Reading goes through the same machinery, so a
  checkpoint saved by N ranks loads into M ranks or into one process. No pickle anywhere: the default DCP format
  stores its metadata with pickle, this one does not.
* `trainer_state.json`: step counters, the list of tensor names, the config.
* `COMPLETE`: written last, by rank 0, after every rank finished writing.

The folder is written as `checkpoint-<step>.partial` and renamed into place once complete, so a kill at any
moment leaves either a complete checkpoint or a `.partial`/unmarked one, which `load_latest` reports and skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor

PREFIX = "checkpoint-"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_is_fine():
    """DCP warns that it runs in one process when no group exists; here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint_dir(root: str, step: int) -> str:
    return os.path.join(root, f"{PREFIX}{step:08d}")


def save(root: str, step: int, state: dict[str, Tensor], meta: dict, keep: int) -> str:
    """Write `state` (plain tensors or DTensors) and `meta` as the checkpoint of `step`; collective on all ranks.

    Returns the final folder. Keeps the newest `keep` complete checkpoints.
    """
    final = checkpoint_dir(root, step)
    tmp = final + ".partial"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    # DCP writes nothing for a rank whose items are all replicated elsewhere; every tensor must be contiguous.
    state = {k: v.detach() if v.is_contiguous() else v.detach().contiguous() for k, v in state.items()}
    with _single_process_is_fine():
        dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(os.path.join(tmp, "state"), save_distributed=True),
                 no_dist=not _distributed())
    _barrier()
    if _rank() == 0:
        state_dir = os.path.join(tmp, "state")
        sizes = {name: os.path.getsize(os.path.join(state_dir, name)) for name in sorted(os.listdir(state_dir))}
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**meta, "step": step, "tensors": sorted(state), "files": sizes}, f, indent=2, default=list)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:  # its presence means all of the above is on disk
            f.write("ok\n")
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: str, keep: int) -> None:
    done = sorted(d for d in os.listdir(root) if d.startswith(PREFIX) and not d.endswith(".partial")
                  and os.path.exists(os.path.join(root, d, "COMPLETE")))
    for old in done[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def load(folder: str, state: dict[str, Tensor]) -> dict:
    """Fill `state` in place from the checkpoint `folder` (any sharding); returns its metadata.

    Raises `ValueError` when the checkpoint holds a different set of tensors than `state`.
    """
    with open(os.path.join(folder, "trainer_state.json")) as f:
        meta = json.load(f)
    saved = set(meta.get("tensors", ()))
    if saved != set(state):
        missing, extra = sorted(set(state) - saved)[:3], sorted(saved - set(state))[:3]
        raise ValueError(f"the checkpoint holds a different set of tensors (missing {missing}, unexpected {extra}); "
                         "was it written by a different model or recipe (LoRA vs full, another parallelism is fine)?")
    for name, size in meta.get("files", {}).items():  # a file cut short (disk full, copy interrupted)
        path = os.path.join(folder, "state", name)
        actual = os.path.getsize(path) if os.path.exists(path) else None
        if actual != size:
            raise ValueError(f"{path}: expected {size} bytes, found {actual}.")
    try:
        with _single_process_is_fine():
            dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(os.path.join(folder, "state")),
                     no_dist=not _distributed())
    except dcp.CheckpointException as e:  # a BaseException: turn it into an ordinary error
        raise ValueError(f"cannot read {folder}: {e}") from None
    return meta


def load_latest(root: str, state: dict[str, Tensor], log: Callable[[dict], None]) -> dict | None:
    """Load the newest complete checkpoint under `root` into `state`; partial or corrupt ones are reported through
    `log` and skipped. Returns the loaded checkpoint's metadata, or None when there is none."""
    if not os.path.isdir(root):
        return None
    for name in sorted((d for d in os.listdir(root) if d.startswith(PREFIX)), reverse=True):
        folder = os.path.join(root, name)
        if name.endswith(".partial") or not os.path.exists(os.path.join(folder, "COMPLETE")):
            log({"event": "skipping incomplete checkpoint", "path": folder})
            continue
        try:
            meta = load(folder, state)
        except Exception as e:  # a truncated or damaged file: fall back to an older checkpoint
            log({"event": "skipping corrupt checkpoint", "path": folder, "error": f"{type(e).__name__}: {e}"})
            continue
        log({"event": "resumed", "path": folder, "step": meta["step"]})
        return meta
    return None


def read_tensors(folder: str, names: list[str] | None = None) -> dict[str, Tensor]:
    """Full (unsharded) tensors of a checkpoint folder, in one process: for exporting a trained model."""
    reader = dcp.HuggingFaceStorageReader(os.path.join(folder, "state"))
    metadata = reader.read_metadata()
    wanted = names if names is not None else list(metadata.state_dict_metadata)
    state = {}
    for name in wanted:
        info = metadata.state_dict_metadata[name]
        state[name] = torch.empty(info.size, dtype=info.properties.dtype)
    with _single_process_is_fine():
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(os.path.join(folder, "state")), no_dist=True)
    return state
