"""Text side of Cosmos 3: prompt token ids exactly as the reference pipeline builds them, and a tiny tokenizer.

The generator reads raw token ids (no separate text encoder): a chat-templated conversation (an optional system
prompt, the user prompt with metadata sentences appended), then `eos` and `<|vision_start|>`, after which the
generated tokens follow. The metadata sentences are the ones the model was trained with:

* duration: "The video is 7.9 seconds long and is of 24 FPS." (video only)
* resolution: "This video is of 720x1280 resolution." / "This image is of ..." (height x width)
* the negative prompt gets the inverse sentences ("The video is not ...", "... is not of ... resolution.")
* action modes replace all of this with a structured JSON caption (`action_caption`).

`build_tiny_tokenizer` makes a small byte-level BPE tokenizer with the same special tokens and a chat template,
offline, for tests and small models.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

SYSTEM_PROMPT_IMAGE = "You are a helpful assistant who will generate images from a give prompt."
SYSTEM_PROMPT_VIDEO = "You are a helpful assistant who will generate videos from a give prompt."
# Transfer (control-conditioned video): the prompt goes in verbatim under this system prompt, no metadata sentences.
SYSTEM_PROMPT_TRANSFER = ("You are a helpful assistant that generates images or videos following the user's "
                          "instructions and control signals (edge maps, blur, depth, or segmentation).")
DURATION_TEMPLATE = "The video is {duration:.1f} seconds long and is of {fps:.0f} FPS."
INVERSE_DURATION_TEMPLATE = "The video is not {duration:.1f} seconds long and is not of {fps:.0f} FPS."
RESOLUTION_TEMPLATE = "This {kind} is of {height}x{width} resolution."
INVERSE_RESOLUTION_TEMPLATE = "This {kind} is not of {height}x{width} resolution."
VISION_START_TOKEN = "<|vision_start|>"

# Framing sentences of the structured action caption; the action models were trained with exactly these.
ACTION_VIEWPOINTS = {
    "ego_view": "This video is captured from a first-person perspective looking at the scene.",
    "third_person_view": "This video is captured from a third-person perspective looking towards the agent from the "
    "front.",
    "wrist_view": "This video is captured from a wrist-mounted camera.",
    "concat_view": "This video contains concatenated views from multiple camera perspectives.",
}
ACTION_MODES = ("policy", "forward_dynamics", "inverse_dynamics")


@dataclass(frozen=True)
class PromptSettings:
    """What the metadata sentences describe, and which of them to add.

    Args:
        num_frames: pixel frames of the clip (1 = an image: no duration sentence, "image" wording).
        height, width: pixel size of the canvas.
        fps: frame rate of the clip.
        use_system_prompt: prepend the image/video system prompt.
        add_resolution_template, add_duration_template: append those sentences (inverse ones to the negative).
        action_mode: one of `ACTION_MODES` to use the structured action caption instead of the sentences.
        action_view_point: a key of `ACTION_VIEWPOINTS` (or None: no framing field).
        system_prompt: replaces the image/video system prompt (transfer uses `SYSTEM_PROMPT_TRANSFER`).
    """

    num_frames: int = 189
    height: int = 720
    width: int = 1280
    fps: float = 24.0
    use_system_prompt: bool = True
    add_resolution_template: bool = True
    add_duration_template: bool = True
    action_mode: str | None = None
    action_view_point: str | None = "ego_view"
    system_prompt: str | None = None

    def __post_init__(self):
        for name in ("num_frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if not (isinstance(self.fps, numbers.Real) and math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"`fps` must be a positive number, got {self.fps!r}.")
        if self.action_mode is not None and self.action_mode not in ACTION_MODES:
            raise ValueError(f"`action_mode` must be one of {list(ACTION_MODES)} or None, got {self.action_mode!r}.")
        if self.action_view_point is not None and self.action_view_point not in ACTION_VIEWPOINTS:
            raise ValueError(
                f"`action_view_point` must be one of {sorted(ACTION_VIEWPOINTS)} or None, "
                f"got {self.action_view_point!r}."
            )


def _append(base: str, addition: str) -> str:
    base = base.rstrip(".")
    return f"{base}. {addition}" if base else addition


def augment_prompt(text: str, settings: PromptSettings, *, negative: bool = False) -> str:
    """Append the duration and resolution sentences (their inverses for a negative prompt)."""
    is_image = settings.num_frames == 1
    if not is_image and settings.add_duration_template:
        template = INVERSE_DURATION_TEMPLATE if negative else DURATION_TEMPLATE
        text = _append(text, template.format(duration=settings.num_frames / settings.fps, fps=settings.fps))
    if settings.add_resolution_template:
        template = INVERSE_RESOLUTION_TEMPLATE if negative else RESOLUTION_TEMPLATE
        kind = "image" if is_image else "video"
        text = _append(text, template.format(kind=kind, height=settings.height, width=settings.width))
    return text


def action_caption(
    description: str, *, view_point: str | None, num_frames: int, fps: float, height: int, width: int
) -> str:
    """The structured JSON caption the action models were trained on (framing, actions, duration, fps, size)."""
    seconds = num_frames / fps if fps > 0 else 0.0
    finite = seconds >= 0 and math.isfinite(seconds)
    minutes, secs = divmod(round(seconds) if finite else 0, 60)
    description = description.strip()
    if description and not description.endswith((".", "!", "?")):
        description = f"{description}."
    caption: dict = {}
    if view_point is not None:
        if view_point not in ACTION_VIEWPOINTS:
            raise ValueError(f"`view_point` must be one of {sorted(ACTION_VIEWPOINTS)} or None, got {view_point!r}.")
        caption["cinematography"] = {"framing": ACTION_VIEWPOINTS[view_point]}
    ratio = width / height if height > 0 else 1.0
    aspect = min(
        ("1,1", "4,3", "3,4", "16,9", "9,16"), key=lambda r: abs(int(r.split(",")[0]) / int(r.split(",")[1]) - ratio)
    )
    caption["actions"] = [{"time": f"0:00-{minutes}:{secs:02d}", "description": description}]
    caption["duration"] = f"{int(seconds) if finite else 0}s"
    caption["fps"] = float(fps)
    caption["resolution"] = {"H": int(height), "W": int(width)}
    caption["aspect_ratio"] = aspect
    return json.dumps(caption)


def special_ids(tokenizer) -> tuple[int, int]:
    """`(eos, vision_start)` ids of a Cosmos 3 text tokenizer; ValueError for any other tokenizer."""
    vision_start = tokenizer.convert_tokens_to_ids(VISION_START_TOKEN)
    if vision_start is None or vision_start == tokenizer.unk_token_id:
        raise ValueError(f"The text tokenizer has no `{VISION_START_TOKEN}` token; it is not a Cosmos 3 tokenizer.")
    if tokenizer.eos_token_id is None:
        raise ValueError("The text tokenizer has no eos token; it is not a Cosmos 3 tokenizer.")
    return tokenizer.eos_token_id, vision_start


def _conversation(text: str, settings: PromptSettings) -> list[dict]:
    messages = []
    if settings.use_system_prompt:
        system = settings.system_prompt or (SYSTEM_PROMPT_IMAGE if settings.num_frames == 1 else SYSTEM_PROMPT_VIDEO)
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": text})
    return messages


def prompt_texts(prompt: str, negative_prompt: str | None, settings: PromptSettings) -> tuple[str, str]:
    """The user-turn texts of the conditional and unconditional passes, before chat templating."""
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a str, got {type(prompt).__name__}.")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise TypeError(f"`negative_prompt` must be a str or None, got {type(negative_prompt).__name__}.")
    negative_prompt = negative_prompt or ""
    if settings.action_mode is not None:
        cond = action_caption(prompt, view_point=settings.action_view_point, num_frames=settings.num_frames,
                              fps=settings.fps, height=settings.height, width=settings.width)
        return cond, negative_prompt
    return augment_prompt(prompt, settings), augment_prompt(negative_prompt, settings, negative=True)


def encode_prompts(
    tokenizer,
    prompts: Sequence[str] | str,
    negative_prompts: Sequence[str | None] | str | None = None,
    settings: PromptSettings | Sequence[PromptSettings] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt and its negative, as `Cosmos3OmniPipeline.tokenize_prompt` builds them.

    `prompts` may be one string or a list; `negative_prompts` and `settings` either one value for all or one per
    prompt. Returns `(cond_ids, uncond_ids)`, one list of ids per prompt (lengths differ; the transformer packs them).
    """
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if not prompts:
        raise ValueError("`prompts` must contain at least one prompt.")
    n = len(prompts)

    def per_prompt(name, value, default):
        if value is None or isinstance(value, (str, PromptSettings)):
            return [default if value is None else value] * n
        value = list(value)
        if len(value) != n:
            raise ValueError(f"`{name}` has {len(value)} entries for {n} prompts.")
        return value

    negatives = per_prompt("negative_prompts", negative_prompts, None)
    all_settings = per_prompt("settings", settings, PromptSettings())
    eos, vision_start = special_ids(tokenizer)
    texts = [prompt_texts(p, q, s) for p, q, s in zip(prompts, negatives, all_settings)]
    conversations = [_conversation(t, s) for (cond, uncond), s in zip(texts, all_settings) for t in (cond, uncond)]
    encoded = tokenizer.apply_chat_template(
        conversations, tokenize=True, add_generation_prompt=True, add_vision_id=False, return_dict=True
    )["input_ids"]
    ids = [list(x) + [eos, vision_start] for x in encoded]
    return ids[0::2], ids[1::2]


