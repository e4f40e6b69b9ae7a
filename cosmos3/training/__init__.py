"""Training: rectified-flow fine-tuning of the generation tower, with resumable checkpoints."""

from .trainer import Example, TrainConfig, Trainer, ema_state_dict, trainable_parameters

__all__ = ["Example", "TrainConfig", "Trainer", "ema_state_dict", "trainable_parameters"]
