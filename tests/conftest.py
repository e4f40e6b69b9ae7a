import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton reads this when it is first imported (diffusers imports it through torch._dynamo, below): without a
    # GPU, tests/kernels run the Triton kernels themselves under its interpreter. Only @triton.jit code is affected.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cosmos3 import Cosmos3Transformer  # noqa: E402
from cosmos3.testing import make_tiny_avae, make_tiny_vae, randomize_  # noqa: E402


@pytest.fixture
def tiny_model():
    """The `tiny` preset with random weights everywhere (norms, modality embeds and all), in float32."""
    torch.manual_seed(0)
    return randomize_(Cosmos3Transformer.from_preset("tiny"), seed=0, std=0.15).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from cosmos3.tokenizers.text import build_tiny_tokenizer

    return build_tiny_tokenizer()


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
