"""World-action modes (policy, forward and inverse dynamics) against the reference pipeline."""

import numpy as np
import pytest
import torch
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition
from PIL import Image

from cosmos3.pipelines import ActionRequest, Cosmos3WorldActionPipeline

from .conftest import gen

COMMON = dict(num_inference_steps=3, output_type="np", fps=15.0)


def picture(seed, size=(40, 64)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def pipeline(parts):
    pipe = Cosmos3WorldActionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def condition(mode, seed=0):
    kw = dict(mode=mode, chunk_size=8, domain_name="bridge_orig_lerobot", resolution_tier=256)
    if mode == "inverse_dynamics":
        kw["video"] = [picture(seed + i) for i in range(9)]
    else:
        kw["image"] = picture(seed)
    if mode == "forward_dynamics":
        kw["raw_actions"] = torch.randn(6, 10, generator=torch.Generator().manual_seed(seed))
    return kw


@pytest.mark.parametrize("mode", ["policy", "forward_dynamics", "inverse_dynamics"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_matches_reference(components, mode, guidance_scale):
    parts, reference = components
    kw = condition(mode)
    expected = reference("pick up the block", action=CosmosActionCondition(**kw), generator=gen(4),
                         guidance_scale=guidance_scale, **COMMON)
    request = ActionRequest(mode=mode, chunk_size=8, domain_name=kw["domain_name"], resolution_tier=256,
                            image=kw.get("image"), video=kw.get("video"), actions=kw.get("raw_actions"))
    got = pipeline(parts)("pick up the block", request, generator=gen(4), guidance_scale=guidance_scale, **COMMON)
    assert got.frames[0].shape == expected.video.shape
    assert np.abs(got.frames[0] - expected.video).max() <= 1e-4
    if mode == "forward_dynamics":
        assert expected.action is None and got.action == [None]
    else:
        assert got.action[0].shape == expected.action[0].shape == (8, 10)
        assert (got.action[0] - expected.action[0]).abs().max() <= 1e-4


def test_batch_of_modes_equals_one_by_one(components):
    parts, _ = components
    pipe = pipeline(parts)
    requests = [
        ActionRequest(mode="policy", chunk_size=8, domain_name="droid_lerobot", image=picture(1), resolution_tier=256),
        ActionRequest(mode="forward_dynamics", chunk_size=8, domain_name="fractal", image=picture(2),
                      actions=torch.randn(8, 10), resolution_tier=256),
    ]
    prompts = ["open the drawer", "push the cup left"]
    batch = pipe(prompts, requests, generator=[gen(0), gen(1)], **COMMON)
    for i in range(2):
        single = pipe(prompts[i], requests[i], generator=gen(i), **COMMON)
        assert np.abs(batch.frames[i] - single.frames[0]).max() <= 1e-5
        if single.action[0] is not None:
            assert (batch.action[i] - single.action[0]).abs().max() <= 1e-5
    assert batch.action[1] is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="teleport"), "`mode` must be one of"),
        (dict(domain_name="libero"), "'libero' has no fixed action width: give `action_dim`"),
        (dict(domain_name="lybero"), "Unknown `domain_name` 'lybero'"),
        (dict(action_dim=7), r"`action_dim` must be 10 \(the domain's width\)"),
        (dict(chunk_size=0), "`chunk_size` must be an int >= 1"),
        (dict(resolution_tier=300), "`resolution_tier` must be one of"),
        (dict(mode="forward_dynamics"), r"`actions` for forward dynamics must be a tensor \[T >= 1, 10\]"),
        (dict(mode="inverse_dynamics"), "needs `video`"),
        (dict(actions=torch.zeros(8, 10)), "pass them only for forward_dynamics"),
        (dict(video=[picture(0)]), "exactly one of `image` and `video`"),
    ],
)
def test_invalid_requests(kwargs, match):
    fields = dict(mode="policy", chunk_size=8, domain_name="bridge_orig_lerobot", image=picture(0))
    with pytest.raises(ValueError, match=match):
        ActionRequest(**{**fields, **kwargs})


def test_a_domain_without_a_fixed_width_takes_action_dim(components):
    parts, _ = components
    pipe = Cosmos3WorldActionPipeline(**parts)
    request = ActionRequest(mode="policy", chunk_size=4, domain_name="libero", action_dim=7, image=picture(0),
                            resolution_tier=256)
    out = pipe("pick up the cup", request, generator=gen(0), **COMMON)
    assert out.action[0].shape == (4, 7)


@pytest.mark.parametrize("chunk", [5, 6])
def test_chunks_that_are_not_a_multiple_of_4_match_reference(components, chunk):
    parts, reference = components
    kw = dict(mode="policy", chunk_size=chunk, domain_name="fractal", resolution_tier=256, image=picture(3))
    expected = reference("push the cup", action=CosmosActionCondition(**kw), generator=gen(1), guidance_scale=1.0,
                         **COMMON)
    got = pipeline(parts)("push the cup", ActionRequest(**kw), generator=gen(1), guidance_scale=1.0, **COMMON)
    assert np.abs(got.frames[0] - expected.video).max() <= 1e-4
    assert (got.action[0] - expected.action[0]).abs().max() <= 1e-4


def test_a_policy_encodes_its_first_frame_only(components, encoded_lengths):
    parts, _ = components
    pipe = pipeline(parts)
    for mode in ["policy", "forward_dynamics", "inverse_dynamics"]:
        kw = condition(mode)
        pipe("pick up the block", ActionRequest(mode=mode, chunk_size=8, domain_name=kw["domain_name"],
                                                resolution_tier=256, image=kw.get("image"), video=kw.get("video"),
                                                actions=kw.get("raw_actions")),
             generator=gen(0), **{**COMMON, "num_inference_steps": 1})
    assert encoded_lengths == [1, 1, 9]  # the reference encodes 9 frames every time


@pytest.mark.parametrize("image,match", [
    (np.zeros((40, 40, 4), np.uint8), r"`image` frame 0 must be an RGB image .* got shape \(40, 40, 4\)"),
    (np.zeros((40, 40), np.uint8), r"`image` frame 0 must be an RGB image .* got shape \(40, 40\)"),
])
def test_rgba_and_grayscale_arrays_are_refused_clearly(components, image, match):
    parts, _ = components
    pipe = Cosmos3WorldActionPipeline(**parts)
    request = ActionRequest(mode="policy", chunk_size=4, domain_name="bridge_orig_lerobot", image=image,
                            resolution_tier=64)
    with pytest.raises(ValueError, match=match):
        pipe("pick it up", request, num_inference_steps=1)


def test_rgba_and_grayscale_pil_images_are_read_as_rgb(components):
    from PIL import Image

    parts, _ = components
    pipe = Cosmos3WorldActionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    outs = []
    for image in (rgb, rgb.convert("RGBA")):
        request = ActionRequest(mode="policy", chunk_size=4, domain_name="bridge_orig_lerobot", image=image,
                                resolution_tier=64)
        outs.append(pipe("pick it up", request, num_inference_steps=1, generator=gen(0), output_type="np").action[0])
    assert torch.equal(outs[0], outs[1])
