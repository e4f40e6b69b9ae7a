"""The distilled students' fixed few-step schedule with stochastic re-noising."""

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from cosmos3.conditioning import Cosmos3Request
from cosmos3.pipelines import Cosmos3ImageToVideoPipeline, Cosmos3TextToVideoPipeline

from .conftest import gen

SIGMAS = [1.0, 15 / 16, 5 / 6, 5 / 8]
VIDEO = dict(num_frames=9, height=32, width=48, fps=16.0, num_inference_steps=4, guidance_scale=1.0)


def distilled(cls, parts):
    scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=1.0)
    pipe = cls(**{**parts, "scheduler": scheduler}, distilled_sigmas=SIGMAS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_seeded_batch_equals_one_by_one(components):
    parts, _ = components
    pipe = distilled(Cosmos3TextToVideoPipeline, parts)
    prompts = ["a red car", "waves on a beach at dusk"]
    batch = pipe(prompts, generator=[gen(0), gen(1)], output_type="np", **VIDEO).frames
    for i in range(2):
        single = pipe(prompts[i], generator=gen(i), output_type="np", **VIDEO).frames
        assert np.abs(batch[i] - single[0]).max() <= 1e-5
    again = pipe(prompts, generator=[gen(0), gen(1)], output_type="np", **VIDEO).frames
    assert np.array_equal(batch, again)


def test_one_sample_equals_the_schedulers_stochastic_step(components):
    """Our batched re-noising step draws the same noise and computes the same update as the scheduler's own."""
    parts, _ = components
    pipe = distilled(Cosmos3TextToVideoPipeline, parts)
    scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=1.0)
    scheduler.set_timesteps(sigmas=SIGMAS)
    pipe.scheduler.set_timesteps(sigmas=SIGMAS)
    latents, velocity = torch.randn(1, 8, 3, 2, 3), torch.randn(1, 8, 3, 2, 3)
    requests = [Cosmos3Request([1], vision_shape=(8, 3, 2, 3))]
    ours = pipe.renoise_step(velocity, latents, 0, requests, [gen(3)])
    theirs = scheduler.step(velocity[None], scheduler.timesteps[0], latents[None], generator=gen(3)).prev_sample[0]
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_conditioning_frame_stays_clean(components):
    parts, _ = components
    pipe = distilled(Cosmos3ImageToVideoPipeline, parts)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    latents = pipe(image, "a boat", generator=gen(0), output_type="latent", **VIDEO).frames
    x0 = pipe.vision_tokenizer.encode(
        torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None, :, None].float().div(127.5).sub(1).expand(
            -1, -1, 9, -1, -1).contiguous())
    assert torch.allclose(latents[0, :, 0], x0[0, :, 0], atol=1e-5)


def test_schedule_is_fixed(components):
    parts, _ = components
    pipe = distilled(Cosmos3TextToVideoPipeline, parts)
    with pytest.raises(ValueError, match="fixed 4-step schedule; `num_inference_steps` must be 4"):
        pipe("a cat", **{**VIDEO, "num_inference_steps": 10})
    with pytest.raises(ValueError, match="`guidance_scale` must be 1.0"):
        pipe("a cat", **{**VIDEO, "guidance_scale": 6.0})


def test_from_pretrained_reads_the_distilled_schedule(components, tmp_path):
    parts, _ = components
    pipe = distilled(Cosmos3TextToVideoPipeline, parts)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index.pop("distilled_sigmas", None)
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "modular_model_index.json").write_text(json.dumps({"is_distilled": True, "distilled_sigmas": SIGMAS}))
    loaded = Cosmos3TextToVideoPipeline.from_pretrained(tmp_path)
    assert loaded.config.distilled_sigmas == SIGMAS
