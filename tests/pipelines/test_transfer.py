"""Transfer against diffusers' modular Cosmos 3 workflow (the transfer branch of `Cosmos3OmniBlocks`)."""

import numpy as np
import pytest
import torch
from diffusers.modular_pipelines.cosmos import Cosmos3OmniBlocks, Cosmos3OmniModularPipeline

from cosmos3.pipelines.transfer import Cosmos3TransferPipeline, chunk_geometry, pad_time
from cosmos3.testing import make_tiny_vae, reference_transformer, tiny_parts, tiny_scheduler

from .conftest import gen

PROMPT = "a red car drives along a winding coastal road at sunset"


def edge_like(frames, height, width, seed):
    """A binary edge-map clip `[T, 3, H, W]` in [0, 1]."""
    e = (torch.rand(frames, 1, height, width, generator=gen(seed)) > 0.85).float()
    return e.expand(-1, 3, -1, -1).contiguous()


def smooth_like(frames, height, width, seed):
    """A smooth RGB clip `[T, 3, H, W]` in [0, 1] (stands in for blur or depth maps)."""
    x = torch.rand(frames, 3, height // 8, width // 8, generator=gen(seed))
    return torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear").clamp(0, 1).contiguous()


def _quiet(block):
    if hasattr(block, "set_progress_bar_config"):
        block.set_progress_bar_config(disable=True)
    for sub in getattr(block, "sub_blocks", {}).values():
        _quiet(sub)


@pytest.fixture(scope="module")
def pipes(tiny_tokenizer):
    """Ours and the reference's modular pipeline on the same tiny weights (each with its own VAE object: ours
    accelerates its VAE in place)."""
    parts = tiny_parts(tiny_tokenizer)
    ours = Cosmos3TransferPipeline(**parts)
    ours.set_progress_bar_config(disable=True)
    reference = Cosmos3OmniModularPipeline(blocks=Cosmos3OmniBlocks(), config_dict={"enable_safety_checker": False})
    reference.update_components(transformer=reference_transformer(parts["transformer"]), vae=make_tiny_vae(),
                                text_tokenizer=tiny_tokenizer, scheduler=tiny_scheduler())
    _quiet(reference._blocks)
    return ours, reference


CASES = {
    "one hint": dict(control_videos={"edge": edge_like(9, 64, 64, 0)}, num_inference_steps=4),
    "two hints, both guidance axes, intervals": dict(
        control_videos={"depth": smooth_like(9, 32, 48, 1), "edge": edge_like(9, 32, 48, 2)}, height=32, width=48,
        negative_prompt="blurry, low quality", num_inference_steps=6, guidance_scale=4.0, control_guidance=2.0,
        guidance_interval=(500, 1000)),
    "three windows": dict(control_videos={"edge": edge_like(21, 64, 64, 3), "blur": smooth_like(21, 64, 64, 4)},
                          num_inference_steps=4, num_video_frames_per_chunk=9, num_conditional_frames=1),
    "four windows, 2 latent frames carried, control axis": dict(
        control_videos={"edge": edge_like(21, 64, 64, 3), "blur": smooth_like(21, 64, 64, 4)}, num_inference_steps=4,
        num_video_frames_per_chunk=9, num_conditional_frames=5, control_guidance=1.5,
        control_guidance_interval=(500, 1000)),
    "one frame": dict(control_videos={"seg": smooth_like(1, 64, 64, 5)}, num_inference_steps=3),
    "hints of other lengths": dict(control_videos={"seg": smooth_like(6, 64, 64, 6), "edge": edge_like(10, 64, 64, 7)},
                                   num_inference_steps=3),
    "first window seeded by a video": dict(
        control_videos={"edge": edge_like(17, 64, 64, 8)}, video=smooth_like(5, 64, 64, 9),
        num_first_chunk_conditional_frames=1, num_video_frames_per_chunk=9, num_inference_steps=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_modular_reference(pipes, case):
    ours, reference = pipes
    kwargs = {"height": 64, "width": 64, **CASES[case]}
    theirs = reference(prompt=PROMPT, generator=gen(42), output_type="np", output="videos", **kwargs)
    mine = ours(PROMPT, generator=gen(42), output_type="np", **kwargs).frames
    assert mine.shape == (1, *theirs.shape)
    assert np.abs(mine[0] - theirs).max() <= 1e-4


def test_a_batch_equals_each_sample_alone(pipes):
    ours, _ = pipes
    clips = [{"edge": edge_like(9, 32, 32, 10)},
             {"edge": edge_like(13, 32, 32, 11), "blur": smooth_like(13, 32, 32, 12)}]
    kwargs = dict(height=32, width=32, num_inference_steps=3, num_video_frames_per_chunk=9, control_guidance=1.5,
                  output_type="np")
    prompts = ["a red car", "waves on a beach"]
    batch = ours(prompts, control_videos=clips, num_videos_per_prompt=2,
                 generator=[gen(s) for s in range(4)], **kwargs).frames
    assert [len(f) for f in batch] == [9, 9, 13, 13]  # a list: the clips differ in length
    for i in range(4):
        alone = ours(prompts[i // 2], control_videos=clips[i // 2], generator=gen(i), **kwargs).frames[0]
        assert np.abs(batch[i] - alone).max() <= 1e-5
    assert np.abs(batch[0] - batch[1]).max() > 1e-3  # different seeds, different videos


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(control_videos={"canny": edge_like(5, 32, 32, 0)}), ValueError, r"unknown hints \['canny'\]"),
    (dict(control_videos={}), ValueError, "non-empty dict"),
    (dict(control_videos={"edge": None}), ValueError, r"\['edge'\] are None"),
    (dict(control_videos={"edge": []}), ValueError, r"`control_videos\['edge'\]` is empty"),
    (dict(control_videos={"edge": torch.zeros(5, 32, 32)}), ValueError, r"`control_videos\['edge'\]`"),
    (dict(control_videos=[{"edge": edge_like(5, 32, 32, 0)}] * 2), ValueError, "2 entries for 1 prompts"),
    (dict(num_video_frames_per_chunk=5, num_conditional_frames=5), ValueError, "leaves no new frames"),
    (dict(height=40), ValueError, "`height` must be a multiple of 16"),
    (dict(guidance_interval=(900, 100)), ValueError, "`guidance_interval` must be None or"),
    (dict(control_guidance=float("nan")), ValueError, "`control_guidance` must be a finite number"),
    (dict(output_type="latent"), ValueError, "not available for transfer"),
    (dict(num_conditional_frames=0), ValueError, "`num_conditional_frames` must be an int >= 1"),
])
def test_bad_inputs_are_refused(pipes, kwargs, error, match):
    ours, _ = pipes
    call = {"control_videos": {"edge": edge_like(9, 32, 32, 0)}, "height": 32, "width": 32, "num_inference_steps": 1,
            **kwargs}
    with pytest.raises(error, match=match):
        ours(PROMPT, **call)


def test_window_geometry_and_time_padding():
    assert chunk_geometry(21, 9, 1) == (9, 8, 3)
    assert chunk_geometry(21, 9, 5) == (9, 4, 4)
    assert chunk_geometry(10, None, 1) == (13, 13, 1)  # rounded up to 1 + 4k
    assert chunk_geometry(1, 9, 1) == (1, 1, 1)
    x = torch.arange(3.0).view(1, 1, 3, 1, 1)
    assert pad_time(x, 7).flatten().tolist() == [0, 1, 2, 2, 1, 1, 2]  # the reference's reflection, step by step
