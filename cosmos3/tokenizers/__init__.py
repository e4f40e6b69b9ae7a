"""Tokenizers: what turns raw data into what the transformer consumes, and back.

* `text`: prompt token ids exactly as the reference pipeline builds them; a tiny offline tokenizer.
* `vision`: the Wan 2.2 VAE with Cosmos 3's latent normalization, size rules, streaming decode.
* `control`: transfer's edge and blur control maps, as Cosmos-Transfer computes them (Canny, bilateral blur),
  equal to OpenCV without depending on it.
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
from .control import BLUR_PRESETS, EDGE_PRESETS, bilateral_filter, blur_map, canny, edge_map
from .sound import Cosmos3SoundTokenizer, convert_channels, resample
from .text import PromptSettings, action_caption, build_tiny_tokenizer, encode_prompts, load_text_tokenizer
from .vision import Cosmos3VisionTokenizer, preprocess_image, preprocess_video

__all__ = [
    "ACTION_DIM",
    "BLUR_PRESETS",
    "EDGE_PRESETS",
    "ActionConventions",
    "ActionNormalizer",
    "Cosmos3SoundTokenizer",
    "Cosmos3VisionTokenizer",
    "Embodiment",
    "PromptSettings",
    "action_caption",
    "bilateral_filter",
    "blur_map",
    "build_tiny_tokenizer",
    "canny",
    "chunk_trajectory",
    "convert_channels",
    "edge_map",
    "encode_prompts",
    "get_embodiment",
    "load_text_tokenizer",
    "pad_actions",
    "preprocess_image",
    "preprocess_video",
    "resample",
    "unpad_actions",
]
