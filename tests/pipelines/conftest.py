import copy

import pytest
import torch
from diffusers import Cosmos3OmniPipeline, UniPCMultistepScheduler

from cosmos3 import Cosmos3Transformer
from cosmos3.testing import make_tiny_avae, make_tiny_vae, randomize_, reference_transformer


@pytest.fixture
def components(tiny_tokenizer):
    """Tiny random components, and the reference pipeline built from the same weights."""
    model = randomize_(Cosmos3Transformer.from_preset("tiny", vocab_size=len(tiny_tokenizer)), seed=1, std=0.1).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    parts = dict(transformer=model, text_tokenizer=tiny_tokenizer, vae=make_tiny_vae(), scheduler=scheduler,
                 sound_tokenizer=make_tiny_avae())
    reference = Cosmos3OmniPipeline(
        **{**parts, "transformer": reference_transformer(model), "scheduler": copy.deepcopy(scheduler),
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
