"""Text-to-video / text-to-image against the reference pipeline, batching, callbacks, outputs, save/load."""

import numpy as np
import pytest
import torch

from cosmos3.pipelines import Cosmos3TextToImagePipeline, Cosmos3TextToVideoPipeline

from .conftest import gen

VIDEO = dict(num_frames=9, height=32, width=48, fps=16.0, num_inference_steps=3)


def pipeline(cls, parts):
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_text_to_video_matches_reference(components, seed, guidance_scale):
    parts, reference = components
    ours = pipeline(Cosmos3TextToVideoPipeline, parts)
    kwargs = dict(**VIDEO, guidance_scale=guidance_scale, output_type="np")
    expected = reference("a red car", negative_prompt="blurry", generator=gen(seed), **kwargs).video
    got = ours("a red car", negative_prompt="blurry", generator=gen(seed), **kwargs).frames
    assert got.shape == (1, *expected.shape)
    assert np.abs(got[0] - expected).max() <= 1e-4


def test_text_to_video_with_sound_matches_reference(components):
    parts, reference = components
    ours = pipeline(Cosmos3TextToVideoPipeline, parts)
    kwargs = dict(**VIDEO, guidance_scale=3.0, output_type="np", enable_sound=True)
    expected = reference("rain on a roof", generator=gen(5), **kwargs)
    got = ours("rain on a roof", generator=gen(5), **kwargs)
    assert np.abs(got.frames[0] - expected.video).max() <= 1e-4
    assert got.sound.shape == (1, *expected.sound.shape)
    assert (got.sound[0] - expected.sound).abs().max() <= 1e-4


@pytest.mark.parametrize("size", [(32, 32), (48, 32)])
def test_text_to_image_matches_reference(components, size):
    parts, reference = components
    ours = pipeline(Cosmos3TextToImagePipeline, parts)
    height, width = size
    kwargs = dict(height=height, width=width, num_inference_steps=3, guidance_scale=5.0, output_type="np")
    expected = reference("a cat", num_frames=1, generator=gen(3), **kwargs).video  # [1, H, W, 3]
    got = ours("a cat", generator=gen(3), **kwargs).images
    assert got.shape == (1, height, width, 3)
    assert np.abs(got[0] - expected[0]).max() <= 1e-4


def test_batch_equals_one_by_one(components):
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    prompts = ["a red car", "waves at dusk on a long beach"]
    batch = pipe(prompts, negative_prompt=["blurry", None], num_videos_per_prompt=2,
                 generator=[gen(s) for s in range(4)], guidance_scale=4.0, output_type="np", **VIDEO).frames
    assert batch.shape[0] == 4
    for i, (prompt, negative) in enumerate([(p, n) for p, n in zip(prompts, ["blurry", None]) for _ in range(2)]):
        single = pipe(prompt, negative_prompt=negative, generator=gen(i), guidance_scale=4.0, output_type="np",
                      **VIDEO).frames
        assert np.abs(batch[i] - single[0]).max() <= 1e-5


def test_determinism_and_output_types(components):
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    a = pipe("a dog", generator=gen(7), output_type="np", **VIDEO).frames
    b = pipe("a dog", generator=gen(7), output_type="np", **VIDEO).frames
    assert np.array_equal(a, b)
    pt = pipe("a dog", generator=gen(7), output_type="pt", **VIDEO).frames
    assert pt.shape == (1, 9, 3, 32, 48) and np.allclose(pt.permute(0, 1, 3, 4, 2).numpy(), a, atol=1e-6)
    pil = pipe("a dog", generator=gen(7), output_type="pil", **VIDEO).frames
    assert len(pil) == 1 and len(pil[0]) == 9 and pil[0][0].size == (48, 32)
    latents = pipe("a dog", generator=gen(7), output_type="latent", **VIDEO).frames
    assert latents.shape == (1, 8, 3, 2, 3)
    frames, sound = pipe("a dog", generator=gen(7), output_type="np", return_dict=False, **VIDEO)
    assert np.array_equal(frames, a) and sound is None


def test_callback_can_edit_latents(components):
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append(i)
        if i == p.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    out = pipe("a dog", generator=gen(0), output_type="latent", callback_on_step_end=callback, **VIDEO).frames
    assert seen == [0, 1, 2] and out.abs().sum() == 0


