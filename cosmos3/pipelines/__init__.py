"""Diffusers-style pipelines, one file per task, sharing `common.py`."""

from .common import Cosmos3PipelineOutput
from .text_to_video import Cosmos3ImagePipelineOutput, Cosmos3TextToImagePipeline, Cosmos3TextToVideoPipeline

__all__ = [
    "Cosmos3ImagePipelineOutput",
    "Cosmos3PipelineOutput",
    "Cosmos3TextToImagePipeline",
    "Cosmos3TextToVideoPipeline",
]
