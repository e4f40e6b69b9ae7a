"""Diffusers-style pipelines, one file per task, sharing `common.py`."""

from .common import Cosmos3PipelineOutput
from .image_to_video import Cosmos3ImageToVideoPipeline
from .text_generation import Cosmos3TextGenerationPipeline, Cosmos3TextOutput
from .text_to_video import Cosmos3ImagePipelineOutput, Cosmos3TextToImagePipeline, Cosmos3TextToVideoPipeline
from .transfer import Cosmos3TransferPipeline
from .video_to_video import Cosmos3VideoToVideoPipeline
from .world_action import ActionRequest, Cosmos3WorldActionPipeline

__all__ = [
    "ActionRequest",
    "Cosmos3WorldActionPipeline",
    "Cosmos3ImagePipelineOutput",
    "Cosmos3ImageToVideoPipeline",
    "Cosmos3PipelineOutput",
    "Cosmos3TextGenerationPipeline",
    "Cosmos3TextOutput",
    "Cosmos3TextToImagePipeline",
    "Cosmos3TextToVideoPipeline",
    "Cosmos3TransferPipeline",
    "Cosmos3VideoToVideoPipeline",
]
