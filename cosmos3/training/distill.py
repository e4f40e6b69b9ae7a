"""Few-step distillation of the generation tower: DMD2 in rectified-flow form, with backward simulation.

What the released `-4Step` students are (see the README's "Distillation" section): a student that samples
in 4 steps at sigmas `[1, 15/16, 5/6, 5/8]` with stochastic re-noising, the teacher's classifier-free guidance baked
in (the student runs with guidance 1), trained with DMD2 against a fake-score critic updated 5 times per student
update. Here, with the same pieces as `Trainer`:

* **Three networks, one text tower.** The student and the critic start as copies of the teacher's trainable
  generation tower (`trainable_parameters`); the understanding tower (and `k_norm_und_for_gen`, which acts on
  text keys only) is *shared*, not copied, and frozen, so its keys/values are computed once per batch with
  `encode_text` under `no_grad` and read by all three. The teacher is frozen.
* **Backward simulation.** The student's input at schedule step `k` is what the student itself produces from pure
  noise through steps `0..k-1` (no grad), with the pipeline's re-noising rule (`_renoise_step`: `x0 = x - s_i v`,
  then `(1 - s_{i+1}) x0 + s_{i+1} * fresh noise`, clean conditioning frames put back), so training inputs are the
  inputs the distilled pipeline feeds it.
* **Distribution matching (student).** The student's `x0` is re-noised at a random `t`; the teacher ("real
  score", with CFG `v_u + g (v_c - v_u)`) and the critic ("fake score", conditional) predict `x0` from it; the
  gradient `(fake_x0 - real_x0) / mean|x0 - real_x0|` (per sample, DMD's normalization) is applied through the
  MSE-to-a-stop-gradient-target trick: `0.5 * |x0 - sg(x0 - grad)|^2`. Descending it moves samples from where the
  critic says the student's distribution is toward where the teacher says the data is (reverse-KL gradient).
* **Critic.** The ordinary rectified-flow (velocity) loss on the student's detached samples, so it tracks the
  student's distribution. One step of `Distiller` is one critic update; every `critic_updates_per_student_update`-th
  step (starting with the first) also updates the student (DMD2's two-time-scale rule).
* **Nothing lost**, as `Trainer` and with its checkpoint format (`cosmos3.training.checkpoint`): atomic checkpoints
  (student, critic, both optimizers, student EMA, step) under a `COMPLETE` marker, resume from the newest complete
  one with the same data order and noise, non-finite steps skipped before the optimizer.
* **Scale-out** (`parallelism="fsdp"` under `torchrun`): as `Trainer`, each rank takes an equal slice of the global
  batch, and every sample's noise and re-noising `t` come from its own generator keyed by (seed, step, position in
  the global batch), so N ranks compute the losses and updates of one process with the whole batch. The teacher,
  the student and the critic are sharded with FSDP2 over all ranks; the shared text tower is sharded once (with the
  teacher) and the student's and critic's entries point at those shards (they read only the cached keys/values).
* **Export.** `export_student` writes a pipeline folder with `distilled_sigmas` (in `modular_model_index.json`,
  where the released students carry it; `model_index.json` keeps only keys the reference accepts) that
  `Cosmos3TextToImagePipeline.from_pretrained` (or the video pipelines) loads as a fixed-schedule, guidance-1 student.

Conditioning frames (image-to-video) are supported: they stay clean through simulation and re-noising and carry no
loss. Sound and actions are not (the distilled pipeline path refuses them too).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .. import flow
from ..conditioning import Cosmos3Request, guide, keep_clean, renoise
from ..io import atomic_directory
from ..models.layout import Cosmos3Layout
from ..models.transformer_cosmos3 import Cosmos3TextKVCache, Cosmos3Transformer
from . import checkpoint, loop
from .parallel import all_reduce_sum, full, world
from .trainer import Trainer, sample_generator, trainable_parameters

# The released 4-step students' schedule (cosmos3.md, "Distillation").
DEFAULT_STUDENT_SIGMAS: tuple[float, ...] = (1.0, 15 / 16, 5 / 6, 5 / 8)
# Generation-tower parameters that act on the text keys only: computed once per batch, so shared and frozen.
_TEXT_SIDE_PARAMETERS = ("k_norm_und_for_gen",)
PARALLELISM = ("none", "fsdp")
# Offsets the distiller's noise streams from `Trainer`'s: the same (seed, step, position) would otherwise give a
# teacher fine-tuned with the same seed the noise and timesteps it trained on, correlating the two runs. An offset
# of the position (batches stay below 2**15 samples), since the CPU generator keeps only a seed's low 32 bits.
_STREAM = 2**15


@dataclass
class DistillConfig:
    """Flat distillation settings (a TOML file maps onto these fields one to one). Defaults: the reference recipe."""

    output_dir: str
    max_steps: int = 1000  # critic updates; the student updates on every `critic_updates_per_student_update`-th
    batch_size: int = 1
    student_learning_rate: float = 2e-6
    critic_learning_rate: float = 4e-7
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.0
    guidance_scale: float = 6.0  # the teacher's CFG, baked into the student (which then runs with guidance 1)
    student_sigmas: list[float] = field(default_factory=lambda: list(DEFAULT_STUDENT_SIGMAS))
    critic_updates_per_student_update: int = 5
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # EMA weight of the old average per student update
    # The `t` at which the student's samples are re-noised for the scores and for the critic's loss:
    # `min_timestep + (max_timestep - min_timestep) * shift(sample(timestep_distribution))`.
    timestep_distribution: str = "uniform"
    timestep_shift: float = 1.0
    min_timestep: float = 0.02
    max_timestep: float = 0.98
    temporal_compression: int = 4  # the VAE's (position ids of video frames)
    save_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    gradient_checkpointing: bool = False
    parallelism: str = "none"  # "fsdp": the three networks sharded with FSDP2 over the ranks (under torchrun)

    def __post_init__(self):
        if self.parallelism not in PARALLELISM:
            raise ValueError(f"`parallelism` must be one of {list(PARALLELISM)}, got {self.parallelism!r}.")
        for name in ("max_steps", "batch_size", "save_every", "keep_checkpoints", "critic_updates_per_student_update",
                     "temporal_compression"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        for name in ("student_learning_rate", "critic_learning_rate", "grad_clip", "timestep_shift"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value!r}.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {self.betas!r}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay!r}.")
        if not (isinstance(self.guidance_scale, (int, float)) and 1.0 <= self.guidance_scale < float("inf")):
            raise ValueError(f"`guidance_scale` must be a finite number >= 1 (1: no guidance), got "
                             f"{self.guidance_scale!r}.")
        sigmas = list(self.student_sigmas)
        if (not sigmas or sigmas[0] != 1.0 or any(not 0 < s <= 1 for s in sigmas)
                or any(b >= a for a, b in zip(sigmas, sigmas[1:]))):
            raise ValueError("`student_sigmas` must start at 1.0 (the pipeline starts from pure noise) and decrease "
                             f"strictly within (0, 1], got {self.student_sigmas!r}.")
        self.student_sigmas = [float(s) for s in sigmas]
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay!r}.")
        if self.timestep_distribution not in flow.TIMESTEP_DISTRIBUTIONS:
            raise ValueError(f"`timestep_distribution` must be one of {list(flow.TIMESTEP_DISTRIBUTIONS)}, "
                             f"got {self.timestep_distribution!r}.")
        if not 0 <= self.min_timestep < self.max_timestep <= 1:
            raise ValueError(f"`min_timestep` and `max_timestep` must satisfy 0 <= min < max <= 1, got "
                             f"{self.min_timestep!r} and {self.max_timestep!r}.")


def pipeline_prompts(pipeline, prompts: Sequence[str] | str, negative_prompt: str | Sequence[str] | None = None, *,
                     num_frames: int = 1, height: int = 720, width: int = 1280, fps: float = 24.0,
                     use_system_prompt: bool | None = None, add_resolution_template: bool = True,
                     add_duration_template: bool = True) -> list[Cosmos3Request]:
    """The requests (prompt and negative ids, latent shape, fps) a text-to-image (`num_frames=1`, the defaults of
    `Cosmos3TextToImagePipeline`) or text-to-video pipeline call with these arguments builds, so the student is
    distilled on what it will be asked at inference."""
    return pipeline.prepare_requests(
        prompts, negative_prompt, num_frames=num_frames, height=height, width=width, fps=fps,
        use_system_prompt=use_system_prompt, add_resolution_template=add_resolution_template,
        add_duration_template=add_duration_template)


@dataclass
class _Batch:
    """A batch's static parts: layouts and text caches (conditional, and conditional + negative for the teacher),
    per-sample clean-frame masks `[1, T, 1, 1]` and clean latents."""

    prompts: list[Cosmos3Request]
    layout: Cosmos3Layout
    text_kv: Cosmos3TextKVCache
    cfg_layout: Cosmos3Layout | None
    cfg_text_kv: Cosmos3TextKVCache | None
    clean_masks: list[Tensor]
    clean: list[Tensor]


class Distiller:
    """DMD2 distillation of `teacher` into a few-step student (see the module docstring).

    Args:
        teacher: the model to distill; frozen, and its text tower is shared with the student and the critic.
        dataset: `Cosmos3Request`s, e.g. from `pipeline_prompts`, or training `Example`s (only their ids, latent
            shape, fps and conditioning frames are used; without their own, their negative prompt is `negative_ids`).
        config: the settings.
        log: receives one dict per step and per event (default: JSON lines on stdout, rank 0 only).
        negative_ids: the negative prompt's ids for requests that carry none (required then with guidance).
    """

    # The data order is `Trainer`'s (it reads only `config.seed`, `config.batch_size` and `dataset`): a fresh seeded
    # permutation per epoch, so a resumed run sees the same batches.
    _batch_indices = Trainer._batch_indices

    def __init__(self, teacher: Cosmos3Transformer, dataset: Sequence[Cosmos3Request], config: DistillConfig,
                 log: Callable[[dict], None] | None = None, negative_ids: Sequence[int] | None = None):
        if len(dataset) < config.batch_size:
            raise ValueError(f"The dataset has {len(dataset)} examples, fewer than `batch_size`={config.batch_size}.")
        self.rank, self.world_size = world()
        if self.world_size > 1 and config.parallelism == "none":
            raise ValueError(f"{self.world_size} processes with `parallelism`='none' would train {self.world_size} "
                             "unrelated students; set `parallelism`='fsdp', or launch one process.")
        if config.batch_size % self.world_size:
            raise ValueError(f"`batch_size`={config.batch_size} must be a multiple of the number of processes "
                             f"({self.world_size}): each rank takes an equal slice of the batch.")
        self.teacher, self.dataset, self.config = teacher, dataset, config
        self.negative_ids = None if negative_ids is None else list(negative_ids)
        self.log = log or ((lambda r: print(json.dumps(r), flush=True)) if self.rank == 0 else (lambda r: None))
        self._prompt(dataset[0])  # fail now, not at step 1, on a dataset this cannot use
        names = [n for n in trainable_parameters(teacher) if not any(p in n for p in _TEXT_SIDE_PARAMETERS)]
        # Copies share every parameter outside `names` with the teacher (deepcopy takes them from the memo).
        shared = {id(p): p for n, p in teacher.named_parameters() if n not in names}
        self.student = copy.deepcopy(teacher, memo=dict(shared))
        self.critic = copy.deepcopy(teacher, memo=dict(shared))
        teacher.requires_grad_(False).eval()
        self.student_params = self._trainable(self.student, names)
        self.critic_params = self._trainable(self.critic, names)
        if config.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
            self.critic.enable_gradient_checkpointing()
        self.sharded = config.parallelism == "fsdp" and self.world_size > 1
        if self.sharded:
            self._fully_shard(names)
            # the sharded DTensor parameters that replaced them
            self.student_params = {n: p for n, p in self.student.named_parameters() if n in self.student_params}
            self.critic_params = {n: p for n, p in self.critic.named_parameters() if n in self.critic_params}
        self.student_optimizer = loop.adamw(self.student_params, lr=config.student_learning_rate, betas=config.betas,
                                            weight_decay=config.weight_decay)
        self.critic_optimizer = loop.adamw(self.critic_params, lr=config.critic_learning_rate, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.ema = {name: p.detach().clone() for name, p in self.student_params.items()}
        # The pipeline keeps its sigmas in float32 (`scheduler.sigmas`); so do we, so the student sees the same t.
        self.sigmas = torch.tensor(config.student_sigmas + [0.0], dtype=torch.float32)
        self.step = 0
        self.skipped_student_steps = 0
        self.skipped_critic_steps = 0

    @staticmethod
    def _trainable(model: Cosmos3Transformer, names: Sequence[str]) -> dict[str, torch.nn.Parameter]:
        params = dict(model.named_parameters())
        for p in params.values():
            p.requires_grad_(False)
        for n in names:
            params[n].requires_grad_(True)
        return {n: params[n] for n in names}

    def _fully_shard(self, names: Sequence[str]) -> None:
        """FSDP2 over all ranks. The teacher as for inference (`cosmos3.parallel`): the text tower's projections and
        MLPs, the embedding and the LM head in groups of their own, so that a denoising step gathers the generation
        tower only. The text-side parameters the copies share with the teacher are then pointed at the teacher's
        shards and left out of the copies' groups: they are never run there (the cached keys/values are read) and
        one sharded text tower serves all three. The copies' own groups are their generation towers, per layer."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        teacher = self.teacher
        mesh = init_device_mesh(teacher.device.type, (self.world_size,), mesh_dim_names=("shard",))
        for layer in teacher.layers:
            attn = layer.self_attn
            for module in (attn.to_q, attn.to_k, attn.to_v, attn.to_out, layer.mlp):
                fully_shard(module, mesh=mesh)
            fully_shard(layer, mesh=mesh)
        fully_shard(teacher.embed_tokens, mesh=mesh)
        fully_shard(teacher.lm_head, mesh=mesh)
        # An explicit True: left to FSDP, a root keeps its gathered weights after forward, for a backward the frozen
        # teacher never runs.
        fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
        register_fsdp_forward_method(teacher, "encode_text")
        shards = {n: p for n, p in teacher.named_parameters() if n not in names}
        for model in (self.student, self.critic):
            for name, shard in shards.items():
                path, _, attr = name.rpartition(".")
                model.get_submodule(path)._parameters[attr] = shard
            for layer in model.layers:
                fully_shard(layer, mesh=mesh, ignored_params=set(shards.values()))
            fully_shard(model, mesh=mesh, ignored_params=set(shards.values()))

    # ------------------------------------------------------------------------------------------------- the batch

    def _prompt(self, item: Cosmos3Request) -> Cosmos3Request:
        if not isinstance(item, Cosmos3Request):
            raise TypeError(f"Dataset items must be Cosmos3Request (or training Examples), got {type(item).__name__}.")
        if item.sound_length or item.action is not None:
            raise ValueError("Distillation generates vision only (the distilled pipeline path refuses sound and "
                             "actions); this request has sound or actions.")
        if item.control is not None:
            raise ValueError(f"Distillation does not take transfer requests: this one has `control` clips (shape "
                             f"{tuple(item.control.shape)}), and there is no distilled transfer pipeline (nor one in "
                             f"the reference) to sample them; give requests without `control`.")
        if item.negative_ids is None:
            if self.negative_ids is None and self.config.guidance_scale != 1.0:
                raise ValueError("This request carries no negative prompt (`negative_ids`): pass `negative_ids` to "
                                 "the Distiller when `guidance_scale` != 1.")
            item = dataclasses.replace(item, negative_ids=self.negative_ids or [])
        return item

    def batch(self, prompts: Sequence[Cosmos3Request]) -> _Batch:
        """The static parts of a batch of prompts (layouts, the text keys/values, clean frames), built once per step."""
        prompts = [self._prompt(p) for p in prompts]
        model, cfg = self.teacher, self.config
        cond = [p.to_sample() for p in prompts]
        layout = model.build_layout(cond, temporal_compression=cfg.temporal_compression)
        cfg_layout = cfg_text_kv = None
        with torch.no_grad():  # the text tower is frozen and shared by the three networks
            text_kv = model.encode_text(layout)
            if cfg.guidance_scale != 1.0:  # the teacher's guided pass: conditional samples, then their negatives
                cfg_layout = model.build_layout(cond + [p.to_sample(negative=True) for p in prompts],
                                                temporal_compression=cfg.temporal_compression)
                cfg_text_kv = model.encode_text(cfg_layout)
        masks = [p.clean_mask("vision") for p in prompts]
        clean = [None if p.vision is None else p.vision.float().cpu() * m for p, m in zip(prompts, masks)]
        return _Batch(prompts, layout, text_kv, cfg_layout, cfg_text_kv, masks, clean)

    # ---------------------------------------------------------------------------------------------------- pieces

    def _velocity(self, model: Cosmos3Transformer, batch: _Batch, x: list[Tensor], t: Tensor) -> list[Tensor]:
        """`model`'s velocity (float32) for the conditional samples `x` at per-sample `t` in [0, 1]."""
        out = model(batch.layout, [xi.to(model.device, model.dtype) for xi in x], (t * 1000).to(model.device),
                    text_kv_cache=batch.text_kv).sample
        return [v.float() for v in out]

    def _teacher_velocity(self, batch: _Batch, x: list[Tensor], t: Tensor) -> list[Tensor]:
        """The teacher's guided velocity `v_u + g (v_c - v_u)` in float32, as the pipeline computes it."""
        if batch.cfg_layout is None:
            return self._velocity(self.teacher, batch, x, t)
        model, g = self.teacher, self.config.guidance_scale
        vision = [xi.to(model.device, model.dtype) for xi in x] * 2
        out = model(batch.cfg_layout, vision, (torch.cat([t, t]) * 1000).to(model.device),
                    text_kv_cache=batch.cfg_text_kv).sample
        B = len(x)
        return [guide(out[b].float(), out[B + b].float(), g) for b in range(B)]

    def _with_clean(self, batch: _Batch, x: list[Tensor]) -> list[Tensor]:
        """Put the clean conditioning frames back (as the distilled pipeline does after re-noising)."""
        return [keep_clean(xi, c, m) for xi, m, c in zip(x, batch.clean_masks, batch.clean)]

    def _noise(self, batch: _Batch, generators: list[torch.Generator]) -> list[Tensor]:
        device = self.teacher.device
        return [torch.randn(p.vision_shape, generator=g).to(device) for p, g in zip(batch.prompts, generators)]

    def _sample_t(self, generators: list[torch.Generator]) -> Tensor:
        cfg = self.config
        u = torch.cat([flow.sample_timesteps(1, cfg.timestep_distribution, generator=g) for g in generators])
        return cfg.min_timestep + (cfg.max_timestep - cfg.min_timestep) * flow.shift_timesteps(u, cfg.timestep_shift)

    @torch.no_grad()
    def simulate(self, batch: _Batch, k: int, generators: torch.Generator | Sequence[torch.Generator]
                 ) -> list[Tensor]:
        """Backward simulation: the student's own input at schedule step `k`, from pure noise through steps
        `0..k-1` with the distilled pipeline's rule (predict `x0`, re-noise to the next sigma with fresh noise).
        `generators`: one per sample, or one that all samples draw from in turn."""
        generators = _per_sample(generators, len(batch.prompts))
        x = self._with_clean(batch, self._noise(batch, generators))
        for i in range(k):
            sigma, next_sigma = self.sigmas[i], self.sigmas[i + 1]
            v = self._velocity(self.student, batch, x, sigma.expand(len(x)))
            noise = self._noise(batch, generators)
            x = self._with_clean(batch, [renoise(xi, vi, sigma.item(), next_sigma.item(), n)
                                         for xi, vi, n in zip(x, v, noise)])
        return x

    @torch.no_grad()
    def sample(self, prompts: Sequence[Cosmos3Request], generator: torch.Generator) -> list[Tensor]:
        """The student's full few-step samples (`x0` of the last step), drawing noise as the distilled pipeline does
        for one request with `generator` (so one prompt and a fresh generator reproduce the pipeline's output)."""
        batch = self.batch(prompts)
        last = len(self.config.student_sigmas) - 1
        x = self.simulate(batch, last, generator)
        sigma = self.sigmas[last]
        v = self._velocity(self.student, batch, x, sigma.expand(len(x)))
        return self._with_clean(batch, [xi - sigma.item() * vi for xi, vi in zip(x, v)])

    def dmd_loss(self, batch: _Batch, x0: list[Tensor], generators: torch.Generator | Sequence[torch.Generator]
                 ) -> tuple[Tensor, Tensor]:
        """DMD's distribution-matching loss of the student's `x0` (with grad), the mean over its samples; returns it
        and the re-noising `t`. `generators`: one per sample (its `t`, then its noise), or one shared."""
        B = len(x0)
        generators = _per_sample(generators, B)
        t = self._sample_t(generators)
        noise = self._noise(batch, generators)
        with torch.no_grad():
            x_t = [flow.add_noise(xi.detach(), n, t[b].item(), clean_mask=m.to(xi))
                   for b, (xi, n, m) in enumerate(zip(x0, noise, batch.clean_masks))]
            real = self._teacher_velocity(batch, x_t, t)
            fake = self._velocity(self.critic, batch, x_t, t)
        losses = []
        for b in range(B):
            noisy = (1.0 - batch.clean_masks[b]).to(x0[b]).expand_as(x0[b])
            with torch.no_grad():
                real_x0 = flow.predict_x0(x_t[b], real[b], t[b].item())
                fake_x0 = flow.predict_x0(x_t[b], fake[b], t[b].item())
                # DMD's per-sample normalization: the step is measured in units of how far the teacher is from x0.
                scale = ((x0[b].detach() - real_x0).abs() * noisy).sum() / noisy.sum().clamp_min(1.0)
                grad = torch.nan_to_num((fake_x0 - real_x0) / scale.clamp_min(1e-8)) * noisy
            losses.append(0.5 * flow.masked_mse(x0[b][None], (x0[b] - grad).detach()[None], noisy[None]))
        return torch.stack(losses).mean(), t

    def critic_loss(self, batch: _Batch, x0: list[Tensor], generators: torch.Generator | Sequence[torch.Generator],
                    model: Cosmos3Transformer | None = None) -> Tensor:
        """The rectified-flow (velocity) loss of the critic (or of `model`, e.g. the teacher, to see how much better
        the critic knows the student's distribution) on the student's (detached) samples `x0`, the mean over them."""
        generators = _per_sample(generators, len(x0))
        t = self._sample_t(generators)
        noise = self._noise(batch, generators)
        x_t = [flow.add_noise(xi, n, t[b].item(), clean_mask=m.to(xi))
               for b, (xi, n, m) in enumerate(zip(x0, noise, batch.clean_masks))]
        v = self._velocity(self.critic if model is None else model, batch, x_t, t)
        errors = [flow.masked_mse(vi[None], flow.velocity_target(xi, n)[None], (1.0 - m.to(xi))[None])
                  for vi, xi, n, m in zip(v, x0, noise, batch.clean_masks)]
        return torch.stack(errors).mean()

    def _update(self, loss: Tensor, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                record: dict, name: str) -> bool:
        """Backward and step, unless the loss or the gradient norm is not finite (then nothing changes).

        `loss` is the mean over this rank's slice of the batch; FSDP averages the ranks' gradients, so the update is
        the global batch's. The global loss decides the skip, so that every rank skips together."""
        value = float(all_reduce_sum(loss.detach().float().cpu())) / self.world_size
        record[f"loss_{name}"] = value
        grad_norm, skipped = loop.guarded_update(loss, params, optimizer, self.config.grad_clip, loss_value=value)
        if grad_norm is not None:
            record[f"grad_norm_{name}"] = grad_norm
        if skipped:
            record[f"skipped_{name}"] = skipped
        return skipped is None

    # ---------------------------------------------------------------------------------------------------- a step

    def train_step(self) -> dict:
        cfg = self.config
        self.student.train()
        self.critic.train()
        # Each sample's noise and t from its own generator, keyed by its place in the global batch (a resume redraws
        # them, any world size draws the same); the schedule step from one past the last place, the same on every rank.
        per_rank = cfg.batch_size // self.world_size
        positions = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        generators = [_generator(cfg.seed, self.step, p) for p in positions]
        indices = self._batch_indices(self.step)
        batch = self.batch([self.dataset[indices[p]] for p in positions])
        update_student = self.step % cfg.critic_updates_per_student_update == 0
        k = int(torch.randint(len(cfg.student_sigmas), (1,), generator=_generator(cfg.seed, self.step,
                                                                                cfg.batch_size)))
        x = self.simulate(batch, k, generators)
        record: dict = {"step": self.step + 1, "student_update": update_student, "sigma": cfg.student_sigmas[k]}
        sigma = self.sigmas[k]
        with torch.set_grad_enabled(update_student):
            v = self._velocity(self.student, batch, x, sigma.expand(len(x)))
            x0 = self._with_clean(batch, [xi - sigma.item() * vi for xi, vi in zip(x, v)])
        if update_student:
            loss, _ = self.dmd_loss(batch, x0, generators)
            if self._update(loss, self.student_params, self.student_optimizer, record, "dmd"):
                loop.ema_update(self.ema, self.student_params, cfg.ema_decay)
            else:
                self.skipped_student_steps += 1
        loss = self.critic_loss(batch, [xi.detach() for xi in x0], generators)
        if not self._update(loss, self.critic_params, self.critic_optimizer, record, "critic"):
            self.skipped_critic_steps += 1
        self.step += 1
        return record

    def train(self) -> list[dict]:
        """Resume from the newest complete checkpoint, if any, then run to `max_steps`, saving as configured.

        On CPU, denormals are flushed while training (as `Trainer.train` does, for the same ~25x slowdown)."""
        self.resume()
        return loop.run(self, self.train_step, self.config.max_steps, self.config.save_every,
                        flush_denormal=self.teacher.device.type == "cpu")

    # --------------------------------------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, Tensor]:
        """Everything a resume needs, as a flat dict of tensors (the `cosmos3.training.checkpoint` format)."""
        return {**loop.checkpoint_state(self.student_params, self.student_optimizer, prefix="student",
                                        optim_prefix="student_optim"),
                **loop.checkpoint_state(self.critic_params, self.critic_optimizer, prefix="critic",
                                        optim_prefix="critic_optim"),
                **{f"ema.{name}": value for name, value in self.ema.items()}}

    _COUNTERS = ("skipped_student_steps", "skipped_critic_steps")

    def save(self) -> str:
        """Write the checkpoint of the current step atomically (`checkpoint.save`); returns its folder."""
        return loop.save(self, self.config.output_dir, self.config.keep_checkpoints, self._COUNTERS,
                         world_size=self.world_size, config=asdict(self.config))

    def resume(self) -> int | None:
        """Load the newest complete checkpoint in `output_dir`; partial or corrupt ones are skipped with a message."""
        return loop.resume(self, self.config.output_dir, self._COUNTERS)

    # ---------------------------------------------------------------------------------------------------- export

    def student_state_dict(self, ema: bool = True) -> dict[str, Tensor]:
        """The student's whole state dict (its EMA weights with `ema`, the teacher's text tower) on the CPU;
        collective under FSDP."""
        trained = self.ema if ema else {n: p.detach() for n, p in self.student_params.items()}
        return {name: full(trained.get(name, value).detach()).cpu().clone()
                for name, value in self.student.state_dict().items()}

    def export(self, pipeline, save_directory: str | None, ema: bool = True) -> str | None:
        """Write the student (its EMA weights with `ema`) as a distilled pipeline folder; see `export_student`.

        Under FSDP every rank calls this (the weights are gathered), rank 0 writes (the others may pass None), and
        all return once the folder is complete. Returns the folder on rank 0."""
        if self.sharded:
            state = self.student_state_dict(ema)
            try:
                if self.rank != 0:
                    return None
                student = Cosmos3Transformer.from_config(self.student.config)
                student.load_state_dict(state)
                return export_student(student, pipeline, save_directory, self.config.student_sigmas)
            finally:
                checkpoint._barrier()  # also when rank 0's write fails: the others must not wait for it forever
        backup = {}
        try:
            if ema:  # swap the EMA in and back rather than copying the whole model
                with torch.no_grad():
                    for name, p in self.student_params.items():
                        backup[name] = p.detach().clone()
                        p.copy_(self.ema[name])
            return export_student(self.student, pipeline, save_directory, self.config.student_sigmas)
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    self.student_params[name].copy_(value)


