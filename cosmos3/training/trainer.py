"""Fine-tuning the generation tower with the rectified-flow objective, from one CPU to many GPUs.

* **What trains**: the generation tower and the modality heads (`*_moe_gen`, `add_*`, `to_add_out`,
  `norm_added_*`, `proj_in/out`, `time_embedder`, sound and action projections), as upstream SFT does; or, with
  `lora_rank > 0`, only LoRA adapters on the generation tower's linear layers (`cosmos3.training.lora`). The
  understanding tower is frozen and its keys/values are computed under `no_grad` through the same `forward`
  (`encode_text` + `text_kv_cache`), so there is no separate training path through the model.
* **Objective**: per sample a timestep from the recipe's distribution (shifted), `x_t = t*noise + (1-t)*x0` on the
  noisy frames/tokens, the velocity `noise - x0` as target, MSE masked to noisy frames, noisy action tokens and
  the embodiment's raw action channels, modality weights from `cosmos3.flow`. Transfer examples (`control`) put
  their control latents clean before the noised target, as the transfer pipeline does; the loss reads the target.
* **Scale-out** (`parallelism` = "ddp" or "fsdp" under `torchrun`): each rank takes an equal slice of the global
  batch; every sample's timestep and noise come from its own generator keyed by (seed, step, position in the
  global batch), and per-modality means are taken over the global batch, so N ranks compute the same loss and
  update as one process with the whole batch.
* **Guard**: a step whose loss or gradient norm is not finite is skipped before the optimizer touches anything.
* **Nothing lost**: checkpoints (`cosmos3.training.checkpoint`) are sharded safetensors written atomically;
  resuming picks the newest complete one (partial or corrupt ones are reported and skipped) and continues with the
  same data order, so an interrupted run ends where an uninterrupted one does. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .. import flow
from ..conditioning import Cosmos3Request
from ..models.transformer_cosmos3 import Cosmos3Transformer
from . import checkpoint, loop, lora
from .parallel import PARALLELISM, all_reduce_sum, apply_parallelism, full, world

# Parameter-name pieces of the generation tower and the heads (everything else is the frozen text tower).
GENERATION_PARAMETERS = (
    "_moe_gen", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_q", "norm_added_k",
    "proj_in", "proj_out", "time_embedder", "audio_", "action_", "k_norm_und_for_gen",
)  # fmt: skip

MIXED_PRECISION = ("no", "bf16")


# A training example is a request whose clean latents hold every frame: the loss target (`Cosmos3Request`).
Example = Cosmos3Request


@dataclass
class TrainConfig:
    """Flat training settings (a TOML file maps onto these fields one to one)."""

    output_dir: str
    max_steps: int = 1000
    batch_size: int = 1  # the global batch: split evenly over the ranks
    learning_rate: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # EMA weight of the old average per step
    timestep_distribution: str = "logitnormal"
    timestep_shift: float = 1.0
    loss_weights: dict = field(default_factory=lambda: dict(flow.LOSS_WEIGHTS))
    loss_scale: float = flow.LOSS_SCALE
    save_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    gradient_checkpointing: bool = False
    parallelism: str = "none"  # "none", "ddp" or "fsdp" (under torchrun)
    mixed_precision: str = "no"  # "bf16": forward and backward under bf16 autocast, fp32 weights and optimizer
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on the generation tower instead of its weights
    lora_alpha: float | None = None  # LoRA scale numerator (None: equal to the rank)
    num_workers: int = 0  # data-loading worker processes
    # Also train the understanding (text) tower, through the generation loss. Off for pretrained checkpoints (it
    # would erode their language model, as upstream keeps it frozen); on for a model trained from scratch
    # (Cosmos3-Tiny), whose random text tower would otherwise give the generation tower nothing to read.
    train_text_tower: bool = False

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "save_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        for name in ("lora_rank", "num_workers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"`{name}` must be an int >= 0, got {value!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0, got {self.learning_rate!r}.")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay!r}.")
        if not self.grad_clip > 0:
            raise ValueError(f"`grad_clip` must be > 0, got {self.grad_clip!r}.")
        if self.timestep_distribution not in flow.TIMESTEP_DISTRIBUTIONS:
            raise ValueError(f"`timestep_distribution` must be one of {list(flow.TIMESTEP_DISTRIBUTIONS)}, "
                             f"got {self.timestep_distribution!r}.")
        if self.parallelism not in PARALLELISM:
            raise ValueError(f"`parallelism` must be one of {list(PARALLELISM)}, got {self.parallelism!r}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"`mixed_precision` must be one of {list(MIXED_PRECISION)}, got {self.mixed_precision!r}.")
        unknown = sorted(set(self.loss_weights) - set(flow.LOSS_WEIGHTS))
        if unknown:
            raise ValueError(f"`loss_weights` has unknown modalities {unknown}; valid: {sorted(flow.LOSS_WEIGHTS)}.")


def trainable_parameters(model: Cosmos3Transformer, train_text_tower: bool = False) -> dict[str, torch.nn.Parameter]:
    """The generation tower and heads (or only the LoRA adapters, when the model has them); freezes the rest
    (everything trains with `train_text_tower`, LoRA aside)."""
    adapters = lora.has_lora(model)
    out = {}
    for name, param in model.named_parameters():
        if adapters:
            train = lora.is_lora_parameter(name)
        else:
            train = train_text_tower or any(piece in name for piece in GENERATION_PARAMETERS)
        param.requires_grad_(train)
        if train:
            out[name] = param
    return out


def sample_generator(seed: int, step: int, position: int) -> torch.Generator:
    """The generator of one sample of one step: the same on every rank and for every world size."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + position)


