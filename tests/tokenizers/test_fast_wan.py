"""`accelerate_wan_vae`: the faster Wan VAE modules give diffusers' outputs and gradients, swap back, and refuse
other models."""

import copy

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

from cosmos3.tokenizers import fast_wan
from cosmos3.tokenizers.fast_wan import (
    FastWanCausalConv3d,
    FastWanRMS_norm,
    _inverse_norm,
    accelerate_wan_vae,
    restore_wan_vae,
)
from cosmos3.training import vae as V


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def video(frames=5, height=32, width=48, seed=0):
    return torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def classes(vae):
    return [type(m) for m in vae.modules()]


def assert_close(actual, expected, rel=1e-5):
    """max |actual - expected| <= rel * max |expected| (and at least 1e-30, for all-zero tensors)."""
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} * {scale:.3g}"


@pytest.fixture
def pair(tiny_vae):
    return tiny_vae, accelerate_wan_vae(copy.deepcopy(tiny_vae))


PATHS = ["onednn", "conv3d", "conv3d-pads-inside"]


@pytest.fixture
def conv_path(request, monkeypatch):
    """Which convolution the fast causal conv runs: oneDNN directly (counted), or F.conv3d padded first (as on CPU
    without oneDNN) or with its own padding (as on CUDA)."""
    calls = []
    mkldnn_convolution = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(1) or mkldnn_convolution(*a))
    if request.param != "onednn":
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    if request.param == "conv3d-pads-inside":
        monkeypatch.setattr(fast_wan, "_pads_inside", lambda x: True)
    yield request.param, calls
    assert request.param == "onednn" or not calls


@pytest.mark.parametrize("conv_path", PATHS, indirect=True)
def test_encode_decode_match_diffusers(pair, conv_path):
    reference, fast = pair
    x, z = video(), randn(1, 8, 3, 4, 6)
    with torch.no_grad():
        assert_close(fast.encode(x).latent_dist.parameters, reference.encode(x).latent_dist.parameters)
        assert_close(fast.decode(z).sample, reference.decode(z).sample)
    path, onednn_calls = conv_path
    assert bool(onednn_calls) == (path == "onednn")


def test_bfloat16_is_close(pair):
    reference, fast = (vae.to(torch.bfloat16) for vae in pair)
    z = randn(1, 8, 2, 2, 3, dtype=torch.bfloat16)
    with torch.no_grad():
        expected, actual = reference.decode(z).sample, fast.decode(z).sample
    assert actual.dtype == torch.bfloat16
    assert_close(actual, expected, rel=0.05)


def test_gradients_match_diffusers(pair):
    """The differentiable passes VAE training uses: gradients for the weights and the input agree."""
    grads = []
    for vae in pair:
        vae.train()
        x = video(5, 32, 32).requires_grad_()
        moments = V.encode_moments(vae, x)
        recon = V.decode_latents(vae, moments[:, :8])
        loss = moments.square().mean() + (recon - x.detach()).square().mean()
        params = [p for _, p in vae.named_parameters()]
        grads.append(torch.autograd.grad(loss, [x, *params]))
    for actual, expected in zip(grads[1], grads[0]):
        assert_close(actual, expected, rel=1e-4)


@pytest.mark.parametrize(
    "kernel,padding,stride,cache_frames",
    [
        (3, 1, 1, None),
        (3, 1, 1, 1),
        (3, 1, 1, 2),
        ((3, 1, 1), (1, 0, 0), 1, 2),  # upsample3d's time_conv
        ((3, 1, 1), 0, (2, 1, 1), 1),  # downsample3d's time_conv (its cache is concatenated by the caller)
        (1, 0, 1, 2),  # a shortcut: no time padding, so the cache is ignored
    ],
)
@pytest.mark.parametrize("conv_path", PATHS, indirect=True)
def test_causal_conv_matches_diffusers(kernel, padding, stride, cache_frames, conv_path):
    torch.manual_seed(0)
    conv = WanCausalConv3d(4, 6, kernel, stride=stride, padding=padding)
    fast = copy.deepcopy(conv)
    fast.__class__ = FastWanCausalConv3d
    x, cache = randn(1, 4, 3, 5, 7, seed=1), None if cache_frames is None else randn(1, 4, cache_frames, 5, 7, seed=2)
    outs = []
    for module in (conv, fast):
        xg = x.clone().requires_grad_()
        out = module(xg, cache)
        outs.append((out, *torch.autograd.grad(out.square().sum(), [xg, module.weight, module.bias])))
    for actual, expected in zip(outs[1], outs[0]):
        assert actual.shape == expected.shape
        assert_close(actual, expected)
    path, onednn_calls = conv_path
    assert bool(onednn_calls) == (path == "onednn" and conv.kernel_size[1:] != (1, 1))  # 1x1: ATen's choice


