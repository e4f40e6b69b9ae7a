"""What a diffusers user expects of a pipeline: `from_pipe` (between ours and from the reference), `interrupt`,
weight variants, `latents=`, VAE tiling, and saved folders the reference reads without warnings."""

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import Cosmos3OmniPipeline
from PIL import Image

from cosmos3 import Cosmos3Transformer
from cosmos3.pipelines import (
    Cosmos3ImageToVideoPipeline,
    Cosmos3TextGenerationPipeline,
    Cosmos3TextToImagePipeline,
    Cosmos3TextToVideoPipeline,
    Cosmos3VideoToVideoPipeline,
    Cosmos3WorldActionPipeline,
)
from cosmos3.testing import reference_transformer

from .conftest import gen

VIDEO = dict(num_frames=9, height=32, width=48, fps=16.0, num_inference_steps=3, output_type="np")
OUR_PIPELINES = (Cosmos3TextToVideoPipeline, Cosmos3TextToImagePipeline, Cosmos3ImageToVideoPipeline,
                 Cosmos3VideoToVideoPipeline, Cosmos3WorldActionPipeline)
FLAGS = dict(default_use_system_prompt=False, use_native_flow_schedule=True)


def pipeline(cls, parts, **flags):
    pipe = cls(**parts, **flags)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(seed, size=(40, 70)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def shares_storage(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(ours[k].data_ptr() == theirs[k].data_ptr() for k in ours)


class DiffusersWarnings(logging.Handler):
    """What diffusers logs at WARNING and above while attached (its loggers do not propagate to the root)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("diffusers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("diffusers").removeHandler(self)


# ---------------------------------------------------------------------------------------------------------------
# from_pipe
# ---------------------------------------------------------------------------------------------------------------


def test_from_pipe_between_our_pipelines_shares_components_and_flags(components):
    parts, _ = components
    t2v = pipeline(Cosmos3TextToVideoPipeline, parts, **FLAGS)
    for cls in OUR_PIPELINES:
        new = cls.from_pipe(t2v)
        assert type(new) is cls
        assert all(new.components[k] is v for k, v in t2v.components.items()), cls.__name__
        assert {k: new.config[k] for k in FLAGS} == FLAGS
    again = Cosmos3TextToVideoPipeline.from_pipe(Cosmos3ImageToVideoPipeline.from_pipe(t2v))
    again.set_progress_bar_config(disable=True)
    kwargs = dict(**VIDEO, guidance_scale=3.0)
    assert np.array_equal(again("a red car", generator=gen(0), **kwargs).frames,
                          t2v("a red car", generator=gen(0), **kwargs).frames)
    t2i = Cosmos3TextToImagePipeline.from_pipe(t2v)
    t2i.set_progress_bar_config(disable=True)
    direct = pipeline(Cosmos3TextToImagePipeline, parts, **FLAGS)
    image = dict(height=32, width=32, num_inference_steps=3, guidance_scale=3.0, output_type="np")
    assert np.array_equal(t2i("a cat", generator=gen(1), **image).images,
                          direct("a cat", generator=gen(1), **image).images)

    text = Cosmos3TextGenerationPipeline.from_pipe(t2v)
    assert text.transformer is t2v.transformer and text.text_tokenizer is t2v.text_tokenizer
    sigmas = [1.0, 0.75, 0.5, 0.25]
    student = pipeline(Cosmos3TextToVideoPipeline, parts, distilled_sigmas=sigmas)
    assert Cosmos3ImageToVideoPipeline.from_pipe(student).config.distilled_sigmas == sigmas


def test_from_pipe_of_the_reference_shares_its_weights_and_gives_its_video(components):
    parts, reference = components
    kwargs = dict(**VIDEO, guidance_scale=3.0)
    expected = reference("a red car", generator=gen(2), **kwargs).video
    ours = Cosmos3TextToVideoPipeline.from_pipe(reference)
    ours.set_progress_bar_config(disable=True)
    assert type(ours.transformer) is Cosmos3Transformer
    assert shares_storage(ours.transformer, reference.transformer)  # no copy of the weights
    assert ours.vae is reference.vae and ours.scheduler is reference.scheduler
    assert ours.config.default_use_system_prompt == reference.config.default_use_system_prompt
    got = ours("a red car", generator=gen(2), **kwargs).frames
    assert np.abs(got[0] - expected).max() <= 1e-4
    direct = pipeline(Cosmos3TextToVideoPipeline, parts)
    assert np.array_equal(got, direct("a red car", generator=gen(2), **kwargs).frames)
    assert shares_storage(Cosmos3TextGenerationPipeline.from_pipe(reference).transformer, reference.transformer)

    # The way back: diffusers keeps a component only if it is exactly the class its signature names, so ours is
    # dropped (and diffusers raises) unless its reference twin is passed.
    with pytest.raises(ValueError, match="expected"):
        Cosmos3OmniPipeline.from_pipe(ours)
    back = Cosmos3OmniPipeline.from_pipe(ours, transformer=reference_transformer(ours.transformer, share_weights=True))
    back.set_progress_bar_config(disable=True)
    assert shares_storage(back.transformer, reference.transformer) and back.vae is reference.vae
    assert np.abs(back("a red car", generator=gen(2), **kwargs).video - expected).max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# interrupt
# ---------------------------------------------------------------------------------------------------------------


def test_interrupt_skips_the_remaining_steps_as_the_reference_does(components):
    parts, reference = components
    ours = pipeline(Cosmos3TextToVideoPipeline, parts)
    assert ours.interrupt is False

    def stop_after(step, seen):
        def callback(pipe, i, t, tensors):
            seen.append(i)
            if i == step:
                pipe._interrupt = True
            return tensors

        return callback

    seen_ours, seen_reference = [], []
    kwargs = dict(**VIDEO, guidance_scale=3.0)
    got = ours("a red car", generator=gen(0), callback_on_step_end=stop_after(0, seen_ours), **kwargs).frames
    expected = reference("a red car", generator=gen(0), callback_on_step_end=stop_after(0, seen_reference),
                         **kwargs).video
    assert seen_ours == seen_reference == [0]
    assert np.abs(got[0] - expected).max() <= 1e-4  # the partly denoised latents, decoded
    full = ours("a red car", generator=gen(0), **kwargs).frames  # the next call starts uninterrupted
    assert ours.interrupt is False and not np.array_equal(full, got)


# ---------------------------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------------------------


def test_a_weight_variant_saves_and_loads(components, tmp_path):
    from safetensors.torch import load_file, save_file

    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    pipe.save_pretrained(tmp_path / "pipe", variant="bf16")
    weights = tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.bf16.safetensors"
    assert weights.is_file()
    loaded = Cosmos3TextToVideoPipeline.from_pretrained(tmp_path / "pipe", variant="bf16")
    loaded.set_progress_bar_config(disable=True)
    state = loaded.transformer.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in pipe.transformer.state_dict().items())
    kwargs = dict(**VIDEO, guidance_scale=3.0)
    assert np.array_equal(loaded("a cat", generator=gen(0), **kwargs).frames,
                          pipe("a cat", generator=gen(0), **kwargs).frames)
    text = Cosmos3TextGenerationPipeline.from_pretrained(tmp_path / "pipe", variant="bf16")
    assert torch.equal(text.transformer.lm_head.weight, pipe.transformer.lm_head.weight)

    tensors = load_file(weights)
    save_file({**tensors, "stray.weight": torch.zeros(1)}, weights)  # strict key checking holds for variants
    with pytest.raises(ValueError, match="unexpected keys.*stray.weight"):
        Cosmos3TextToVideoPipeline.from_pretrained(tmp_path / "pipe", variant="bf16")


# ---------------------------------------------------------------------------------------------------------------
# latents=
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("enable_sound", [False, True])
def test_given_latents_are_the_initial_noise_as_in_the_reference(components, enable_sound):
    parts, reference = components
    ours = pipeline(Cosmos3TextToVideoPipeline, parts)
    latents = torch.randn(1, 8, 3, 2, 3, generator=gen(9))
    kwargs = dict(**VIDEO, guidance_scale=3.0, enable_sound=enable_sound)
    # With `latents`, the generator draws only the other streams' noise (sound), in the reference's order.
    expected = reference("a red car", latents=latents.clone(), generator=gen(0), **kwargs)
    got = ours("a red car", latents=latents.clone(), generator=gen(0), **kwargs)
    assert np.abs(got.frames[0] - expected.video).max() <= 1e-4
    if enable_sound:
        assert (got.sound[0] - expected.sound).abs().max() <= 1e-4
    assert not np.array_equal(got.frames, ours("a red car", generator=gen(0), **kwargs).frames)

    t2i = pipeline(Cosmos3TextToImagePipeline, parts)
    image_latents = torch.randn(1, 8, 1, 2, 2, generator=gen(4)).to(torch.float64)  # any float dtype
    image = dict(height=32, width=32, num_inference_steps=3, guidance_scale=3.0, output_type="np")
    expected = reference("a cat", num_frames=1, latents=image_latents.clone(), generator=gen(0), **image).video
    got = t2i("a cat", latents=image_latents.clone(), **image).images
    assert np.abs(got[0] - expected[0]).max() <= 1e-4


@pytest.mark.parametrize("task", ["image", "video"])
def test_given_latents_keep_the_conditioning_frames(components, task):
    """The clean frames are put in place over the given latents, so the conditioning cannot be lost; latents that
    hold them already (what the reference's own noise is) give exactly the reference's video."""
    parts, reference = components
    shape = dict(num_frames=9, height=32, width=48, fps=16.0)
    if task == "image":
        ours, condition, frames = pipeline(Cosmos3ImageToVideoPipeline, parts), picture(0), (0,)
        reference_inputs, our_inputs = dict(image=condition), {}
    else:
        ours, condition, frames = pipeline(Cosmos3VideoToVideoPipeline, parts), [picture(i) for i in range(7)], (0, 1)
        reference_inputs = dict(video=condition, condition_frame_indexes_vision=list(frames))
        our_inputs = dict(condition_frame_indexes=frames)
    initial = reference.prepare_latents(**reference_inputs, **shape, generator=gen(3), device="cpu",
                                        dtype=torch.float32)[0]  # [1, C, T, h, w]: noise, clean frames in place
    kwargs = dict(**shape, num_inference_steps=3, guidance_scale=3.0, output_type="np")
    expected = reference("a boat", **reference_inputs, latents=initial.clone(), **kwargs).video
    scrambled = initial.clone()
    scrambled[:, :, list(frames)] = torch.randn(scrambled[:, :, list(frames)].shape, generator=gen(5))
    got = ours(condition, "a boat", latents=scrambled, **our_inputs, **kwargs).frames
    assert np.abs(got[0] - expected).max() <= 1e-4


def test_latents_of_the_wrong_shape_or_type_are_refused(components):
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    with pytest.raises(ValueError, match=r"`latents` must be \[2, 8, 3, 2, 3\].*got \(1, 8, 3, 2, 3\)"):
        pipe("a cat", num_videos_per_prompt=2, latents=torch.zeros(1, 8, 3, 2, 3), **VIDEO)
    with pytest.raises(ValueError, match=r"`latents` must be \[1, 8, 3, 2, 3\].*got \(8, 3, 2, 3\)"):
        pipe("a cat", latents=torch.zeros(8, 3, 2, 3), **VIDEO)
    with pytest.raises(TypeError, match="`latents` must be a floating-point torch.Tensor.*int64"):
        pipe("a cat", latents=torch.zeros(1, 8, 3, 2, 3, dtype=torch.long), **VIDEO)
    with pytest.raises(TypeError, match="`latents` must be a floating-point torch.Tensor.*ndarray"):
        pipe("a cat", latents=np.zeros((1, 8, 3, 2, 3), np.float32), **VIDEO)


# ---------------------------------------------------------------------------------------------------------------
# VAE tiling
# ---------------------------------------------------------------------------------------------------------------


def test_vae_tiling_decodes_in_tiles_close_to_the_whole_frame(components, monkeypatch):
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    kwargs = dict(num_frames=5, height=320, width=320, fps=16.0, num_inference_steps=2, guidance_scale=3.0,
                  output_type="np")
    whole = pipe("a red car", generator=gen(0), **kwargs).frames
    tiles = []
    tiled_decode = pipe.vae.tiled_decode

    def counting(z, *args, **kw):
        tiles.append(z.shape)
        return tiled_decode(z, *args, **kw)

    monkeypatch.setattr(pipe.vae, "tiled_decode", counting)
    pipe.enable_vae_tiling()  # 256-pixel tiles every 192: a 320-pixel frame is 2 x 2 tiles
    tiled = pipe("a red car", generator=gen(0), **kwargs).frames
    assert tiles == [(1, 8, 2, 20, 20)]
    # Wan's decoder attends over the whole frame in its middle block, so a tile never sees exactly what the whole
    # frame does: close, not equal (measured over seeds 0-2: mean 0.008-0.009, max 0.22-0.35 on this random VAE,
    # in [0, 1]).
    diff = np.abs(tiled - whole)
    assert 0 < diff.mean() <= 0.02 and diff.max() <= 0.45
    pipe.disable_vae_tiling()
    assert np.array_equal(pipe("a red car", generator=gen(0), **kwargs).frames, whole) and len(tiles) == 1


def test_vae_tiling_sizes_are_checked(components):
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    with pytest.raises(ValueError, match=r"`tile_sample_min_height` must be a positive multiple of 16 \(.*\), got 40"):
        pipe.enable_vae_tiling(tile_sample_min_height=40)
    with pytest.raises(ValueError, match="`tile_sample_stride_width` 256 must not exceed `tile_sample_min_width` 128"):
        pipe.enable_vae_tiling(tile_sample_min_width=128, tile_sample_stride_width=256)
    assert not pipe.vae.use_tiling
    pipe.enable_vae_tiling(tile_sample_min_height=64, tile_sample_stride_height=32)
    assert pipe.vae.use_tiling and (pipe.vae.tile_sample_min_height, pipe.vae.tile_sample_stride_height) == (64, 32)


# ---------------------------------------------------------------------------------------------------------------
# model_index.json as the reference reads it
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigmas", [None, [1.0, 0.75, 0.5, 0.25]])
def test_the_reference_loads_our_folders_without_warnings(components, tmp_path, sigmas):
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts, default_use_system_prompt=False, distilled_sigmas=sigmas)
    pipe.save_pretrained(tmp_path)
    with DiffusersWarnings() as caught:
        reference = Cosmos3OmniPipeline.from_pretrained(tmp_path, enable_safety_checker=False)
    assert not [m for m in caught.messages if "not expected" in m], caught.messages
    assert reference.config.default_use_system_prompt is False
    loaded = Cosmos3TextToVideoPipeline.from_pretrained(tmp_path)  # ours still reads every flag
    assert loaded.config.distilled_sigmas == sigmas and loaded.config.default_use_system_prompt is False
    modular = tmp_path / "modular_model_index.json"
    assert modular.is_file() == bool(sigmas)

    # Folders written before (the flag in model_index.json) still load, and load as they did.
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "distilled_sigmas": [1.0, 0.5]}))
    modular.unlink(missing_ok=True)
    assert Cosmos3TextToVideoPipeline.from_pretrained(tmp_path).config.distilled_sigmas == [1.0, 0.5]


def test_the_shipped_model_resaved_loads_in_the_reference_without_warnings(tmp_path):
    import cosmos3.assets

    Cosmos3TextToVideoPipeline.from_pretrained(cosmos3.assets.default_model_folder()).save_pretrained(tmp_path)
    with DiffusersWarnings() as caught:
        Cosmos3OmniPipeline.from_pretrained(tmp_path, enable_safety_checker=False)
    assert not [m for m in caught.messages if "not expected" in m], caught.messages
