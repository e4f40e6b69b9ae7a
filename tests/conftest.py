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
