"""Image-to-video and video-to-video against the reference pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image

from cosmos3.conditioning import encode_conditioning
from cosmos3.pipelines import Cosmos3ImageToVideoPipeline, Cosmos3VideoToVideoPipeline

from .conftest import gen

VIDEO = dict(num_frames=9, height=32, width=48, fps=16.0, num_inference_steps=3, output_type="np")


def picture(seed, size=(40, 70)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def pipeline(cls, parts):
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("seed", [0, 3])
def test_image_to_video_matches_reference(components, seed):
    parts, reference = components
    ours = pipeline(Cosmos3ImageToVideoPipeline, parts)
    image = picture(seed)
    expected = reference("a boat", image=image, generator=gen(seed), guidance_scale=4.0, **VIDEO).video
    got = ours(image, "a boat", generator=gen(seed), guidance_scale=4.0, **VIDEO).frames
    assert np.abs(got[0] - expected).max() <= 1e-4


@pytest.mark.parametrize("keep,indexes", [("first", (0, 1)), ("last", (0,)), ("first", (0, 2))])
def test_video_to_video_matches_reference(components, keep, indexes):
    parts, reference = components
    ours = pipeline(Cosmos3VideoToVideoPipeline, parts)
    clip = [picture(i) for i in range(7)]
    expected = reference("a river", video=clip, condition_frame_indexes_vision=list(indexes),
                         condition_video_keep=keep, generator=gen(2), guidance_scale=3.0, **VIDEO).video
    got = ours(clip, "a river", condition_frame_indexes=indexes, condition_video_keep=keep, generator=gen(2),
               guidance_scale=3.0, **VIDEO).frames
    assert np.abs(got[0] - expected).max() <= 1e-4


def test_batched_image_to_video_equals_one_by_one(components):
    parts, _ = components
    pipe = pipeline(Cosmos3ImageToVideoPipeline, parts)
    images, prompts = [picture(1), picture(2, (64, 64))], ["a boat", "a plane in a clear blue sky"]
    batch = pipe(images, prompts, generator=[gen(0), gen(1)], guidance_scale=4.0, **VIDEO).frames
    for i in range(2):
        single = pipe(images[i], prompts[i], generator=gen(i), guidance_scale=4.0, **VIDEO).frames
        assert np.abs(batch[i] - single[0]).max() <= 1e-5


def test_invalid_conditioning(components):
    parts, _ = components
    i2v = pipeline(Cosmos3ImageToVideoPipeline, parts)
    v2v = pipeline(Cosmos3VideoToVideoPipeline, parts)
    with pytest.raises(ValueError, match="`image` is required"):
        i2v(None, "a boat", **VIDEO)
    with pytest.raises(ValueError, match="`image` has 3 entries for 2 prompts"):
        i2v([picture(0)] * 3, ["a", "b"], **VIDEO)
    clip = [picture(i) for i in range(5)]
    with pytest.raises(ValueError, match=r"reach past the 3 latent frames"):
        v2v(clip, "a river", condition_frame_indexes=(0, 3), **VIDEO)
    with pytest.raises(ValueError, match="non-negative ints"):
        v2v(clip, "a river", condition_frame_indexes=(-1,), **VIDEO)
    with pytest.raises(ValueError, match="`condition_video_keep`"):
        v2v(clip, "a river", condition_video_keep="middle", **VIDEO)


def test_video_as_a_list_of_arrays_matches_reference(components):
    parts, reference = components
    clip = [np.asarray(picture(i)).astype(np.float32) / 255.0 for i in range(7)]
    expected = reference("a river", video=clip, generator=gen(2), **VIDEO).video
    got = pipeline(Cosmos3VideoToVideoPipeline, parts)(clip, "a river", generator=gen(2), **VIDEO).frames
    assert np.abs(got[0] - expected).max() <= 1e-4


def test_encode_conditioning_equals_the_full_encode_where_read(components):
    # The Wan VAE is causal in time: the leading latent frames of a whole clip are those of its prefix (to rounding).
    parts, _ = components
    tokenizer = pipeline(Cosmos3ImageToVideoPipeline, parts).vision_tokenizer
    clip = torch.rand(1, 3, 13, 32, 48, generator=gen(0)) * 2 - 1
    full = tokenizer.encode(clip)[0]  # [C, 4, h, w]
    for frames in [(0,), (0, 1), (2,), (0, 3)]:
        x0 = encode_conditioning(tokenizer, clip, frames, 4)
        assert x0.shape == full.shape
        torch.testing.assert_close(x0[:, : max(frames) + 1], full[:, : max(frames) + 1], atol=1e-6, rtol=0)
        assert not x0[:, max(frames) + 1 :].any()
    torch.testing.assert_close(encode_conditioning(tokenizer, clip[:, :, :5], (1,), 4)[:, :2], full[:, :2], atol=1e-6,
                               rtol=0)
    with pytest.raises(ValueError, match="outside the 4 latent frames"):
        encode_conditioning(tokenizer, clip, (4,), 4)
    with pytest.raises(ValueError, match="needs 9 pixel frames, the clip has 5"):
        encode_conditioning(tokenizer, clip[:, :, :5], (2,), 4)


def test_only_the_conditioning_frames_are_encoded(components, encoded_lengths):
    parts, _ = components
    i2v = pipeline(Cosmos3ImageToVideoPipeline, parts)
    i2v(picture(0), "a boat", generator=gen(0), **{**VIDEO, "num_frames": 13, "num_inference_steps": 1})
    assert encoded_lengths == [1]  # the reference encodes 13
    v2v = pipeline(Cosmos3VideoToVideoPipeline, parts)
    clip = [picture(i) for i in range(3)]  # shorter than the 5 frames latent frame 1 covers: its last one repeated
    v2v(clip, "a river", condition_frame_indexes=(0, 1), generator=gen(0), **{**VIDEO, "num_inference_steps": 1})
    assert encoded_lengths == [1, 5]
