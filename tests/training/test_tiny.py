"""Cosmos3-Tiny's starting folder: the published layout, loadable by every pipeline, the tokenizer fits the model."""

import torch

from cosmos3.pipelines import Cosmos3TextToImagePipeline, Cosmos3WorldActionPipeline
from cosmos3.training.tiny import build_base, build_tokenizer
from cosmos3.training.vae import make_vae


def test_build_base(tmp_path):
    make_vae().save_pretrained(str(tmp_path / "vae"))
    folder = build_base(str(tmp_path / "base"), str(tmp_path / "vae"))
    for name in ("model_index.json", "transformer/config.json", "vae/config.json", "text_tokenizer/tokenizer.json"):
        assert (tmp_path / "base" / name).exists(), name
    pipe = Cosmos3WorldActionPipeline.from_pretrained(folder)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    assert 8e6 < params < 15e6
    assert len(pipe.text_tokenizer) <= pipe.transformer.config.vocab_size
    assert pipe.transformer.config.latent_channel == pipe.vae.config.z_dim
    t2i = Cosmos3TextToImagePipeline.from_pretrained(folder)
    t2i.set_progress_bar_config(disable=True)
    out = t2i("a small red circle", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
              generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images[0].shape == (64, 64, 3)


def test_tokenizer_is_deterministic_and_compact():
    a, b = build_tokenizer(), build_tokenizer()
    text = "a large red circle on the left of a blue background"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert len(a(text)["input_ids"]) <= 16  # captions tokenize into whole words
