"""Every pipeline's arguments under arbitrary values: a clear error or a valid output."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosmos3.pipelines import ActionRequest

from .conftest import outcome

# Odd values of every kind a caller might pass by mistake.
ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.sampled_from([10**9, 10**12, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.lists(st.integers(-5, 40), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.sampled_from([np.zeros((2, 2), np.uint8), np.zeros((4, 4, 4), np.uint8), torch.zeros(3, 2, 2),
                     torch.full((1,), float("nan"))]),
)
SIZES = st.sampled_from([0, 1, 8, 15, 16, 24, 32, -16, 33])
FRAMES = st.sampled_from([0, 1, 2, 5, 8, 9, -3])
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SMALL = dict(num_inference_steps=1, output_type="latent")


def image(seed=0, size=(24, 40)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@SETTINGS
@given(name=st.sampled_from(["prompt", "negative_prompt", "num_frames", "height", "width", "fps", "num_inference_steps",
                             "guidance_scale", "num_videos_per_prompt", "generator", "enable_sound", "output_type",
                             "use_system_prompt", "callback_on_step_end_tensor_inputs", "latents"]),
       value=ANYTHING)
def test_text_to_video_arguments(pipes, name, value):
    kwargs = dict(prompt="a red car", num_frames=5, height=32, width=32, **SMALL)
    kwargs[name] = value
    outcome(lambda: pipes["t2v"](**kwargs))


@SETTINGS
@given(height=SIZES, width=SIZES, frames=FRAMES, steps=st.sampled_from([0, 1, 2, 10**9]),
       guidance=st.sampled_from([0.0, 1.0, 6.0, -1.0, float("inf")]))
def test_sizes_steps_and_guidance(pipes, height, width, frames, steps, guidance):
    outcome(lambda: pipes["t2v"]("a cat", num_frames=frames, height=height, width=width,
                                 num_inference_steps=steps, guidance_scale=guidance, output_type="latent"))


@SETTINGS
@given(value=ANYTHING, which=st.sampled_from(["image", "prompt", "num_frames"]))
def test_image_to_video_inputs(pipes, value, which):
    kwargs = dict(image=image(), prompt="a boat", num_frames=5, height=32, width=32, **SMALL)
    kwargs[which] = value
    outcome(lambda: pipes["i2v"](**kwargs))


@SETTINGS
@given(value=ANYTHING, which=st.sampled_from(["video", "condition_frame_indexes", "condition_video_keep"]))
def test_video_to_video_inputs(pipes, value, which):
    kwargs = dict(video=[image(i) for i in range(5)], prompt="waves", num_frames=9, height=32, width=32, **SMALL)
    kwargs[which] = value
    outcome(lambda: pipes["v2v"](**kwargs))


@SETTINGS
@given(value=ANYTHING, which=st.sampled_from(["control_videos", "num_video_frames_per_chunk", "num_conditional_frames",
                                             "control_guidance", "guidance_interval", "video", "num_frames"]))
def test_transfer_inputs(pipes, value, which):
    kwargs = dict(prompt="a street", control_videos={"edge": np.stack([image(i, (32, 32)) for i in range(5)])},
                  height=32, width=32, num_inference_steps=1, output_type="np")
    kwargs[which] = value
    outcome(lambda: pipes["transfer"](**kwargs))


@SETTINGS
@given(field=st.sampled_from(["mode", "chunk_size", "domain_name", "image", "actions", "resolution_tier",
                              "view_point", "action_dim"]), value=ANYTHING)
def test_world_action_requests(pipes, field, value):
    fields = dict(mode="policy", chunk_size=4, domain_name="bridge_orig_lerobot", image=image(), resolution_tier=64)
    fields[field] = value

    def call():
        pipes["world_action"]("pick it up", ActionRequest(**fields), num_inference_steps=1, output_type="latent")

    outcome(call)


@SETTINGS
@given(name=st.sampled_from(["prompt", "negative_prompt", "height", "width", "num_images_per_prompt",
                             "guidance_scale", "generator", "output_type"]), value=ANYTHING)
def test_text_to_image_arguments(pipes, name, value):
    kwargs = dict(prompt="a red car", height=32, width=32, **SMALL)
    kwargs[name] = value
    outcome(lambda: pipes["t2i"](**kwargs))


@SETTINGS
@given(name=st.sampled_from(["prompt", "max_new_tokens", "temperature", "top_p", "generator", "system_prompt"]),
       value=ANYTHING)
def test_text_generation_arguments(pipes, name, value):
    from cosmos3.pipelines import Cosmos3TextGenerationPipeline

    t2v = pipes["t2v"]
    pipe = Cosmos3TextGenerationPipeline(transformer=t2v.transformer, text_tokenizer=t2v.text_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="hello", max_new_tokens=2)
    kwargs[name] = value
    outcome(lambda: pipe(**kwargs))