def load_text_tokenizer(path: str, subfolder: str | None = "text_tokenizer"):
    """Load a checkpoint's text tokenizer from a local folder (a pipeline folder or the tokenizer folder itself)."""
    import os

    from transformers import AutoTokenizer

    folder = os.path.join(path, subfolder) if subfolder and os.path.isdir(os.path.join(path, subfolder)) else path
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No tokenizer folder at {folder!r} (looked for `{subfolder}/` inside {path!r}).")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    special_ids(tokenizer)
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# A tiny offline tokenizer
# ---------------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", VISION_START_TOKEN, "<|vision_end|>"]
# The Qwen chat layout: <|im_start|>role\ncontent<|im_end|>\n per turn, then the assistant header.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "A robot arm picks up a red cube and places it in a bowl on a wooden table.",
    "The video is 7.9 seconds long and is of 24 FPS. This video is of 720x1280 resolution.",
    "This image is not of 480x832 resolution. The camera pans slowly across a city street at night.",
    "You are a helpful assistant who will generate videos from a give prompt.",
    '{"cinematography": {"framing": "first-person"}, "actions": [{"time": "0:00-0:02"}], "fps": 15.0}',
    "A cat jumps onto the sofa; waves crash on the shore; cars drive through the rain, 0123456789.",
]


def build_tiny_tokenizer(vocab_size: int = 512, corpus: Sequence[str] | None = None):
    """A byte-level BPE `PreTrainedTokenizerFast` with the Cosmos 3 special tokens and chat template (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        minimum = 256 + len(SPECIAL_TOKENS)
        raise ValueError(f"`vocab_size` must be at least {minimum} (bytes + specials), got {vocab_size}.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus or _CORPUS) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=[VISION_START_TOKEN, "<|vision_end|>", "<|im_start|>"], chat_template=CHAT_TEMPLATE,
    )
