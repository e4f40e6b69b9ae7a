from .attention import ATTENTION_BACKENDS
from .layout import Cosmos3Layout, Cosmos3Sample
from .transformer_cosmos3 import (
    COSMOS3_PRESETS,
    Cosmos3TextKVCache,
    Cosmos3Transformer,
    Cosmos3TransformerOutput,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "COSMOS3_PRESETS",
    "Cosmos3Layout",
    "Cosmos3Sample",
    "Cosmos3TextKVCache",
    "Cosmos3Transformer",
    "Cosmos3TransformerOutput",
]
