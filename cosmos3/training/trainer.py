"""Fine-tuning the generation tower with the rectified-flow objective (single process; see the issue notes for
what scale-out adds).

* **What trains**: the generation tower and the modality heads (`*_moe_gen`, `add_*`, `to_add_out`,
  `norm_added_*`, `proj_in/out`, `time_embedder`, sound and action projections), as upstream SFT does; the
  understanding tower is frozen and its keys/values are computed under `no_grad` through the same `forward`
  (`encode_text` + `text_kv_cache`), so there is no separate training path through the model.
* **Objective**: per sample a timestep from the recipe's distribution (shifted), `x_t = t*noise + (1-t)*x0` on the
  noisy frames/tokens, the velocity `noise - x0` as target, MSE masked to noisy frames, noisy action tokens and
  the embodiment's raw action channels, modality weights from `cosmos3.flow`.
* **Guard**: a step whose loss or gradient norm is not finite is skipped before the optimizer touches anything.
* **Nothing lost**: a checkpoint is a folder written under a temporary name, completed by a `COMPLETE` marker,
  then renamed into place; resuming picks the newest complete one (partial or corrupt ones are reported and
  skipped) and continues with the same data order, so an interrupted run ends where an uninterrupted one does.
  Everything is safetensors + JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .. import flow
from ..models.layout import Cosmos3Sample
from ..models.transformer_cosmos3 import Cosmos3Transformer

# Parameter-name pieces of the generation tower and the heads (everything else is the frozen text tower).
GENERATION_PARAMETERS = (
    "_moe_gen", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_q", "norm_added_k",
    "proj_in", "proj_out", "time_embedder", "audio_", "action_", "k_norm_und_for_gen",
)  # fmt: skip


@dataclass
class Example:
    """One training sample: prompt ids and clean latents (what a dataset yields after tokenization).

    Args:
        text_ids: prompt token ids.
        vision: clean vision latents `[C, T, H, W]`.
        vision_condition_frames: latent frames given clean (i2v / v2v / world-action), excluded from the loss.
        fps: clip frame rate (None for images).
        sound: clean sound latents `[C_s, T_s]` or None.
        action: clean actions padded to the model width `[N, action_dim]` or None.
        action_condition: action tokens given clean (forward dynamics).
        action_domain_id, raw_action_dim: the embodiment and its unpadded width (loss is masked beyond it).
    """

    text_ids: Sequence[int]
    vision: Tensor
    vision_condition_frames: tuple[int, ...] = ()
    fps: float | None = None
    sound: Tensor | None = None
    action: Tensor | None = None
    action_condition: tuple[int, ...] = ()
    action_domain_id: int = 0
    raw_action_dim: int | None = None


@dataclass
class TrainConfig:
    """Flat training settings (a TOML file maps onto these fields one to one)."""

    output_dir: str
    max_steps: int = 1000
    batch_size: int = 1
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

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "save_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0, got {self.learning_rate!r}.")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay!r}.")
        if self.timestep_distribution not in flow.TIMESTEP_DISTRIBUTIONS:
            raise ValueError(f"`timestep_distribution` must be one of {list(flow.TIMESTEP_DISTRIBUTIONS)}, "
                             f"got {self.timestep_distribution!r}.")


def trainable_parameters(model: Cosmos3Transformer) -> dict[str, torch.nn.Parameter]:
    """The generation tower and heads; freezes the rest (the understanding tower, embeddings, lm_head)."""
    out = {}
    for name, param in model.named_parameters():
        train = any(piece in name for piece in GENERATION_PARAMETERS)
        param.requires_grad_(train)
        if train:
            out[name] = param
    return out


class Trainer:
    """Rectified-flow fine-tuning of a `Cosmos3Transformer` on a sequence of `Example`s (see module docstring)."""

    def __init__(self, model: Cosmos3Transformer, dataset: Sequence[Example], config: TrainConfig,
                 log: Callable[[dict], None] | None = None):
        if len(dataset) < config.batch_size:
            raise ValueError(f"The dataset has {len(dataset)} examples, fewer than `batch_size`={config.batch_size}.")
        self.model, self.dataset, self.config = model, dataset, config
        self.log = log or (lambda record: print(json.dumps(record), flush=True))
        self.params = trainable_parameters(model)
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=config.learning_rate, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.ema = {name: p.detach().clone() for name, p in self.params.items()}
        self.step = 0
        self.skipped_steps = 0

    # ------------------------------------------------------------------------------------------------ data order

    def _batch_indices(self, step: int) -> list[int]:
        """The examples of `step`: a fresh seeded permutation each epoch, so a resumed run sees the same order."""
        n, size = len(self.dataset), self.config.batch_size
        per_epoch = n // size
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch))
        return order[position * size : (position + 1) * size].tolist()

    # ---------------------------------------------------------------------------------------------------- the loss

    def loss(self, examples: Sequence[Example], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """The weighted, masked flow-matching loss of a batch, and its per-modality parts."""
        model, cfg = self.model, self.config
        device, dtype = model.device, model.dtype
        B = len(examples)
        t = flow.shift_timesteps(flow.sample_timesteps(B, cfg.timestep_distribution, generator=generator),
                                 cfg.timestep_shift)
        samples, x_t = [], {"vision": [], "sound": [], "action": []}
        per_modality = {"vision": [], "sound": [], "action": []}
        for b, ex in enumerate(examples):
            samples.append(Cosmos3Sample(
                text_ids=list(ex.text_ids), vision_shape=tuple(ex.vision.shape[1:]), fps=ex.fps,
                vision_condition_frames=ex.vision_condition_frames,
                sound_length=0 if ex.sound is None else ex.sound.shape[1],
                action_length=0 if ex.action is None else ex.action.shape[0],
                action_condition_frames=ex.action_condition, action_domain_id=ex.action_domain_id,
            ))
            for name, x0, clean in (("vision", ex.vision, ex.vision_condition_frames), ("sound", ex.sound, ()),
                                    ("action", ex.action, ex.action_condition)):
                if x0 is None:
                    x_t[name].append(None)
                    continue
                x0 = x0.float()
                noise = torch.randn(x0.shape, generator=generator)
                # which positions are clean (conditioning): frames of vision ([C, T, ...] axis 1), tokens of actions
                axis = 1 if name == "vision" else 0
                clean_mask = torch.zeros(x0.shape[axis])
                clean_mask[list(clean)] = 1.0
                clean_mask = clean_mask.view(*([1] * axis), -1, *([1] * (x0.ndim - axis - 1)))
                x_t[name].append(flow.add_noise(x0, noise, t[b], clean_mask=clean_mask).to(device, dtype))
                loss_mask = (1.0 - clean_mask).expand_as(x0).clone()
                if name == "action" and ex.raw_action_dim is not None:
                    loss_mask[:, ex.raw_action_dim :] = 0.0  # padded channels carry no loss
                per_modality[name].append((b, flow.velocity_target(x0, noise), loss_mask))
        layout = model.build_layout(samples)
        with torch.no_grad():  # the understanding tower is frozen
            text_kv = model.encode_text(layout)
        out = model(
            layout, x_t["vision"], (t * 1000).to(device),
            sound=x_t["sound"] if any(x is not None for x in x_t["sound"]) else None,
            action=x_t["action"] if any(x is not None for x in x_t["action"]) else None,
            text_kv_cache=text_kv,
        )
        predictions = {"vision": out.sample, "sound": out.sound, "action": out.action}
        losses = {}
        for name, items in per_modality.items():
            if not items:
                continue
            errors = [flow.masked_mse(predictions[name][b].float()[None], target[None].to(device),
                                      mask[None].to(device)) for b, target, mask in items]
            losses[name] = torch.stack(errors).mean()
        total = flow.flow_matching_loss(losses, cfg.loss_weights, cfg.loss_scale)
        return total, {k: float(v.detach()) for k, v in losses.items()}

    # ---------------------------------------------------------------------------------------------------- a step

    def train_step(self) -> dict:
        cfg = self.config
        self.model.train()
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)  # the step's own noise
        examples = [self.dataset[i] for i in self._batch_indices(self.step)]
        loss, parts = self.loss(examples, generator)
        self.optimizer.zero_grad(set_to_none=True)
        record = {"step": self.step + 1, "loss": float(loss.detach()), **{f"loss_{k}": v for k, v in parts.items()}}
        if not torch.isfinite(loss):
            record["skipped"] = "non-finite loss"
        else:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.grad_clip)
            record["grad_norm"] = float(grad_norm)
            if not torch.isfinite(grad_norm):
                record["skipped"] = "non-finite gradient norm"
            else:
                self.optimizer.step()
                with torch.no_grad():
                    for name, p in self.params.items():
                        self.ema[name].lerp_(p.detach(), 1.0 - cfg.ema_decay)
        if "skipped" in record:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        self.step += 1
        return record

    def train(self) -> list[dict]:
        """Resume from the newest complete checkpoint, if any, then train to `max_steps`, saving as configured.

        On CPU, denormal floats are flushed to zero while training (and the setting is switched off afterwards):
        Adam's second moments of parameters with tiny gradients become denormal and made CPU steps ~25x slower
        in our measurements; values that small change nothing in the update.
        """
        self.resume()
        records = []
        flush = self.model.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            while self.step < self.config.max_steps:
                start = time.perf_counter()
                record = self.train_step()
                record["seconds"] = round(time.perf_counter() - start, 4)
                self.log(record)
                records.append(record)
                if self.step % self.config.save_every == 0 or self.step == self.config.max_steps:
                    self.save()
        finally:
            if flush:
                torch.set_flush_denormal(False)
        return records

    # --------------------------------------------------------------------------------------------- checkpoints

    def _checkpoint_dir(self, step: int) -> str:
        return os.path.join(self.config.output_dir, f"checkpoint-{step:08d}")

    def save(self) -> str:
        """Write the checkpoint of the current step atomically; prune old ones. Returns its folder."""
        final = self._checkpoint_dir(self.step)
        tmp = final + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        weights = {k: v.detach().contiguous().cpu() for k, v in self.params.items()}
        save_file(weights, os.path.join(tmp, "model.safetensors"))
        save_file({k: v.contiguous().cpu() for k, v in self.ema.items()}, os.path.join(tmp, "ema.safetensors"))
        state = {}
        for i, param in enumerate(self.params.values()):
            for key, value in self.optimizer.state.get(param, {}).items():
                state[f"{i}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
        save_file(state, os.path.join(tmp, "optimizer.safetensors"))
        meta = {"step": self.step, "skipped_steps": self.skipped_steps, "parameters": list(self.params),
                "config": asdict(self.config)}
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(meta, f, indent=2, default=list)
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:  # written last: its presence means all of the above is
            f.write("ok\n")
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self._prune()
        return final

    def _prune(self) -> None:
        done = sorted(d for d in os.listdir(self.config.output_dir) if d.startswith("checkpoint-") and
                      not d.endswith(".partial"))
        for old in done[: -self.config.keep_checkpoints]:
            shutil.rmtree(os.path.join(self.config.output_dir, old), ignore_errors=True)

    def resume(self) -> int | None:
        """Load the newest complete checkpoint in `output_dir`; partial or corrupt ones are skipped with a message."""
        root = self.config.output_dir
        if not os.path.isdir(root):
            return None
        for name in sorted((d for d in os.listdir(root) if d.startswith("checkpoint-")), reverse=True):
            folder = os.path.join(root, name)
            if name.endswith(".partial") or not os.path.exists(os.path.join(folder, "COMPLETE")):
                self.log({"event": "skipping incomplete checkpoint", "path": folder})
                continue
            try:
                self._load(folder)
            except Exception as e:  # a truncated or damaged file: fall back to an older checkpoint
                self.log({"event": "skipping corrupt checkpoint", "path": folder, "error": f"{type(e).__name__}: {e}"})
                continue
            self.log({"event": "resumed", "path": folder, "step": self.step})
            return self.step
        return None

    def _load(self, folder: str) -> None:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            meta = json.load(f)
        if meta["parameters"] != list(self.params):
            raise ValueError("the checkpoint trains a different set of parameters than this model")
        weights = load_file(os.path.join(folder, "model.safetensors"))
        ema = load_file(os.path.join(folder, "ema.safetensors"))
        optimizer = load_file(os.path.join(folder, "optimizer.safetensors"))
        with torch.no_grad():
            for name, param in self.params.items():
                if weights[name].shape != param.shape:
                    raise ValueError(f"{name}: checkpoint {tuple(weights[name].shape)} vs model {tuple(param.shape)}")
                param.copy_(weights[name])
                self.ema[name].copy_(ema[name])
        self.optimizer.state.clear()
        for i, param in enumerate(self.params.values()):
            state = {key.split(".", 1)[1]: value for key, value in optimizer.items() if key.split(".", 1)[0] == str(i)}
            if state:
                self.optimizer.state[param] = {k: v.to(param.device) if k != "step" else v for k, v in state.items()}
        self.step, self.skipped_steps = int(meta["step"]), int(meta["skipped_steps"])


def ema_state_dict(trainer: Trainer) -> dict[str, Tensor]:
    """The full model state dict with the EMA weights in place of the trained ones (for export)."""
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state.update({k: v.clone() for k, v in trainer.ema.items()})
    return state
