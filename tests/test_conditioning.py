"""The conditioning layer: one request type, the clean/noisy rules, and the checks every caller shares."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cosmos3.conditioning import (
    Cosmos3Request,
    action_mode_conditioning,
    check_video_size,
    guide,
    keep_clean,
    renoise,
    resolve_device,
)
from cosmos3.models.layout import Cosmos3Sample


def world_action_request(mode="forward_dynamics"):
    vision_clean, action_clean = action_mode_conditioning(mode, 3, 8)
    return Cosmos3Request([1, 2, 3], vision=torch.randn(4, 3, 2, 2), vision_condition_frames=vision_clean, fps=10.0,
                          action=torch.randn(8, 6), action_condition_frames=action_clean, action_domain_id=2,
                          raw_action_dim=4, negative_ids=[9])


def test_to_sample_describes_the_request_and_its_negative():
    r = world_action_request()
    assert r.to_sample() == Cosmos3Sample(text_ids=[1, 2, 3], vision_shape=(3, 2, 2), vision_condition_frames=(0,),
                                          fps=10.0, action_length=8, action_condition_frames=tuple(range(8)),
                                          action_domain_id=2)
    assert r.to_sample(negative=True).text_ids == [9]
    with pytest.raises(ValueError, match="no `negative_ids`"):
        Cosmos3Request([1], vision_shape=(4, 1, 2, 2)).to_sample(negative=True)


@pytest.mark.parametrize("mode,vision,actions", [
    ("policy", (0,), ()), ("forward_dynamics", (0,), tuple(range(8))), ("inverse_dynamics", (0, 1, 2), ()),
])
def test_each_mode_says_what_is_clean(mode, vision, actions):
    assert action_mode_conditioning(mode, 3, 8) == (vision, actions)


def test_masks_mark_clean_positions_and_the_loss_skips_them_and_padding():
    r = world_action_request("policy")
    assert r.clean_mask("vision").flatten().tolist() == [1.0, 0.0, 0.0]
    assert r.clean_mask("action").sum() == 0
    loss = r.loss_mask("action")
    assert loss[:, :4].eq(1).all() and loss[:, 4:].eq(0).all()
    assert r.loss_mask("vision")[:, 0].eq(0).all() and r.loss_mask("vision")[:, 1:].eq(1).all()


def test_keep_clean_puts_back_only_the_clean_frames():
    r = world_action_request("policy")
    x = torch.randn(4, 3, 2, 2)
    out = keep_clean(x, r.vision, r.clean_mask("vision"))
    assert torch.equal(out[:, 0], r.vision[:, 0]) and torch.equal(out[:, 1:], x[:, 1:])
    assert keep_clean(x, None, r.clean_mask("vision")) is x


def test_renoise_is_the_schedulers_stochastic_step():
    scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=1.0)
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5])
    x, v = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    theirs = scheduler.step(v, scheduler.timesteps[1], x, generator=torch.Generator().manual_seed(0)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    sigma, next_sigma = scheduler.sigmas[1].item(), scheduler.sigmas[2].item()
    torch.testing.assert_close(renoise(x, v, sigma, next_sigma, noise), theirs, rtol=0, atol=1e-6)


def test_guide():
    assert guide(torch.tensor(3.0), torch.tensor(1.0), 2.0) == 5.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(text_ids=[1]), r"`vision_shape` must be 4 positive ints"),
    (dict(text_ids=[1], vision=torch.zeros(4, 2, 2)), r"`vision` must be clean latents \[C, T, h, w\]"),
    (dict(text_ids=[1], vision=torch.zeros(4, 2, 2, 2), vision_shape=(4, 3, 2, 2)), "differs from `vision`"),
    (dict(text_ids=[1], vision_shape=(4, 2, 2, 2), vision_condition_frames=(0,)), "needs `vision`"),
    (dict(text_ids=[1], vision_shape=(4, 2, 2, 2), action_condition_frames=(0,)), "needs `action`"),
    (dict(text_ids=[1], vision_shape=(4, 2, 2, 2), sound_length=-1), "`sound_length` must be an int >= 0"),
])
def test_bad_requests_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Cosmos3Request(**kwargs)


@pytest.mark.parametrize("size,match", [
    ((8, 32, 32), r"`num_frames` must be 1 \+ 4k, got 8 \(nearest: 5, 9\)"),
    ((9, 40, 32), r"`height` must be a multiple of 16, got 40 \(nearest: 32, 48\)"),
    ((9, 32, 8), r"`width` must be a multiple of 16, got 8 \(nearest: 16, 32\)"),
    ((0, 32, 32), r"`num_frames` must be a positive int, got 0"),
])
def test_sizes_the_vae_would_round_are_refused(size, match):
    with pytest.raises(ValueError, match=match):
        check_video_size(*size)
    check_video_size(9, 32, 48)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="`--device` 'gpu0' is not a torch device"):
        resolve_device("gpu0", name="--device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            resolve_device("cuda")
