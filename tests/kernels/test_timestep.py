"""`add_timestep_embedding` against its eager reference (the expression of `Cosmos3Transformer.forward`)."""

import pytest
import torch

from cosmos3 import Cosmos3Sample
from cosmos3.kernels import add_timestep_embedding, add_timestep_embedding_reference, timestep

from .conftest import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def layout_inputs(model, device):
    """A two-sample layout of the tiny model: image-to-video with sound and actions, then text-to-image."""
    samples = [
        Cosmos3Sample(text_ids=[1, 2, 3], vision_shape=(3, 4, 4), vision_condition_frames=(0,), fps=24.0,
                      sound_length=3, action_length=4, action_condition_frames=(0,), action_domain_id=2),
        Cosmos3Sample(text_ids=[4, 5], vision_shape=(1, 4, 6)),
    ]
    layout = model.build_layout(samples)
    return layout, layout.gen_sample_ids.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("modality", ["vision_noisy_index", "sound_noisy_index", "action_noisy_index"])
def test_matches_reference_on_a_layout(dtype, modality, tiny_model, device, kernels_launch):
    layout, sample_ids = layout_inputs(tiny_model, device)
    index = getattr(layout, modality).to(device)
    hidden = make((len(sample_ids), tiny_model.config.hidden_size), dtype, device)
    temb = make((layout.batch_size, tiny_model.config.hidden_size), dtype, device, seed=1)
    expected = add_timestep_embedding_reference(hidden, temb, index, sample_ids)
    assert not torch.equal(expected, hidden)
    assert_close(add_timestep_embedding(hidden, temb, index, sample_ids), expected, exact_fraction=1.0)


@pytest.mark.parametrize("index", [[], [0, 5, 9], [9, 0, 3, 3]], ids=["none", "some", "repeated"])
@pytest.mark.parametrize("dim", [8, 40, 1500])
def test_matches_reference(index, dim, device, kernels_launch):
    """Repeated rows are added once per occurrence, as `index_add` does; D past one column block (1024)."""
    hidden = make((10, dim), torch.float32, device)
    temb = make((3, dim), torch.float32, device, seed=1)
    sample_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2], device=device, dtype=torch.int32)
    index = torch.tensor(index, device=device, dtype=torch.long)
    expected = add_timestep_embedding_reference(hidden, temb, index, sample_ids)
    assert_close(add_timestep_embedding(hidden, temb, index, sample_ids), expected)


def test_strided_hidden(device, kernels_launch):
    hidden = make((6, 20), torch.bfloat16, device)[:, :16]
    temb = make((2, 16), torch.bfloat16, device, seed=1)
    sample_ids = torch.tensor([0, 0, 0, 1, 1, 1], device=device)
    index = torch.tensor([1, 4, 5], device=device)
    expected = add_timestep_embedding_reference(hidden, temb, index, sample_ids)
    assert_close(add_timestep_embedding(hidden, temb, index, sample_ids), expected, exact_fraction=1.0)


def test_kernel_runs_rather_than_the_reference(monkeypatch, device, kernels_launch):
    def fail(*args):
        raise AssertionError("the eager fallback ran")

    monkeypatch.setattr(timestep, "add_timestep_embedding_reference", fail)
    hidden = make((4, 8), torch.float32, device)
    add_timestep_embedding(hidden, hidden[:2], torch.tensor([1, 3], device=device),
                           torch.tensor([0, 0, 1, 1], device=device))


def test_fallback_is_the_reference(monkeypatch):
    monkeypatch.setattr(timestep, "can_launch", lambda kernel, x: False)
    hidden, temb = make((5, 8), torch.bfloat16, "cpu"), make((2, 8), torch.bfloat16, "cpu", seed=1)
    index, sample_ids = torch.tensor([0, 4]), torch.tensor([0, 0, 1, 1, 1])
    assert torch.equal(add_timestep_embedding(hidden, temb, index, sample_ids),
                       add_timestep_embedding_reference(hidden, temb, index, sample_ids))


H, T, I, S = torch.randn(4, 8), torch.randn(2, 8), torch.tensor([0, 3]), torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("call, error, match", [
    (lambda: add_timestep_embedding(H[0], T, I, S), ValueError, r"`hidden` must be 2-D, got shape \(8,\)"),
    (lambda: add_timestep_embedding(H, T[:, :4], I, S), ValueError, r"`temb` must have shape \(B, 8\)"),
    (lambda: add_timestep_embedding(H, T.half(), I, S), TypeError, r"`temb` must have hidden's dtype torch.float32"),
    (lambda: add_timestep_embedding(H, T, I.float(), S), TypeError, r"`index` has dtype torch.float32; supported: "),
    (lambda: add_timestep_embedding(H, T, I, S[:3]), ValueError, r"`sample_ids` must have one entry per row of hidden"),
    (lambda: add_timestep_embedding(H.double(), T.double(), I, S), TypeError, r"`hidden` has dtype torch.float64"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