class Trainer:
    """Rectified-flow fine-tuning of a `Cosmos3Transformer` on a dataset of `Example`s (see module docstring).

    Args:
        model: the transformer, on this rank's device (LoRA and parallelism are applied here, from the config).
        dataset: a map-style dataset (`len`, `[i]`) of `Example`s, or of raw samples that `transform` turns into
            `Example`s (e.g. `cosmos3.training.datasets.LeRobotDataset` + `cosmos3.training.encode.ExampleEncoder`).
        config: the `TrainConfig`.
        log: called with one dict per step and per event (default: JSON lines on stdout, rank 0 only).
        transform: applied to each sample in the loader's worker processes (`config.num_workers`); samples whose
            decoding or transform fails are counted, reported through `log` and skipped.
    """

    def __init__(self, model: Cosmos3Transformer, dataset: Sequence, config: TrainConfig,
                 log: Callable[[dict], None] | None = None, transform: Callable | None = None):
        if len(dataset) < config.batch_size:
            raise ValueError(f"The dataset has {len(dataset)} examples, fewer than `batch_size`={config.batch_size}.")
        self.rank, self.world_size = world()
        if config.batch_size % self.world_size:
            raise ValueError(f"`batch_size`={config.batch_size} must be a multiple of the number of processes "
                             f"({self.world_size}): each rank takes an equal slice of the batch.")
        self.dataset, self.config, self.transform = dataset, config, transform
        self.bad_samples = 0
        self.log = log or ((lambda r: print(json.dumps(r), flush=True)) if self.rank == 0 else (lambda r: None))
        if config.lora_rank:
            model = lora.add_lora(model, config.lora_rank, config.lora_alpha)
        trainable_parameters(model, config.train_text_tower)
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.model = model
        self.forward_model = apply_parallelism(model, config.parallelism, forward_methods=("encode_text",))
        # after wrapping: under FSDP these are the sharded DTensor parameters
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = loop.adamw(self.params, lr=config.learning_rate, betas=config.betas,
                                    weight_decay=config.weight_decay)
        self.ema = {name: p.detach().clone() for name, p in self.params.items()}
        self.step = 0
        self.skipped_steps = 0

    # ------------------------------------------------------------------------------------------------ data order

    def _batch_indices(self, step: int) -> list[int]:
        """The global batch of `step`: a fresh seeded permutation each epoch, so a resumed run sees the same order."""
        n, size = len(self.dataset), self.config.batch_size
        per_epoch = n // size
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch))
        return order[position * size : (position + 1) * size].tolist()

    def _local_positions(self) -> range:
        """This rank's slice of the global batch (positions, not dataset indices)."""
        per_rank = self.config.batch_size // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def _batches(self, start: int) -> Iterator[list[tuple[int, Example]]]:
        """This rank's `(position in the global batch, example)` pairs of every step from `start`, in order, loaded
        by `DataLoaderWithSkips` (worker processes, bad samples skipped and reported)."""
        from .datasets import DataLoaderWithSkips

        def local(step):
            indices = self._batch_indices(step)
            return [indices[p] for p in self._local_positions()]

        def report(message):
            self.bad_samples += 1 if message.startswith("Skipped") else 0
            self.log({"event": "bad sample", "step": self.step + 1, "message": message})

        loader = DataLoaderWithSkips(_Indexed(self.dataset), (local(s) for s in range(start, self.config.max_steps)),
                                     num_workers=self.config.num_workers, transform=_PairTransform(self.transform),
                                     log=report)
        for step, pairs in zip(range(start, self.config.max_steps), loader):
            position = {index: p for p, index in enumerate(self._batch_indices(step))}
            yield [(position[index], example) for index, example in pairs]

    # ---------------------------------------------------------------------------------------------------- the loss

    def _autocast(self):
        if self.config.mixed_precision == "bf16":
            return torch.autocast(self.model.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss(self, examples: Sequence[Example], generators: torch.Generator | Sequence[torch.Generator]
             ) -> tuple[Tensor, dict[str, float]]:
        """The weighted, masked flow-matching loss of this rank's `examples`, and the per-modality parts.

        `generators`: one per example (its timestep and noise), or one shared generator. Per-modality means are over
        the samples of the whole global batch that have the modality (counts are all-reduced), scaled so that the
        average of the ranks' losses, which is what data-parallel gradients average, is the global batch's loss.
        """
        model, cfg = self.model, self.config
        device, dtype = model.device, model.dtype
        if isinstance(generators, torch.Generator):
            generators = [generators] * len(examples)
        if len(generators) != len(examples):
            raise ValueError(f"{len(generators)} generators for {len(examples)} examples.")
        samples, x_t, per_modality, t = [], {"vision": [], "sound": [], "action": []}, {}, []
        for b, (ex, gen) in enumerate(zip(examples, generators)):
            t_b = flow.shift_timesteps(flow.sample_timesteps(1, cfg.timestep_distribution, generator=gen),
                                       cfg.timestep_shift)[0]
            t.append(t_b)
            samples.append(ex.to_sample())
            for name, x0 in (("vision", ex.vision), ("sound", ex.sound), ("action", ex.action)):
                if x0 is None:
                    x_t[name].append(None)
                    continue
                x0 = x0.float()
                noise = torch.randn(x0.shape, generator=gen)
                clean_mask = ex.clean_mask(name)
                noised = flow.add_noise(x0, noise, t_b, clean_mask=clean_mask).to(device, dtype)
                # transfer: the control clips go in clean before the target (`to_sample` lays them out so)
                x_t[name].append(ex.model_vision(noised) if name == "vision" else noised)
                loss_mask = ex.loss_mask(name)
                if loss_mask.any():
                    per_modality.setdefault(name, []).append((b, flow.velocity_target(x0, noise), loss_mask))
        t = torch.stack(t)
        layout = model.build_layout(samples)
        with self._autocast():
            with contextlib.nullcontext() if self.config.train_text_tower else torch.no_grad():
                text_kv = model.encode_text(layout)  # frozen understanding tower: no graph
            out = self.forward_model(
                layout, x_t["vision"], (t * 1000).to(device),
                sound=x_t["sound"] if any(x is not None for x in x_t["sound"]) else None,
                action=x_t["action"] if any(x is not None for x in x_t["action"]) else None,
                text_kv_cache=text_kv,
            )
        # the target is the last T frames of each vision prediction (transfer's control frames come first, are clean
        # and carry no loss); for every other example that is the whole prediction
        vision = [v[:, v.shape[1] - ex.vision_shape[1] :] for v, ex in zip(out.sample, examples)]
        predictions = {"vision": vision, "sound": out.sound, "action": out.action}
        # samples per modality over the global batch (the same on every rank)
        names = list(flow.LOSS_WEIGHTS)
        counts = all_reduce_sum(torch.tensor([float(len(per_modality.get(m, ()))) for m in names]))
        sums, parts = {}, {}
        for name, count in zip(names, counts.tolist()):
            if count == 0:
                continue
            errors = [flow.masked_mse(predictions[name][b].float()[None], target[None].to(device),
                                      mask[None].to(device)) for b, target, mask in per_modality.get(name, ())]
            local = torch.stack(errors).sum() if errors else predictions["vision"][0].sum() * 0.0
            sums[name] = local * (self.world_size / count)
            parts[name] = float(all_reduce_sum(local.detach().float().cpu())) / count
        total = flow.flow_matching_loss(sums, cfg.loss_weights, cfg.loss_scale)
        if cfg.parallelism == "fsdp" and self.world_size > 1:
            # FSDP2 reduce-scatters the root's gradients as one buffer, so every rank must produce a gradient for
            # every root parameter, also for heads its own samples did not use (sound, actions): a zero one. The
            # root stays unsharded between forward and backward, so these are the gathered parameters.
            root = [p for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith("layers.")]
            total = total + 0.0 * sum(p.float().sum() for p in root)
        return total, parts

    # ---------------------------------------------------------------------------------------------------- a step

    def train_step(self, batch: Sequence[tuple[int, Example]] | None = None) -> dict:
        """One optimizer step on this rank's `(position, example)` pairs of the current step (read from the dataset
        if None). When any rank has no example left (all its samples failed to load), every rank skips the step."""
        cfg = self.config
        self.model.train()
        if batch is None:
            indices = self._batch_indices(self.step)
            batch = [(p, self.dataset[indices[p]]) for p in self._local_positions()]
        if float(all_reduce_sum(torch.tensor([float(len(batch) == 0)]))) > 0:
            self.skipped_steps += 1
            self.step += 1
            return {"step": self.step, "skipped": "no valid samples in a batch"}
        examples = [example for _, example in batch]
        generators = [sample_generator(cfg.seed, self.step, p) for p, _ in batch]
        loss, parts = self.loss(examples, generators)
        global_loss = float(all_reduce_sum(loss.detach().float().cpu())) / self.world_size
        record = {"step": self.step + 1, "loss": global_loss, **{f"loss_{k}": v for k, v in parts.items()},
                  "samples": int(all_reduce_sum(torch.tensor([float(len(batch))])))}
        # The global loss decides, so that every rank skips together; a head no sample of the batch used (sound,
        # actions) gets a zero gradient, not none, as under FSDP (where it must produce one).
        grad_norm, skipped = loop.guarded_update(loss, self.params, self.optimizer, cfg.grad_clip,
                                                 loss_value=global_loss, zero_missing_grads=True)
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if skipped:
            record["skipped"] = skipped
            self.skipped_steps += 1
        else:
            loop.ema_update(self.ema, self.params, cfg.ema_decay)
        self.step += 1
        return record

    def train(self) -> list[dict]:
        """Resume from the newest complete checkpoint, if any, then train to `max_steps`, saving as configured.

        On CPU, denormal floats are flushed to zero while training (`loop.cpu_settings` says why).
        """
        self.resume()
        batches = self._batches(self.step)
        return loop.run(self, lambda: self.train_step(next(batches)), self.config.max_steps, self.config.save_every,
                        flush_denormal=self.model.device.type == "cpu")

    # --------------------------------------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, Tensor]:
        """Everything a resume needs, as a flat dict of (possibly sharded) tensors."""
        return loop.checkpoint_state(self.params, self.optimizer, self.ema)

    def save(self) -> str:
        """Write the checkpoint of the current step (all ranks call this); returns its folder."""
        return loop.save(self, self.config.output_dir, self.config.keep_checkpoints, ("skipped_steps",),
                         world_size=self.world_size, config=asdict(self.config))

    def resume(self) -> int | None:
        """Load the newest complete checkpoint in `output_dir`; partial or corrupt ones are skipped with a message."""
        return loop.resume(self, self.config.output_dir, ("skipped_steps",))

    # ------------------------------------------------------------------------------------------------- export

    def full_state_dict(self, use_ema: bool = True) -> dict[str, Tensor]:
        """The whole model's state dict in the reference layout (collective under FSDP): trained (or EMA) weights
        over the frozen ones, LoRA adapters merged into their base weights, on the CPU."""
        trained = self.ema if use_ema else {n: p.detach() for n, p in self.params.items()}
        state = {}
        for name, value in self.model.state_dict().items():
            value = trained.get(name, value)
            state[name] = full(value.detach()).cpu().clone()
        return lora.merged_state_dict(self.model, state) if lora.has_lora(self.model) else state

    def export(self, transformer_dir: str, use_ema: bool = True) -> str | None:
        """Write the trained transformer as a diffusers folder (config + safetensors) that `from_pretrained` of
        ours and of the reference load; all ranks call this, rank 0 writes, and every rank returns once the folder
        is complete (a barrier). Returns the folder on rank 0."""
        state = self.full_state_dict(use_ema)
        try:
            return save_transformer(dict(self.model.config), state, transformer_dir) if self.rank == 0 else None
        finally:
            checkpoint._barrier()  # also when rank 0's write fails: the others must not wait for it forever


class _Indexed(torch.utils.data.Dataset):
    """`dataset[i]` as `(i, sample)`, so the trainer knows each loaded sample's place in its batch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[index]

    def sample_path(self, index: int) -> str | None:
        path = getattr(self.dataset, "sample_path", None)
        return path(index) if path is not None else None


class _PairTransform:
    """Applies the user's transform to the sample of an `(index, sample)` pair (picklable for worker processes)."""

    def __init__(self, transform: Callable | None):
        self.transform = transform

    def __call__(self, pair):
        index, sample = pair
        return index, sample if self.transform is None else self.transform(sample)


def save_transformer(config: dict, state: dict[str, Tensor], out_dir: str) -> str:
    """Save `state` as a `Cosmos3Transformer` folder at `out_dir`, atomically (written aside, then renamed)."""
    from ..io import atomic_directory

    model = Cosmos3Transformer.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"cannot export: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} keys.")
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
    return out_dir


def ema_state_dict(trainer: Trainer) -> dict[str, Tensor]:
    """The full model state dict with the EMA weights in place of the trained ones (for export)."""
    return trainer.full_state_dict(use_ema=True)
