import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from cosmos3 import Cosmos3Transformer  # noqa: E402
from cosmos3.testing import randomize_  # noqa: E402


@pytest.fixture
def tiny_model():
    """The `tiny` preset with random weights everywhere (norms, modality embeds and all), in float32."""
    torch.manual_seed(0)
    return randomize_(Cosmos3Transformer.from_preset("tiny"), seed=0, std=0.15).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from cosmos3.tokenizers.text import build_tiny_tokenizer

    return build_tiny_tokenizer()


def make_tiny_vae(seed: int = 0):
    """A Wan 2.2-layout VAE (patch_size 2, 16x spatial, 4x temporal) small enough for CPU tests."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8, z_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True, patch_size=2, in_channels=12,
        out_channels=12, scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=[0.1 * i - 0.3 for i in range(8)], latents_std=[1.0 + 0.2 * i for i in range(8)],
    ).eval()


def make_tiny_avae(seed: int = 0):
    """A Cosmos 3 AVAE with hop 8 at 800 Hz (so 100 samples/s and 100 latent frames every 8 s)."""
    from diffusers import Cosmos3AVAEAudioTokenizer

    torch.manual_seed(seed)
    return Cosmos3AVAEAudioTokenizer(
        vocoder_input_dim=8, dec_dim=8, dec_c_mults=(1, 2), dec_strides=(2, 4), enc_dim=8, enc_c_mults=(1,),
        enc_strides=(4,), enc_hop_length=2, enc_n_fft=8, enc_latent_dim=16, enc_num_blocks=1, sampling_rate=800,
    ).eval()


@pytest.fixture
def tiny_vae():
    return make_tiny_vae()


@pytest.fixture
def tiny_avae():
    return make_tiny_avae()


@pytest.fixture
def reference_pipeline(tiny_tokenizer):
    """`diffusers.Cosmos3OmniPipeline` with tiny random components (the oracle for pipeline-level behaviour)."""
    from diffusers import Cosmos3OmniPipeline, UniPCMultistepScheduler

    from cosmos3.testing import reference_transformer

    model = randomize_(Cosmos3Transformer.from_preset("tiny", vocab_size=len(tiny_tokenizer)), seed=1)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return Cosmos3OmniPipeline(
        transformer=reference_transformer(model), text_tokenizer=tiny_tokenizer, vae=make_tiny_vae(),
        scheduler=scheduler, sound_tokenizer=make_tiny_avae(), enable_safety_checker=False,
    )
