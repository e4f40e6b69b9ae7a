"""Vision tokenizer against the reference pipeline: latents, preprocessing, decoding."""

import numpy as np
import pytest
import torch
from PIL import Image

from cosmos3.tokenizers.vision import (
    Cosmos3VisionTokenizer,
    postprocess_video,
    preprocess_image,
    preprocess_video,
)


def video(frames=9, height=32, width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1


@pytest.mark.parametrize("frames,height,width", [(1, 32, 32), (9, 32, 48), (5, 48, 16)])
def test_latents_identical_to_reference(reference_pipeline, frames, height, width):
    x = video(frames, height, width)
    tokenizer = Cosmos3VisionTokenizer(reference_pipeline.vae)
    ours = tokenizer.encode(x)
    assert torch.equal(ours, reference_pipeline._encode_video(x))
    assert ours.shape[1:] == tokenizer.latent_shape(frames, height, width)


def test_decode_identical_to_reference_path(reference_pipeline):
    tokenizer = Cosmos3VisionTokenizer(reference_pipeline.vae)
    latents = tokenizer.encode(video())
    vae = reference_pipeline.vae
    mean = reference_pipeline._vae_latents_mean.view(1, -1, 1, 1, 1)
    inv_std = reference_pipeline._vae_latents_inv_std.view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = vae.decode(latents / inv_std + mean).sample
    assert torch.equal(tokenizer.decode(latents), expected)


def test_streaming_decode_equals_full_decode(tiny_vae):
    tokenizer = Cosmos3VisionTokenizer(tiny_vae)
    latents = torch.randn(2, 8, 4, 2, 3)
    chunks = list(tokenizer.iter_decode(latents))
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4]
    assert torch.equal(torch.cat(chunks, dim=2), tokenizer.decode(latents))


def test_tiled_decode_restores_the_vae_setting(tiny_vae):
    tokenizer = Cosmos3VisionTokenizer(tiny_vae)
    tiny_vae.tile_sample_min_height = tiny_vae.tile_sample_min_width = 32
    tiny_vae.tile_sample_stride_height = tiny_vae.tile_sample_stride_width = 16
    latents = torch.randn(1, 8, 2, 4, 4)
    tiled = tokenizer.decode(latents, tiled=True)
    assert not tiny_vae.use_tiling
    plain = tokenizer.decode(latents)
    assert tiled.shape == plain.shape == (1, 3, 5, 64, 64)
    assert torch.isfinite(tiled).all() and not torch.equal(tiled, plain)  # tiles were used (blended seams)


def test_sizes_are_checked_not_rounded(tiny_vae):
    tokenizer = Cosmos3VisionTokenizer(tiny_vae)
    with pytest.raises(ValueError, match=r"`num_frames` must be 1 \+ 4k, got 8 \(nearest: 5, 9\)"):
        tokenizer.encode(video(frames=8))
    with pytest.raises(ValueError, match=r"`height` must be a multiple of 16, got 40 \(nearest: 32, 48\)"):
        tokenizer.encode(video(height=40))
    with pytest.raises(ValueError, match="`video` must be a float tensor"):
        tokenizer.encode(torch.zeros(1, 3, 9, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="`latents` must be"):
        tokenizer.decode(torch.zeros(1, 4, 2, 2, 2))


def test_encode_sample_uses_the_generator(tiny_vae):
    tokenizer = Cosmos3VisionTokenizer(tiny_vae)
    x = video()
    a = tokenizer.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    b = tokenizer.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, tokenizer.encode(x))


@pytest.mark.parametrize("size", [(37, 50), (64, 64), (120, 40), (17, 300)])
def test_image_preprocessing_equals_reference(size):
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import _preprocess_conditioning_image

    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    for image in (Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1,
                  torch.from_numpy(array).permute(2, 0, 1).float() / 255):
        ours = preprocess_image(image, 32, 48)
        assert ours.shape == (1, 3, 32, 48)
        assert torch.equal(ours, _preprocess_conditioning_image(image, 32, 48))


def test_video_preprocessing_equals_reference(reference_pipeline):
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 70, 3), dtype=np.uint8)) for i in range(5)]
    ours = preprocess_video(frames, 32, 48)
    assert torch.equal(ours, reference_pipeline.video_processor.preprocess_video(frames, height=32, width=48))
    assert ours.shape == (1, 3, 5, 32, 48)


def test_postprocess_to_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 1, 4).expand(1, 3, 1, 1, 4)
    out = postprocess_video(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 1, 4, 3)
    assert out[0, 0, 0, :, 0].tolist() == [0, 128, 255, 255]


def test_interleaved_streams_on_one_vae_do_not_interfere(tiny_vae):
    tokenizer = Cosmos3VisionTokenizer(tiny_vae)
    a, b = torch.randn(1, 8, 3, 2, 2), torch.randn(1, 8, 3, 2, 2)
    stream_a, stream_b = tokenizer.iter_decode(a), tokenizer.iter_decode(b)
    chunks_a, chunks_b = [], []
    for _ in range(3):
        chunks_a.append(next(stream_a))
        tokenizer.decode(b)  # a one-shot decode in between must not reset a stream's cache
        chunks_b.append(next(stream_b))
    assert torch.equal(torch.cat(chunks_a, 2), tokenizer.decode(a))
    assert torch.equal(torch.cat(chunks_b, 2), tokenizer.decode(b))
