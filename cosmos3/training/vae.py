"""Train a small Wan 2.2-layout `diffusers.AutoencoderKLWan` on CPU, so a tiny Cosmos 3 decodes pictures, not noise.

    vae = make_vae()                                              # TINY_VAE_CONFIG, seeded init
    trainer = VAETrainer(vae, "data/shapes", {"output_dir": "runs/vae", "max_steps": 3000})
    trainer.train()                                               # resumes from runs/vae/checkpoint-* if any
    trainer.export("models/tiny/vae")                             # latents_mean/std measured, save_pretrained
    evaluate_vae(vae, images, clips)                              # PSNR (dB) of encode -> decode round trips

    python -m cosmos3.training.vae --data data/shapes --output-dir runs/vae --export models/tiny/vae \
        --max-minutes 15 --max-steps 4000

Notable choices:

* **The pipelines' layout**: `patch_size=2`, `is_residual=True`, 16x spatial and 4x temporal compression like
  `cosmos3.testing.make_tiny_vae` (and Wan 2.2), wider channels so flat synthetic scenes survive the round trip,
  small enough (~1M parameters, ~4 MB of safetensors) to train in minutes on two CPU cores.
* **Causal video VAE, images are 1-frame clips**: a step is either a batch of images (`T = 1`) or of clips
  (`T = 1 + 4k`), every `video_every`-th step. The encoder and decoder run chunk by chunk (1 frame, then 4) with
  a causal cache local to the call, exactly as `AutoencoderKLWan.encode` / `decode` do, but without the decoder's
  final clamp to [-1, 1]: a clamped output has zero gradient, so a pixel pushed past the range could never come
  back. `tests/training/test_vae.py` checks these equal the diffusers calls.
* **Loss**: L1 + `edge_weight` * L1 of the spatial finite differences (sharp shape borders matter more to
  the scorer, and to PSNR, than flat areas) + `kl_weight` * KL to N(0, 1) per latent element, on a posterior
  *sample*: the decoder learns to tolerate latent noise, which is what a diffusion model's latents will have.
* **Deterministic and resumable**: the batch of step s (indices, flips) and its posterior noise come from
  generators keyed by (seed, s); the optimizer state is created up front and checkpointed with the weights and
  their EMA by `cosmos3.training.checkpoint` (atomic, sharded safetensors), so a resumed run ends bit-identical to
  an uninterrupted one. `max_minutes` stops early (with a checkpoint); `max_steps` fixes the LR schedule.
* **Latent statistics**: at export, the per-channel mean and std of the posterior mode over the training data
  (images and clips) are written to the config's `latents_mean` / `latents_std`, which is how
  `Cosmos3VisionTokenizer` (and the reference pipeline) normalizes latents to about unit variance.
* **Denormals are flushed** on CPU while training (see `Trainer.train`: Adam moments of tiny gradients otherwise
  make steps many times slower).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import loop

# AutoencoderKLWan keyword arguments (Wan 2.2 layout; 16x spatial, 4x temporal; 16 latent channels).
TINY_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 16, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_scales": [],
    "temperal_downsample": [False, True, True], "dropout": 0.0, "is_residual": True, "patch_size": 2,
    "in_channels": 12, "out_channels": 12, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
    "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16,
}  # fmt: skip

# Training settings (flat; `VAETrainer` fills in what a given config leaves out).
VAE_TRAIN_DEFAULTS: dict[str, Any] = {
    "output_dir": None,  # checkpoints and log.jsonl; None: no checkpoints
    "max_steps": 4000,  # also the length of the LR schedule
    "max_minutes": None,  # stop early (saving a checkpoint) once this much wall time is spent
    "batch_images": 8,  # small batches, more steps: faster per CPU second in our sweeps
    "batch_videos": 1,
    "video_every": 4,  # every k-th step is a clip batch (0: images only)
    "video_frames": 9,  # clips are cut to this many frames (1 + 4k), at a random start
    "learning_rate": 3e-4,  # 6e-4 and above were unstable (loss jumps back up) with these RMS-normed convs
    "min_lr_ratio": 0.05,  # cosine decay to learning_rate * this at max_steps
    "warmup_steps": 100,
    "betas": (0.5, 0.9),  # short-memory Adam, as for autoencoder training: +2 dB over (0.9, 0.999) early on
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "l1_weight": 0.0,
    "mse_weight": 1.0,
    "edge_weight": 0.0,
    "kl_weight": 1e-4,
    "sample_posterior": False,  # decode a posterior sample (else the mean) while training
    "ema_decay": 0.995,  # 0: no EMA; else the EMA weights are exported
    "flip": True,  # random horizontal flips (the VAE does not read captions)
    "crop": None,  # train on random square crops of this side (a multiple of 16) instead of whole frames: e.g.
    # 64-pixel crops of 128-pixel scenes cost what 64-pixel scenes cost, at the larger scenes' scale
    "seed": 0,
    "save_every": 500,
    "keep_checkpoints": 2,
    "log_every": 25,
    "stats_samples": 512,  # images (and up to a quarter as many clips) the latent statistics are measured on
    "isolated_decode": False,  # decode the folder in cosmos3.io's sandboxed child (slow; for untrusted data)
    "num_threads": None,  # torch intra-op threads while training (None: unchanged). On a shared 2-core machine 1
    # thread was 18x faster than 2 in our measurements: OpenMP threads spin-waiting for a busy core.
}


def make_vae(config: dict[str, Any] | None = None, seed: int = 0):
    """A freshly initialized `AutoencoderKLWan` from `config` (default `TINY_VAE_CONFIG`), seeded."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(**dict(config or TINY_VAE_CONFIG))


