"""VAE training: the differentiable passes are the diffusers ones, a few steps learn, a resumed run ends where an
uninterrupted one does, and the export loads with `from_pretrained` and normalizes latents in the tokenizer."""

import json
import os

import numpy as np
import pytest
import torch

from cosmos3.tokenizers.vision import Cosmos3VisionTokenizer
from cosmos3.training import synthetic
from cosmos3.training import vae as V


def scenes(n, size=32, video=False, frames=5, seed=0):
    out = []
    for i in range(n):
        scene = synthetic.sample_scene(np.random.default_rng((seed, int(video), i)), video=video)
        out.append(synthetic.render_scene(scene, size, frames))
    return np.stack(out)


def quiet(record):
    pass


def small_vae(seed=0):
    """TINY_VAE_CONFIG's layout at a quarter of the width: the same code paths, faster tests."""
    config = {**V.TINY_VAE_CONFIG, "base_dim": 8, "dim_mult": [1, 1, 1, 1], "z_dim": 8,
              "latents_mean": [0.0] * 8, "latents_std": [1.0] * 8}
    return V.make_vae(config, seed=seed)


def test_training_passes_are_the_diffusers_passes():
    vae = small_vae().eval()
    video = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        moments = V.encode_moments(vae, video)
        assert torch.equal(moments, vae.encode(video).latent_dist.parameters)
        z = moments[:, :8]
        assert torch.equal(V.decode_latents(vae, z).clamp(-1, 1), vae.decode(z).sample)


def test_a_few_steps_lower_the_reconstruction_loss():
    images = scenes(8)
    trainer = V.VAETrainer(small_vae(), (images, images[:0]), {"batch_images": 8, "max_steps": 40, "warmup_steps": 5,
                                                               "ema_decay": 0.0, "flip": False, "learning_rate": 2e-3,
                                                               "betas": (0.9, 0.99)}, log=quiet)
    probe = V.to_video_tensor(images)

    def loss():
        with torch.no_grad():
            return float(V.reconstruction_loss(trainer.vae, probe, trainer.config)[0])

    before = loss()
    trainer.train()
    assert loss() < before / 2  # measured: 0.59 -> 0.24 (MSE)


def make_trainer(root, seed=0):
    images, clips = scenes(8), scenes(3, video=True)
    config = {"output_dir": str(root), "max_steps": 4, "save_every": 2, "batch_images": 2, "batch_videos": 1,
              "video_every": 2, "video_frames": 5, "ema_decay": 0.9, "warmup_steps": 2, "sample_posterior": True,
              "kl_weight": 1e-3, "edge_weight": 0.1, "l1_weight": 0.5}
    return V.VAETrainer(small_vae(seed), (images, clips), config, log=quiet)


def test_resume_equals_uninterrupted(tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight.train()

    interrupted = make_trainer(tmp_path / "b")
    interrupted.train_step()
    interrupted.train_step()
    interrupted.save()
    interrupted.train_step()  # lost: the process "dies" before the next checkpoint
    resumed = make_trainer(tmp_path / "b", seed=1)  # other initial weights: all of them must come from the file
    records = resumed.train()
    assert [r["step"] for r in records] == [3, 4]
    assert {r["frames"] for r in records} == {1, 5}
    for name, p in straight.params.items():
        assert torch.equal(p, resumed.params[name]), name
        assert torch.equal(straight.ema[name], resumed.ema[name]), name


def test_export_loads_and_normalizes_in_the_tokenizer(tmp_path):
    from diffusers import AutoencoderKLWan

    root = synthetic.write_folder_dataset(tmp_path / "data", 6, 2, size=32, frames=5, n_heldout=2)
    out = tmp_path / "vae"
    config = {"max_steps": 2, "batch_images": 2, "video_every": 2, "video_frames": 5, "log_every": 1}
    records = V.train_vae(small_vae(), root, config, export_dir=out)
    assert len(records) == 2 and {r["frames"] for r in records} == {1, 5}
    with open(out / "config.json") as f:
        saved = json.load(f)
    assert saved["latents_mean"] != [0.0] * 8 and saved["latents_std"] != [1.0] * 8

    vae = AutoencoderKLWan.from_pretrained(out).eval()
    tokenizer = Cosmos3VisionTokenizer(vae)
    images, clips = V.load_media(root, video_frames=5)
    latents = tokenizer.encode(V.to_video_tensor(images))
    clip_latents = tokenizer.encode(V.to_video_tensor(clips))
    assert latents.shape == (6, 8, 1, 2, 2) and clip_latents.shape == (2, 8, 2, 2, 2)
    # The statistics were measured on exactly these images and clips: normalized, every channel is N(0, 1)-scaled.
    flat = torch.cat([latents.transpose(0, 1).reshape(8, -1), clip_latents.transpose(0, 1).reshape(8, -1)], dim=1)
    assert torch.allclose(flat.mean(1), torch.zeros(8), atol=1e-4)
    assert torch.allclose(flat.std(1, correction=0), torch.ones(8), atol=1e-3)
    assert tokenizer.decode(latents).shape == (6, 3, 1, 32, 32)
    assert V.reconstruct(vae, clips).shape == clips.shape
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".partial", ".old"))]


def test_tiny_config_is_small_and_pipeline_shaped(tmp_path):
    from cosmos3.testing import make_tiny_vae

    vae = V.make_vae()
    reference = make_tiny_vae().config
    for key in ("scale_factor_spatial", "scale_factor_temporal", "patch_size", "is_residual", "in_channels",
                "out_channels", "temperal_downsample"):
        assert vae.config[key] == reference[key], key
    V.save_vae(vae, tmp_path / "vae")
    assert V.safetensors_bytes(tmp_path / "vae") < 5_000_000


def test_psnr_and_config_checks():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert V.psnr(a, a) == float("inf")
    assert V.psnr(a, a + 255) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown VAE training settings"):
        V.VAETrainer(small_vae(), (scenes(2), scenes(2)[:0]), {"learning_rat": 1.0})
    with pytest.raises(ValueError, match="`crop` must be a positive multiple of 16"):
        V.VAETrainer(small_vae(), (scenes(2), scenes(2)[:0]), {"crop": 24})


def test_crops_are_square_windows_of_the_frames():
    images = scenes(4, size=64)
    trainer = V.VAETrainer(small_vae(), (images, images[:0]), {"crop": 32, "batch_images": 4, "flip": False}, log=quiet)
    batch = trainer.batch(0)
    assert batch.shape[-2:] == (32, 32)

