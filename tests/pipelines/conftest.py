import copy

import pytest
import torch
from diffusers import Cosmos3OmniPipeline

from cosmos3.testing import reference_transformer, tiny_parts


@pytest.fixture
def components(tiny_tokenizer):
    """Tiny random components, and the reference pipeline built from the same weights."""
    parts = tiny_parts(tiny_tokenizer, sound=True)
    reference = Cosmos3OmniPipeline(
        **{**parts, "transformer": reference_transformer(parts["transformer"]),
           "scheduler": copy.deepcopy(parts["scheduler"]),
           "vae": copy.deepcopy(parts["vae"])},  # diffusers' own VAE: ours accelerates its copy in place
        enable_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    return parts, reference


@pytest.fixture
def encoded_lengths(components, monkeypatch):
    """The number of pixel frames of every encode the pipelines make with `components`' VAE, in call order."""
    vae, lengths = components[0]["vae"], []
    encode = vae.encode

    def counting(x, *args, **kwargs):
        lengths.append(x.shape[2])
        return encode(x, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", counting)
    return lengths


def gen(seed):
    return torch.Generator().manual_seed(seed)
