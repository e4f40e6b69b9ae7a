import math

import pytest
import torch

from cosmos3 import flow


def test_interpolation_and_target_are_consistent():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    x_t = flow.add_noise(x0, noise, t)
    assert torch.allclose(x_t[0], x0[0]) and torch.allclose(x_t[2], noise[2])
    assert torch.allclose(x_t[1], 0.3 * noise[1] + 0.7 * x0[1])
    v = flow.velocity_target(x0, noise)
    assert torch.allclose(flow.predict_x0(x_t, v, t), x0, atol=1e-6)
    # d x_t / d t is the velocity
    eps = 1e-3
    assert torch.allclose((flow.add_noise(x0, noise, t + eps) - x_t) / eps, v, atol=1e-3)


def test_clean_mask_keeps_conditioning_frames():
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.zeros(2, 3, 1)
    mask[:, 0] = 1
    x_t = flow.add_noise(x0, noise, 0.8, clean_mask=mask)
    assert torch.equal(x_t[:, 0], x0[:, 0])
    assert torch.allclose(x_t[:, 1:], 0.8 * noise[:, 1:] + 0.2 * x0[:, 1:])


@pytest.mark.parametrize("distribution", flow.TIMESTEP_DISTRIBUTIONS)
def test_timestep_sampling_is_seeded_and_in_range(distribution):
    a = flow.sample_timesteps(4096, distribution, generator=torch.Generator().manual_seed(1))
    b = flow.sample_timesteps(4096, distribution, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_timestep_distribution_shapes():
    g = torch.Generator().manual_seed(0)
    logit = flow.sample_timesteps(200_000, "logitnormal", generator=g)
    assert abs(logit.mean().item() - 0.5) < 0.01  # symmetric about 1/2
    waver = flow.sample_timesteps(200_000, "waver", generator=g)
    uniform_u = torch.tensor([0.0, 0.5, 1.0])
    # waver is a decreasing map of u through (0, 1), (1/2, 1/2), (1, 0) that thins out both extremes
    assert 0.1 < (waver > 0.75).float().mean() < 0.16 and 0.1 < (waver < 0.25).float().mean() < 0.16
    t = 1 - uniform_u - 1.29 * (torch.cos(math.pi * uniform_u / 2) ** 2 - 1 + uniform_u)
    assert torch.allclose(t, torch.tensor([1.0, 0.5, 0.0]), atol=1e-6)


def test_shift_and_resolution():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(flow.shift_timesteps(t, 1.0), t)
    shifted = flow.shift_timesteps(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and torch.all(shifted[1:-1] > t[1:-1])
    assert flow.resolution_shift(192, 320) == 3.0
    assert flow.resolution_shift(480, 832) == 5.0
    assert flow.resolution_shift(720, 1280) == 10.0
    assert flow.resolution_tier(704, 1280) == 720
    with pytest.raises(ValueError, match="shift"):
        flow.shift_timesteps(t, 0.0)
    with pytest.raises(ValueError, match="height"):
        flow.resolution_tier(0, 5)
    with pytest.raises(ValueError, match="distribution"):
        flow.sample_timesteps(3, "cosine")


def test_masked_loss_ignores_clean_frames_and_padded_channels():
    pred, target = torch.zeros(2, 4, 6), torch.ones(2, 4, 6)
    target[:, 0] = 100.0  # a clean conditioning token: must not count
    target[:, :, 3:] = 50.0  # padded action channels: must not count
    token_mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]]).view(2, 4, 1)
    channel_mask = torch.tensor([1, 1, 1, 0, 0, 0]).view(1, 1, 6)
    assert flow.masked_mse(pred, target, token_mask * channel_mask).item() == pytest.approx(1.0)
    # a sample with nothing to predict is skipped, not a division by zero
    empty = torch.zeros(2, 4, 1)
    empty[0, 1] = 1
    assert flow.masked_mse(pred, target, empty * channel_mask).item() == pytest.approx(1.0)


def test_loss_weights():
    total = flow.flow_matching_loss({"vision": torch.tensor(1.0), "sound": torch.tensor(1.0),
                                     "action": torch.tensor(1.0)})
    assert total.item() == pytest.approx(flow.LOSS_SCALE * (1 + 2 + 10))
    with pytest.raises(ValueError, match="No loss weight"):
        flow.flow_matching_loss({"text": torch.tensor(1.0)})
