"""Training: rectified-flow fine-tuning of the generation tower (full or LoRA), DMD2 distillation, datasets,
scale-out on torch.distributed, resumable sharded checkpoints, recipes."""

from .checkpoint import read_tensors
from .datasets import DataLoaderWithSkips, FolderDataset, LeRobotDataset, LeRobotDatasetWriter
from .distill import DistillConfig, Distiller, export_student, pipeline_prompts
from .encode import ExampleEncoder, normalizer_from_stats
from .export import export_checkpoint, export_pipeline
from .parallel import DistInfo, init_distributed
from .trainer import Example, TrainConfig, Trainer, ema_state_dict, trainable_parameters

__all__ = [
    "DataLoaderWithSkips", "DistInfo", "DistillConfig", "Distiller", "export_student",
    "pipeline_prompts", "Example", "ExampleEncoder", "FolderDataset", "LeRobotDataset",
    "LeRobotDatasetWriter", "TrainConfig", "Trainer", "ema_state_dict", "export_checkpoint", "export_pipeline",
    "init_distributed", "normalizer_from_stats", "read_tensors", "trainable_parameters",
]  # fmt: skip