# ----------------------------------------------------------------------------------------- differentiable passes


def encode_moments(vae, video: Tensor) -> Tensor:
    """`[B, 3, T, H, W]` in [-1, 1] -> posterior moments `[B, 2z, T', h, w]`, differentiably: `vae._encode`'s chunk
    loop (1 frame, then groups of 4) with a causal cache local to this call."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

    x = patchify(video, patch_size=vae.config.patch_size) if vae.config.patch_size is not None else video
    cache: list = [None] * vae._cached_conv_counts["encoder"]
    frames = x.shape[2]
    chunks = [(0, 1)] + [(1 + 4 * i, 5 + 4 * i) for i in range((frames - 1) // 4)]
    out = torch.cat([vae.encoder(x[:, :, a:b], feat_cache=cache, feat_idx=[0]) for a, b in chunks], dim=2)
    return vae.quant_conv(out)


def decode_latents(vae, z: Tensor) -> Tensor:
    """Raw latents `[B, z, T', h, w]` -> video `[B, 3, T, H, W]`, differentiably and *unclamped*: `vae._decode`'s
    frame loop with a causal cache local to this call."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    x = vae.post_quant_conv(z)
    cache: list = [None] * vae._cached_conv_counts["decoder"]
    out = torch.cat([vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
                     for i in range(x.shape[2])], dim=2)
    return unpatchify(out, patch_size=vae.config.patch_size) if vae.config.patch_size is not None else out


def reconstruction_loss(vae, video: Tensor, config: dict[str, Any], generator: torch.Generator | None = None
                        ) -> tuple[Tensor, dict[str, float]]:
    """The training objective on one batch (see the module docstring); returns (loss, parts for the log)."""
    moments = encode_moments(vae, video)
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution
    if config["sample_posterior"]:
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
    else:
        z = mean
    recon = decode_latents(vae, z)
    l1 = (recon - video).abs().mean()
    mse = (recon - video).square().mean()
    edge = ((recon.diff(dim=-1) - video.diff(dim=-1)).abs().mean()
            + (recon.diff(dim=-2) - video.diff(dim=-2)).abs().mean())
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    loss = (config["l1_weight"] * l1 + config["mse_weight"] * mse + config["edge_weight"] * edge
            + config["kl_weight"] * kl)
    return loss, {"l1": l1.item(), "mse": mse.item(), "edge": edge.item(), "kl": kl.item()}


# ---------------------------------------------------------------------------------------------------------- data