def _generator(seed: int, step: int, position: int) -> torch.Generator:
    return sample_generator(seed, step, _STREAM + position)


def _per_sample(generators: torch.Generator | Sequence[torch.Generator], n: int) -> list[torch.Generator]:
    if isinstance(generators, torch.Generator):
        return [generators] * n
    if len(generators) != n:
        raise ValueError(f"{len(generators)} generators for {n} samples; give one per sample, or one generator.")
    return list(generators)


def export_student(student: Cosmos3Transformer, pipeline, save_directory: str,
                   sigmas: Sequence[float] = DEFAULT_STUDENT_SIGMAS) -> str:
    """Save `student` with `pipeline`'s tokenizer and VAE as a distilled pipeline folder, atomically.

    The folder holds the full transformer state dict (the teacher's text tower, the student's generation tower),
    the re-noising scheduler of the distilled path (`FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`),
    and `sigmas` in `modular_model_index.json` (where the released students carry it; `save_pretrained` writes it),
    so `from_pretrained` gives a pipeline that runs `len(sigmas)` steps at guidance 1.
    `save_directory` must not exist or be empty. Returns it.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..pipelines.text_to_video import Cosmos3TextToVideoPipeline

    save_directory = os.fspath(save_directory)
    if os.path.exists(save_directory) and (not os.path.isdir(save_directory) or os.listdir(save_directory)):
        raise FileExistsError(f"{save_directory!r} exists and is not an empty folder; export into a new one.")
    sigmas = [float(s) for s in sigmas]
    student_pipeline = Cosmos3TextToVideoPipeline(
        transformer=student, text_tokenizer=pipeline.text_tokenizer, vae=pipeline.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=1.0),
        sound_tokenizer=getattr(pipeline, "sound_tokenizer", None),
        default_use_system_prompt=pipeline.config.default_use_system_prompt, distilled_sigmas=sigmas,
    )
    with atomic_directory(save_directory) as tmp:  # an empty `save_directory` (checked above) is replaced
        student_pipeline.save_pretrained(tmp)  # the sigmas go to `modular_model_index.json`
    return save_directory
