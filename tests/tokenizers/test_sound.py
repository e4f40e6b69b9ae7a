"""Sound tokenizer: torch resampling, channel conversion, alignment with the video, AVAE round trip."""

import math

import pytest
import torch

from cosmos3.tokenizers.sound import Cosmos3SoundTokenizer, convert_channels, resample


def sine(freq, rate, seconds=1.0, phase=0.0):
    t = torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    return torch.sin(2 * math.pi * freq * t + phase)


@pytest.mark.parametrize("orig,new", [(44100, 48000), (16000, 48000), (48000, 22050), (8000, 48000)])
def test_resampled_sine_matches_the_analytic_sine(orig, new):
    x = sine(440.0, orig)
    y = resample(x, orig, new)
    assert y.shape[-1] == math.ceil(x.shape[-1] * new / orig)
    expected = sine(440.0, new)[: y.shape[-1]]
    edge = new // 50  # the first and last 20 ms see the zero padding
    assert (y - expected)[edge:-edge].abs().max() < 2e-3


def test_resample_removes_content_above_the_new_nyquist():
    x = sine(20000.0, 48000) + sine(1000.0, 48000)
    y = resample(x, 48000, 16000)
    assert (y - sine(1000.0, 16000)[: y.shape[-1]])[400:-400].abs().max() < 0.02


def test_resample_batches_and_identity():
    x = torch.randn(2, 3, 1000)
    y = resample(x, 8000, 12000)
    assert y.shape == (2, 3, 1500)
    assert torch.allclose(y[1, 2], resample(x[1, 2], 8000, 12000), atol=1e-6)
    assert resample(x, 8000, 8000) is x
    with pytest.raises(ValueError, match="`orig_sample_rate` must be a positive int"):
        resample(x, 0, 8000)
    with pytest.raises(ValueError, match="`waveform`"):
        resample(torch.zeros(10, dtype=torch.long), 8000, 16000)


def test_channel_conversion():
    mono = torch.randn(1, 100)
    stereo = convert_channels(mono, 2)
    assert stereo.shape == (2, 100) and torch.equal(stereo[0], stereo[1])
    assert torch.allclose(convert_channels(torch.stack([mono[0], -mono[0]]), 1), torch.zeros(1, 100))
    with pytest.raises(ValueError, match="Cannot convert 3-channel audio to 2 channels"):
        convert_channels(torch.randn(3, 10), 2)


@pytest.mark.parametrize("num_frames,fps", [(9, 16.0), (189, 24.0), (1, 24.0), (33, 10.0), (121, 30.0)])
def test_latent_length_matches_reference(reference_pipeline, num_frames, fps):
    tokenizer = Cosmos3SoundTokenizer(reference_pipeline.sound_tokenizer)
    out = reference_pipeline.prepare_latents(
        num_frames=num_frames, height=32, width=32, fps=fps, generator=torch.Generator().manual_seed(0),
        device="cpu", dtype=torch.float32, enable_sound=True,
    )
    sound_latents = out[1]
    assert sound_latents.shape == (tokenizer.latent_channels, tokenizer.latent_length(num_frames, fps))


def test_encode_decode(tiny_avae):
    tokenizer = Cosmos3SoundTokenizer(tiny_avae)
    audio = sine(50.0, 1600, seconds=1.0).float()[None]  # mono at twice the tokenizer's rate
    latents = tokenizer.encode(audio, 1600, num_frames=17, fps=16.0)
    assert latents.shape == (8, tokenizer.latent_length(17, 16.0))
    waveform = tokenizer.decode(latents)
    assert waveform.shape == (2, latents.shape[1] * tokenizer.hop_size)
    assert torch.equal(waveform, tiny_avae.decode(latents))
    assert waveform.abs().max() <= 1.0


def test_encode_is_per_clip(tiny_avae):
    """A loud clip must not change a quiet clip's latents (the AVAE normalizes volume per call)."""
    tokenizer = Cosmos3SoundTokenizer(tiny_avae)
    quiet = 0.1 * torch.randn(2, 800, generator=torch.Generator().manual_seed(1))
    a = tokenizer.encode(quiet, 800)
    tokenizer.encode(10 * torch.randn(2, 800), 800)
    assert torch.equal(a, tokenizer.encode(quiet, 800))
    with pytest.raises(ValueError, match="both `num_frames` and `fps`"):
        tokenizer.encode(quiet, 800, num_frames=9)


def test_latent_length_does_not_depend_on_training_mode(tiny_avae):
    tokenizer = Cosmos3SoundTokenizer(tiny_avae.train())
    latents = tokenizer.encode(torch.randn(2, 800), 800, num_frames=5, fps=24.0)
    assert latents.shape[1] == tokenizer.latent_length(5, 24.0)


def test_resampling_between_coprime_rates_is_refused_not_oom():
    with pytest.raises(ValueError, match="share too few factors"):
        resample(torch.zeros(100), 47999, 48000)