@pytest.mark.parametrize("images,bias", [(False, False), (True, True)])
def test_rms_norm_matches_diffusers_including_the_eps_clamp(images, bias):
    torch.manual_seed(0)
    norm = WanRMS_norm(6, images=images, bias=bias)
    with torch.no_grad():
        norm.gamma.normal_(1.0, 0.2)
        if bias:
            norm.bias.normal_(0.0, 0.2)
    fast = copy.deepcopy(norm)
    fast.__class__ = FastWanRMS_norm
    x = randn(2, 6, 3, 4, 5) if not images else randn(2, 6, 4, 5)
    x[0, :, 0] = 0.0  # a zero vector: both clamp the norm at 1e-12
    x[1, :, 1] *= 1e-14  # a norm under eps: both divide by 1e-12, not by the norm
    outs = []
    for module in (norm, fast):
        xg = x.clone().requires_grad_()
        out = module(xg)
        outs.append((out, *torch.autograd.grad(out.square().sum(), [xg, module.gamma])))
    for actual, expected in zip(outs[1], outs[0]):
        assert_close(actual, expected)
    with torch.no_grad():
        assert_close(fast(x), norm(x))  # the in-place path
        half = x.to(torch.bfloat16)
        assert fast(half).dtype == norm(half).dtype == torch.float32  # bf16 input, fp32 gamma: diffusers promotes
        assert_close(fast(half), norm(half), rel=1e-2)


def test_inverse_norm_reductions_agree():
    x = randn(2, 5, 3, 4, 6)
    x[0, :, 0] = 0.0
    assert_close(_inverse_norm(x, cpu_reduction=False), _inverse_norm(x, cpu_reduction=True))
    half = x.to(torch.bfloat16)
    assert _inverse_norm(half, cpu_reduction=False).dtype == torch.float32
    assert_close(_inverse_norm(half, cpu_reduction=False), _inverse_norm(half, cpu_reduction=True))


def test_swap_is_idempotent_restorable_and_keeps_the_state_dict(tiny_vae):
    original = classes(tiny_vae)
    state = {k: v.clone() for k, v in tiny_vae.state_dict().items()}
    z = randn(1, 8, 2, 2, 3)
    with torch.no_grad():
        expected = tiny_vae.decode(z).sample

    assert accelerate_wan_vae(tiny_vae) is tiny_vae
    fast = classes(tiny_vae)
    assert FastWanCausalConv3d in fast and FastWanRMS_norm in fast
    assert WanCausalConv3d not in fast and WanRMS_norm not in fast
    accelerate_wan_vae(tiny_vae)
    assert classes(tiny_vae) == fast
    assert tiny_vae.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in tiny_vae.state_dict().items())

    assert restore_wan_vae(tiny_vae) is tiny_vae
    assert classes(tiny_vae) == original
    restore_wan_vae(tiny_vae)
    assert classes(tiny_vae) == original
    with torch.no_grad():
        assert torch.equal(tiny_vae.decode(z).sample, expected)


@pytest.mark.parametrize("fn", [accelerate_wan_vae, restore_wan_vae])
@pytest.mark.parametrize("model", [torch.nn.Conv3d(3, 3, 3), "vae", None])
def test_rejects_what_is_not_a_wan_vae(fn, model):
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        fn(model)


def test_big_weights_stay_on_aten(monkeypatch):
    """Above `_MKLDNN_MAX_WEIGHT` the conv leaves the backend to ATen (oneDNN's weight reorder costs too much)."""
    calls = []
    mkldnn_convolution = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(1) or mkldnn_convolution(*a))
    torch.manual_seed(0)
    conv = WanCausalConv3d(4, 6, 3, padding=1)
    fast = copy.deepcopy(conv)
    fast.__class__ = FastWanCausalConv3d
    x = randn(1, 4, 3, 5, 7)
    monkeypatch.setattr(fast_wan, "_MKLDNN_MAX_WEIGHT", conv.weight.numel() - 1)
    with torch.no_grad():
        assert_close(fast(x), conv(x))
    assert not calls
    monkeypatch.setattr(fast_wan, "_MKLDNN_MAX_WEIGHT", conv.weight.numel())
    with torch.no_grad():
        fast(x)
    assert calls or not torch.backends.mkldnn.is_available()
