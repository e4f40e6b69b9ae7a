"""cosmos3: omnimodal world models in the design of NVIDIA Cosmos 3."""

from .models import (
    ATTENTION_BACKENDS,
    COSMOS3_PRESETS,
    Cosmos3Layout,
    Cosmos3Sample,
    Cosmos3TextKVCache,
    Cosmos3Transformer,
    Cosmos3TransformerOutput,
)
from .pipelines import (
    ActionRequest,
    Cosmos3ImageToVideoPipeline,
    Cosmos3TextGenerationPipeline,
    Cosmos3TextToImagePipeline,
    Cosmos3TextToVideoPipeline,
    Cosmos3TransferPipeline,
    Cosmos3VideoToVideoPipeline,
    Cosmos3WorldActionPipeline,
)

__version__ = "0.1.0"

__all__ = [
    "ActionRequest",
    "Cosmos3ImageToVideoPipeline",
    "Cosmos3TextGenerationPipeline",
    "Cosmos3TextToImagePipeline",
    "Cosmos3TextToVideoPipeline",
    "Cosmos3TransferPipeline",
    "Cosmos3VideoToVideoPipeline",
    "Cosmos3WorldActionPipeline",
    "ATTENTION_BACKENDS",
    "COSMOS3_PRESETS",
    "Cosmos3Layout",
    "Cosmos3Sample",
    "Cosmos3TextKVCache",
    "Cosmos3Transformer",
    "Cosmos3TransformerOutput",
]
