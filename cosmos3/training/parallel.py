"""Scale-out on `torch.distributed`, applied from outside the model: process groups under `torchrun`, DDP and
FSDP2 (`fully_shard`) wrapping, and the few collectives the trainer needs.

Launch any recipe with `torchrun --nproc-per-node N ...`: `torchrun` sets `RANK`/`WORLD_SIZE`/`LOCAL_RANK`, and
`init_distributed` joins the group (gloo on CPU, NCCL on GPU). Without those variables everything runs in one
process and these helpers are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

PARALLELISM = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group `torchrun` describes (if any) and pick this rank's device.

    `device`: "cpu", "cuda" or None (CUDA when available). Each rank uses `cuda:LOCAL_RANK`.
    """
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"`device` must be 'cpu', 'cuda' or None, got {device!r}.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("`device`='cuda' was asked for but CUDA is not available on this machine.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=dev if kind == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: Tensor) -> Tensor:
    if world()[1] > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (collective), a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def apply_parallelism(model: nn.Module, mode: str, forward_methods: tuple[str, ...] = ()) -> nn.Module:
    """Wrap `model` for data parallelism; returns the module to call for forward passes.

    * "ddp": `DistributedDataParallel` (gradients of trainable parameters all-reduced; parameters unused by a
      batch, e.g. the sound head on a video-only batch, are allowed).
    * "fsdp": FSDP2 `fully_shard` on each decoder layer and on the root, so parameters, gradients and optimizer
      state are sharded across ranks (the frozen text tower too). `forward_methods` are other entry points that
      run the model's layers (e.g. `encode_text`), registered so that FSDP gathers the parameters for them too.
      The model is changed in place and returned.
    * "none": the model itself.
    """
    if mode not in PARALLELISM:
        raise ValueError(f"`parallelism` must be one of {list(PARALLELISM)}, got {mode!r}.")
    if mode == "none":
        return model
    if not (dist.is_available() and dist.is_initialized()):
        return model  # one process without a group: nothing to synchronise or shard
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model