def test_save_and_load_both_ways(components, tmp_path):
    from diffusers import Cosmos3OmniPipeline

    parts, reference = components
    reference.save_pretrained(tmp_path / "reference")
    loaded = Cosmos3TextToVideoPipeline.from_pretrained(tmp_path / "reference")
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(**VIDEO, guidance_scale=2.0, output_type="np")
    expected = reference("a cat", generator=gen(1), **kwargs).video
    assert np.abs(loaded("a cat", generator=gen(1), **kwargs).frames[0] - expected).max() <= 1e-4
    loaded.save_pretrained(tmp_path / "ours")
    again = Cosmos3OmniPipeline.from_pretrained(tmp_path / "ours", enable_safety_checker=False)
    again.set_progress_bar_config(disable=True)
    assert np.abs(again("a cat", generator=gen(1), **kwargs).video - expected).max() <= 1e-4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_frames=8), r"`num_frames` must be 1 \+ 4k, got 8 \(nearest: 5, 9\)"),
        (dict(height=40), r"`height` must be a multiple of 16, got 40 \(nearest: 32, 48\)"),
        (dict(num_inference_steps=0), r"`num_inference_steps` must be an int >= 1"),
        (dict(output_type="gif"), r"`output_type` must be one of"),
        (dict(fps=0), r"`fps` must be a positive number"),
        (dict(num_videos_per_prompt=0), r"num_\*_per_prompt"),
    ],
)
def test_invalid_arguments(components, kwargs, match):
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    with pytest.raises(ValueError, match=match):
        pipe("a cat", **{**VIDEO, **kwargs})
    with pytest.raises(TypeError, match="`prompt` must be a str"):
        pipe([], **VIDEO)
    with pytest.raises(ValueError, match="`generator` is a list of 2"):
        pipe("a cat", generator=[gen(0), gen(1)], **VIDEO)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_gives_the_same_video(components, offload_type):
    parts, _ = components
    plain = pipeline(Cosmos3TextToVideoPipeline, parts)
    expected = plain("a cat", generator=gen(0), guidance_scale=3.0, output_type="np", **VIDEO).frames
    kwargs = dict(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=offload_type)
    if offload_type == "block_level":
        kwargs["num_blocks_per_group"] = 1
    parts["transformer"].enable_group_offload(**kwargs)
    got = plain("a cat", generator=gen(0), guidance_scale=3.0, output_type="np", **VIDEO).frames
    assert np.array_equal(got, expected)


def test_save_writes_video_with_sound(components, tmp_path):
    from cosmos3 import io as cio

    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    out = pipe("rain", generator=gen(0), output_type="pil", enable_sound=True, **VIDEO)
    out.save(tmp_path / "rain.mp4", fps=16.0)
    clip = cio.read_video(tmp_path / "rain.mp4", with_audio=True)
    assert clip.frames.shape == (9, 32, 48, 3) and clip.audio is not None and clip.sample_rate == 48000
    with pytest.raises(ValueError, match="`prompt` must not be empty"):
        pipe("", **VIDEO)


def test_a_model_step_factory_replaces_only_how_a_step_runs_the_model(components):
    """The seam step caching and multi-GPU steps plug into: same noise, guidance and schedule, the model call ours."""
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    expected = pipe("a red car", generator=gen(0), output_type="np", **VIDEO).frames
    calls = []

    def counting_factory(pipe, layout, inputs):
        step = pipe.eager_model_step(layout, inputs)

        def counted(vision, t, sound, action):
            calls.append((vision.shape[0], float(t)))
            return step(vision, t, sound, action)

        return counted

    pipe.model_step_factory = counting_factory
    frames = pipe("a red car", generator=gen(0), output_type="np", **VIDEO).frames
    assert np.array_equal(frames, expected)
    assert [b for b, _ in calls] == [2] * VIDEO["num_inference_steps"]  # the sample and its negative, per step
    assert [t for _, t in calls] == [float(t) for t in pipe.scheduler.timesteps]


def test_a_callback_that_returns_nothing_changes_nothing(components):
    """diffusers users often write watch-only callbacks that return None: no change, not an AttributeError."""
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    expected = pipe("a red car", generator=gen(0), output_type="np", **VIDEO).frames
    seen = []
    frames = pipe("a red car", generator=gen(0), output_type="np", **VIDEO,
                  callback_on_step_end=lambda p, i, t, tensors: seen.append(i)).frames
    assert np.array_equal(frames, expected) and seen == [0, 1, 2]
    with pytest.raises(TypeError, match="must return a dict of tensors"):
        pipe("a red car", **VIDEO, callback_on_step_end=lambda p, i, t, tensors: 3)


def test_calls_are_bounded_with_documented_overridable_limits(components):
    """A 100,000-character prompt or 10**9 steps fail at once instead of running for hours."""
    from cosmos3.pipelines.common import CallLimits

    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    with pytest.raises(ValueError, match=r"`prompt` 0 is \d+ tokens after templating, over the limit of 4096"):
        pipe("a red car " * 10_000, **VIDEO)
    with pytest.raises(ValueError, match=r"`num_inference_steps`=1000000000 is over the limit of 1000"):
        pipe("a red car", **{**VIDEO, "num_inference_steps": 10**9})
    with pytest.raises(ValueError, match="`negative_prompt` 0 is"):
        pipe("a red car", negative_prompt="blurry " * 10_000, **VIDEO)
    pipe.limits = CallLimits(max_prompt_tokens=100_000)
    assert pipe("a red car " * 500, output_type="latent", **{**VIDEO, "num_inference_steps": 1}).frames.shape[0] == 1