def load_media(folder: str | os.PathLike, *, video_frames: int = 9, isolated: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """All of a `FolderDataset` folder in memory: images uint8 `[N, H, W, 3]` and clips `[M, T, H, W, 3]`.

    Clips shorter than `video_frames` are left out; longer ones are kept whole (a step cuts a window). All images
    must share one size, and all clips (it is one synthetic dataset, not a bucketed corpus).
    """
    from .datasets import FolderDataset

    data = FolderDataset(folder, isolated=isolated)
    images, clips = [], []
    for i in range(len(data)):
        frames = data[i]["frames"]
        if data[i]["fps"] is None:
            images.append(frames[0])
        elif len(frames) >= video_frames:
            clips.append(frames)
    if clips:
        shortest = min(len(c) for c in clips)
        clips = [c[:shortest] for c in clips]
    for name, items in (("images", images), ("clips", clips)):
        if len({x.shape[-3:] for x in items}) > 1:
            raise ValueError(f"{folder}: {name} of different sizes {sorted({x.shape for x in items})[:3]}")
    empty_images = np.zeros((0, 16, 16, 3), np.uint8)
    empty_clips = np.zeros((0, video_frames, 16, 16, 3), np.uint8)
    return (np.stack(images) if images else empty_images, np.stack(clips) if clips else empty_clips)


def lerobot_media(root: str | os.PathLike, *, size: int = 64, video_frames: int = 9, n_images: int = 1000,
                  n_clips: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frames of a LeRobot v3 dataset's videos as the world-action pipeline sees them: placed on the `size` tier's
    square canvas by `action_canvas` (downscaled with antialiasing, never upscaled). Returns `n_images` random frames
    `[N, size, size, 3]` and `n_clips` random windows of `video_frames` frames inside episodes, uint8."""
    from ..conditioning import action_canvas
    from .datasets import LeRobotDataset

    data = LeRobotDataset(root, clip_frames=video_frames, stride=2, action_key=None, state_key=None)
    rng = np.random.default_rng((seed, 77))
    windows = rng.integers(len(data), size=n_clips)
    clips = [_canvas_uint8(_first_camera(data[int(i)]), size, action_canvas) for i in windows]
    frames = np.concatenate(clips) if clips else np.zeros((0, size, size, 3), np.uint8)
    # images: frames of further windows (first frames, which the policy conditions on, and others alike)
    images = []
    for i in rng.integers(len(data), size=max(0, n_images - len(frames)) // video_frames + 1):
        images.append(_canvas_uint8(_first_camera(data[int(i)]), size, action_canvas))
    pool = np.concatenate([frames, *images])
    return pool[rng.permutation(len(pool))[:n_images]], (np.stack(clips) if clips else
                                                         np.zeros((0, video_frames, size, size, 3), np.uint8))


def _first_camera(sample: dict[str, Any]) -> np.ndarray:
    return next(iter(sample["frames"].values()))


def _canvas_uint8(frames: np.ndarray, size: int, action_canvas) -> np.ndarray:
    from ..tokenizers.vision import postprocess_video

    return postprocess_video(action_canvas(list(frames), size, len(frames))[0])[0]  # [T, H, W, 3]


def to_video_tensor(frames: np.ndarray) -> Tensor:
    """uint8 `[B, H, W, 3]` (images) or `[B, T, H, W, 3]` (clips) -> float `[B, 3, T, H, W]` in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    if x.ndim == 4:
        x = x.unsqueeze(1)
    return x.permute(0, 4, 1, 2, 3).contiguous()


# ---------------------------------------------------------------------------------------------------------- trainer


class VAETrainer:
    """Trains `vae` on the images and clips of a `FolderDataset` folder (see the module docstring).

    Args:
        vae: an `AutoencoderKLWan` (e.g. `make_vae()`), trained in place.
        data: a folder, or `(images, clips)` uint8 arrays as `load_media` returns them.
        config: overrides of `VAE_TRAIN_DEFAULTS`.
        log: receives step records and events (default: print JSON lines; also appended to
            `output_dir/log.jsonl` when there is an output dir).
    """

    def __init__(self, vae, data: str | os.PathLike | tuple[np.ndarray, np.ndarray],
                 config: dict[str, Any] | None = None, log: Callable[[dict], None] | None = None) -> None:
        unknown = set(config or {}) - set(VAE_TRAIN_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown VAE training settings {sorted(unknown)}; known: {sorted(VAE_TRAIN_DEFAULTS)}")
        self.config = {**VAE_TRAIN_DEFAULTS, **(config or {})}
        cfg = self.config
        spatial = int(vae.config.scale_factor_spatial)
        if cfg["crop"] is not None and (cfg["crop"] < spatial or cfg["crop"] % spatial):
            raise ValueError(f"`crop` must be a positive multiple of {spatial}, got {cfg['crop']}")
        if (cfg["video_frames"] - 1) % int(vae.config.scale_factor_temporal):
            raise ValueError(f"`video_frames` must be 1 + {vae.config.scale_factor_temporal}k, "
                             f"got {cfg['video_frames']}")
        self.vae = vae.train()
        if isinstance(data, tuple):
            self.images, self.clips = data
        else:
            self.images, self.clips = load_media(data, video_frames=cfg["video_frames"],
                                                 isolated=cfg["isolated_decode"])
        if not len(self.images) and not len(self.clips):
            raise ValueError("no training data: the folder holds neither images nor long enough clips")
        self._log = log
        self.params = {n: p for n, p in vae.named_parameters() if p.requires_grad}
        self.optimizer = loop.adamw(self.params, lr=cfg["learning_rate"], betas=cfg["betas"],
                                    weight_decay=cfg["weight_decay"])
        self.ema = {n: p.detach().clone() for n, p in self.params.items()} if cfg["ema_decay"] else {}
        self.step = 0

    # ------------------------------------------------------------------------------------------------ plumbing

    def log(self, record: dict) -> None:
        if self._log is not None:
            self._log(record)
        else:
            print(json.dumps(record), flush=True)
        if self.config["output_dir"]:
            os.makedirs(self.config["output_dir"], exist_ok=True)
            with open(os.path.join(self.config["output_dir"], "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def learning_rate(self, step: int) -> float:
        """Linear warmup, then cosine decay to `min_lr_ratio` at `max_steps` (a function of the step only)."""
        cfg = self.config
        if step < cfg["warmup_steps"]:
            return cfg["learning_rate"] * (step + 1) / cfg["warmup_steps"]
        progress = min(1.0, (step - cfg["warmup_steps"]) / max(1, cfg["max_steps"] - cfg["warmup_steps"]))
        ratio = cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))
        return cfg["learning_rate"] * ratio

    def batch(self, step: int) -> Tensor:
        """The batch of `step` as `[B, 3, T, H, W]`: clips every `video_every`-th step (when there are clips),
        else images; indices, clip windows and flips drawn from a generator keyed by (seed, step)."""
        cfg = self.config
        rng = np.random.default_rng((cfg["seed"], step))
        videos = len(self.clips) and (not len(self.images) or (cfg["video_every"] and step % cfg["video_every"] == 0))
        if videos:
            idx = rng.integers(len(self.clips), size=cfg["batch_videos"])
            span = self.clips.shape[1] - cfg["video_frames"]
            starts = rng.integers(span + 1, size=len(idx))
            frames = np.stack([self.clips[i, s : s + cfg["video_frames"]] for i, s in zip(idx, starts)])
        else:
            frames = self.images[rng.integers(len(self.images), size=cfg["batch_images"])]
        if cfg["crop"]:
            height, width = frames.shape[-3:-1]
            side = cfg["crop"]
            tops = rng.integers(height - side + 1, size=len(frames))
            lefts = rng.integers(width - side + 1, size=len(frames))
            frames = np.stack([f[..., t : t + side, x : x + side, :] for f, t, x in zip(frames, tops, lefts)])
        if cfg["flip"]:
            flips = rng.random(len(frames)) < 0.5
            frames = np.where(flips.reshape(-1, *([1] * (frames.ndim - 1))), frames[..., ::-1, :], frames)
        return to_video_tensor(frames)

    # ------------------------------------------------------------------------------------------------ training

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on `batch(step)`; a non-finite loss or gradient skips the update."""
        cfg = self.config
        video = self.batch(self.step)
        generator = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + self.step)
        lr = self.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        loss, parts = reconstruction_loss(self.vae, video, cfg, generator)
        record: dict[str, Any] = {"step": self.step + 1, "loss": loss.item(), **parts, "lr": lr,
                                  "frames": int(video.shape[2])}
        grad_norm, skipped = loop.guarded_update(loss, self.params, self.optimizer, cfg["grad_clip"])
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if skipped:
            record["skipped"] = skipped
        elif self.ema:
            loop.ema_update(self.ema, self.params, cfg["ema_decay"])
        record["seconds"] = time.perf_counter() - start
        self.step += 1
        return record

    def train(self) -> list[dict]:
        """Resume from the newest complete checkpoint (if any), train to `max_steps` or `max_minutes`, saving every
        `save_every` steps and at the end. Returns the step records of this call."""
        cfg = self.config
        self.resume()
        start = time.monotonic()

        def log(record):
            if self.step % cfg["log_every"] == 0 or self.step == cfg["max_steps"] or "skipped" in record:
                self.log({**record, "elapsed": round(time.monotonic() - start, 1)})

        def out_of_time():
            if cfg["max_minutes"] is not None and time.monotonic() - start > 60 * cfg["max_minutes"]:
                return {"event": "time budget spent", "step": self.step, "minutes": cfg["max_minutes"]}
            return None

        records = loop.run(self, self.train_step, cfg["max_steps"], cfg["save_every"] if cfg["output_dir"] else None,
                           flush_denormal=True, num_threads=cfg["num_threads"], log=log, stop=out_of_time)
        self.vae.eval()
        return records

    # --------------------------------------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, Tensor]:
        """Weights, EMA and optimizer moments as one flat dict of tensors (what a resume needs)."""
        return loop.checkpoint_state(self.params, self.optimizer, self.ema)

    def save(self) -> str:
        vae_config = {k: v for k, v in self.vae.config.items() if not k.startswith("_")}
        return loop.save(self, self.config["output_dir"], self.config["keep_checkpoints"], config=self.config,
                         vae_config=vae_config)

    def resume(self) -> int | None:
        """Load the newest complete checkpoint of `output_dir`; returns its step, or None."""
        if not self.config["output_dir"]:
            return None
        return loop.resume(self, self.config["output_dir"])

    # ------------------------------------------------------------------------------------------------- export

    def export_weights(self) -> None:
        """Copy the EMA weights (when kept) into the VAE, which is then what `export` saves and `evaluate_vae`
        measures."""
        if self.ema:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.ema[name])

    def export(self, out_dir: str | os.PathLike) -> str:
        """Put the EMA weights in the VAE, measure and write `latents_mean`/`latents_std`, and `save_pretrained` at
        `out_dir` atomically. Returns `out_dir`."""
        self.export_weights()
        self.vae.eval()
        cfg = self.config
        rng = np.random.default_rng((cfg["seed"], 2**32 - 1))  # not a step's key
        images = self.images[rng.permutation(len(self.images))[: cfg["stats_samples"]]]
        clips = self.clips[rng.permutation(len(self.clips))[: max(1, cfg["stats_samples"] // 4)]] if len(self.clips) \
            else self.clips
        set_latent_statistics(self.vae, images, clips[:, : cfg["video_frames"]])
        return save_vae(self.vae, out_dir)


def train_vae(vae, dataset_folder: str | os.PathLike, config: dict[str, Any] | None = None,
              export_dir: str | os.PathLike | None = None) -> list[dict]:
    """Train `vae` on `dataset_folder` with `config` (see `VAE_TRAIN_DEFAULTS`), then, when `export_dir` is given,
    write it there with its latent statistics. Returns the step records."""
    trainer = VAETrainer(vae, dataset_folder, config)
    records = trainer.train()
    if export_dir is not None:
        trainer.export(export_dir)
    return records


# ---------------------------------------------------------------------------------------------------------- export


@torch.no_grad()
def latent_statistics(vae, images: np.ndarray, clips: np.ndarray, batch: int = 32) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior mode over `images` `[N, H, W, 3]` and `clips` `[M, T, H, W, 3]`
    (every latent position counts once)."""
    total = total_sq = None
    count = 0
    for data, size in ((images, batch), (clips, max(1, batch // 8))):
        for start in range(0, len(data), size):
            mode = vae.encode(to_video_tensor(data[start : start + size]).to(vae.dtype)).latent_dist.mode().double()
            flat = mode.transpose(0, 1).reshape(mode.shape[1], -1)
            total = flat.sum(1) if total is None else total + flat.sum(1)
            total_sq = flat.square().sum(1) if total_sq is None else total_sq + flat.square().sum(1)
            count += flat.shape[1]
    if not count:
        raise ValueError("no data to measure latent statistics on")
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return [float(x) for x in mean], [float(x) for x in std]


def set_latent_statistics(vae, images: np.ndarray, clips: np.ndarray) -> tuple[list[float], list[float]]:
    """Measure `latent_statistics` and write them into `vae.config` (`latents_mean`, `latents_std`)."""
    mean, std = latent_statistics(vae, images, clips)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return mean, std


def save_vae(vae, out_dir: str | os.PathLike) -> str:
    """`vae.save_pretrained(out_dir)`, atomically: written to a sibling temporary folder, then renamed into place."""
    from ..io import atomic_directory

    with atomic_directory(out_dir) as tmp:
        vae.save_pretrained(tmp)
    return os.path.normpath(os.fspath(out_dir))


# ---------------------------------------------------------------------------------------------------------- evaluation


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between uint8 arrays (peak 255), over all their values."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


@torch.no_grad()
def reconstruct(vae, frames: np.ndarray, batch: int = 16) -> np.ndarray:
    """uint8 round trip through the pipelines' path (`Cosmos3VisionTokenizer`: posterior mode, normalized latents,
    clamped decode): `[N, H, W, 3]` or `[N, T, H, W, 3]` in, same shape out."""
    from ..tokenizers.vision import Cosmos3VisionTokenizer, postprocess_video

    tokenizer = Cosmos3VisionTokenizer(vae)
    outs = []
    for start in range(0, len(frames), batch):
        video = to_video_tensor(frames[start : start + batch])
        outs.append(postprocess_video(tokenizer.decode(tokenizer.encode(video))))
    out = np.concatenate(outs)
    return out[:, 0] if frames.ndim == 4 else out


def evaluate_vae(vae, images: np.ndarray, clips: np.ndarray | None = None,
                 attributes: Sequence[dict] | None = None, clip_attributes: Sequence[dict] | None = None
                 ) -> dict[str, Any]:
    """Reconstruction PSNR (dB, mean over samples and pooled) of images and clips; with attributes, also the
    synthetic scorer's accuracy on the reconstructions (do colours, shapes, sizes, positions survive?)."""
    from . import synthetic

    was_training = vae.training
    vae.eval()
    result: dict[str, Any] = {}
    for name, data, attrs in (("image", images, attributes), ("video", clips, clip_attributes)):
        if data is None or not len(data):
            continue
        recon = reconstruct(vae, data, batch=16 if name == "image" else 2)
        result[f"psnr_{name}"] = psnr(recon, data)
        result[f"psnr_{name}_mean"] = float(np.mean([psnr(r, x) for r, x in zip(recon, data)]))
        if attrs is not None:
            result[f"scorer_{name}_reconstructed"] = synthetic.accuracy(list(zip(recon, attrs)))
            result[f"scorer_{name}_original"] = synthetic.accuracy(list(zip(data, attrs)))
    vae.train(was_training)
    return result


def heldout_scenes(n_images: int, n_videos: int, size: int = 64, frames: int = 9, seed: int = 1234
                   ) -> tuple[np.ndarray, list[dict], np.ndarray, list[dict]]:
    """Clean synthetic renders no training folder holds (kind 'eval' of the generator, own seed): images, their
    attributes, clips, theirs."""
    from . import synthetic

    images, image_attrs, clips, clip_attrs = [], [], [], []
    for i in range(n_images):
        scene = synthetic.sample_scene(np.random.default_rng((seed, 10, i)), heldout=None)
        images.append(synthetic.render_scene(scene, size))
        image_attrs.append(scene["attributes"])
    for i in range(n_videos):
        scene = synthetic.sample_scene(np.random.default_rng((seed, 11, i)), video=True, heldout=None)
        clips.append(synthetic.render_scene(scene, size, frames))
        clip_attrs.append(scene["attributes"])
    empty = np.zeros((0, size, size, 3), np.uint8)
    return (np.stack(images) if images else empty, image_attrs,
            np.stack(clips) if clips else empty[:, None], clip_attrs)


def safetensors_bytes(folder: str | os.PathLike) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: generate the synthetic folder if missing, train, export, evaluate; prints a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a FolderDataset folder (generated when missing)")
    parser.add_argument("--output-dir", required=True, help="checkpoints and log.jsonl")
    parser.add_argument("--export", required=True, help="where the trained VAE is saved (save_pretrained)")
    parser.add_argument("--n-images", type=int, default=4000, help="when generating --data")
    parser.add_argument("--n-videos", type=int, default=500, help="when generating --data")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--config", default="{}", help="JSON overrides of VAE_TRAIN_DEFAULTS")
    parser.add_argument("--vae-config", default="{}", help="JSON overrides of TINY_VAE_CONFIG")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--lerobot", action="append", default=[], metavar="ROOT",
                        help="also train on this LeRobot dataset's frames, on the --size policy canvas (repeatable)")
    parser.add_argument("--lerobot-images", type=int, default=1500, help="frames taken from each --lerobot dataset")
    parser.add_argument("--lerobot-clips", type=int, default=200, help="clips taken from each --lerobot dataset")
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--eval-videos", type=int, default=40)
    args = parser.parse_args(argv)
    from . import synthetic

    if not os.path.isdir(args.data):
        synthetic.write_folder_dataset(args.data, args.n_images, args.n_videos, size=args.size)
    config = json.loads(args.config)
    for key in ("max_steps", "max_minutes"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    config.setdefault("output_dir", args.output_dir)
    vae_config = {**TINY_VAE_CONFIG, **json.loads(args.vae_config)}
    z = vae_config["z_dim"]
    vae_config.setdefault("latents_mean", [0.0] * z)
    if len(vae_config["latents_mean"]) != z:
        vae_config["latents_mean"], vae_config["latents_std"] = [0.0] * z, [1.0] * z
    vae = make_vae(vae_config, seed=config.get("seed", 0))
    start = time.monotonic()
    video_frames = config.get("video_frames", VAE_TRAIN_DEFAULTS["video_frames"])
    images, clips = load_media(args.data, video_frames=video_frames)
    robot_images, robot_clips = [], []
    for k, root in enumerate(args.lerobot):
        more_images, more_clips = lerobot_media(root, size=args.size, video_frames=video_frames,
                                                n_images=args.lerobot_images, n_clips=args.lerobot_clips, seed=k)
        robot_images.append(more_images)
        robot_clips.append(more_clips)
    if args.lerobot:
        images = np.concatenate([images, *robot_images])
        clips = np.concatenate([clips[:, :video_frames], *robot_clips])
    trainer = VAETrainer(vae, (images, clips), config)
    records = trainer.train()
    trainer.export(args.export)
    images, image_attrs, clips, clip_attrs = heldout_scenes(args.eval_images, args.eval_videos, args.size)
    summary = {"steps": trainer.step, "train_minutes_this_call": round((time.monotonic() - start) / 60, 2),
               "final_loss": records[-1]["loss"] if records else None,
               "safetensors_bytes": safetensors_bytes(args.export),
               "parameters": sum(p.numel() for p in vae.parameters()),
               **evaluate_vae(vae, images, clips, image_attrs, clip_attrs)}
    if args.lerobot:  # round trips of robot frames (training frames: no held-out episodes were set aside)
        robot = evaluate_vae(vae, np.concatenate(robot_images)[: args.eval_images],
                             np.concatenate(robot_clips)[: args.eval_videos])
        summary.update({f"robot_{k}": v for k, v in robot.items()})
    trainer.log({"event": "summary", **summary})
    return summary


if __name__ == "__main__":
    main()
