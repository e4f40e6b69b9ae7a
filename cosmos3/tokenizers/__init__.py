"""Tokenizers: what turns raw data into what the transformer consumes, and back.

* `text`: prompt token ids exactly as the reference pipeline builds them; a tiny offline tokenizer.
* `vision`: the Wan 2.2 VAE with Cosmos 3's latent normalization, size rules, streaming decode, 2x2 patches.
* `sound`: the AVAE with torch resampling and channel conversion, latents aligned to the video's duration.
* `action`: embodiments, normalization, padding, rotations, chunking and the conventions robot data depends on.
"""

from .action import (
    ACTION_DIM,
    ActionConventions,
    ActionNormalizer,
    Embodiment,
    chunk_trajectory,
    get_embodiment,
    pad_actions,
    unpad_actions,
)
from .sound import Cosmos3SoundTokenizer, convert_channels, resample
from .text import PromptSettings, action_caption, build_tiny_tokenizer, encode_prompts, load_text_tokenizer
from .vision import Cosmos3VisionTokenizer, preprocess_image, preprocess_video

__all__ = [
    "ACTION_DIM",
    "ActionConventions",
    "ActionNormalizer",
    "Cosmos3SoundTokenizer",
    "Cosmos3VisionTokenizer",
    "Embodiment",
    "PromptSettings",
    "action_caption",
    "build_tiny_tokenizer",
    "chunk_trajectory",
    "convert_channels",
    "encode_prompts",
    "get_embodiment",
    "load_text_tokenizer",
    "pad_actions",
    "preprocess_image",
    "preprocess_video",
    "resample",
    "unpad_actions",
]
