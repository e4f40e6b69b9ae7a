"""Prompt token ids identical to the reference pipeline's `tokenize_prompt`."""

import json

import pytest

from cosmos3.tokenizers.text import (
    ACTION_VIEWPOINTS,
    PromptSettings,
    action_caption,
    build_tiny_tokenizer,
    encode_prompts,
    load_text_tokenizer,
)

CASES = [
    dict(num_frames=1, height=64, width=96),
    dict(num_frames=189, height=720, width=1280, fps=24.0),
    dict(num_frames=33, height=480, width=832, fps=16.0, use_system_prompt=False),
    dict(num_frames=9, height=256, width=256, fps=10.0, add_resolution_template=False),
    dict(num_frames=121, height=480, width=640, fps=30.0, add_duration_template=False),
    dict(num_frames=1, height=64, width=64, add_resolution_template=False, add_duration_template=False),
]
PROMPTS = [("A red cube on a table", None), ("waves at sunset.", "blurry, low quality"), ("", "ugly")]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("prompt,negative", PROMPTS)
def test_ids_equal_reference(reference_pipeline, tiny_tokenizer, case, prompt, negative):
    expected = reference_pipeline.tokenize_prompt(prompt, negative, **case)
    cond, uncond = encode_prompts(tiny_tokenizer, prompt, negative, PromptSettings(**case))
    assert (cond[0], uncond[0]) == expected


@pytest.mark.parametrize("mode", ["policy", "forward_dynamics", "inverse_dynamics"])
@pytest.mark.parametrize("view_point", [*ACTION_VIEWPOINTS, None])
def test_action_prompt_ids_equal_reference(reference_pipeline, tiny_tokenizer, mode, view_point):
    case = dict(num_frames=33, height=480, width=640, fps=15.0)
    expected = reference_pipeline.tokenize_prompt(
        "pick up the cup", "bad", **case, action_mode=mode, action_view_point=view_point
    )
    settings = PromptSettings(**case, action_mode=mode, action_view_point=view_point)
    cond, uncond = encode_prompts(tiny_tokenizer, "pick up the cup", "bad", settings)
    assert (cond[0], uncond[0]) == expected


@pytest.mark.parametrize(
    "num_frames,fps,height,width",
    [(33, 15.0, 480, 640), (1441, 24.0, 720, 1280), (17, 16.0, 832, 480), (5, 10.0, 1, 1)],
)
def test_action_caption_equals_reference(reference_pipeline, num_frames, fps, height, width):
    for text in ("open the drawer", "Stack the blocks!", "  "):
        ours = action_caption(text, view_point="wrist_view", num_frames=num_frames, fps=fps, height=height, width=width)
        theirs = reference_pipeline._build_action_json_prompt(
            text, view_point="wrist_view", num_frames=num_frames, fps=fps, height=height, width=width
        )
        assert ours == theirs
        json.loads(ours)


def test_batch_equals_one_by_one(tiny_tokenizer):
    prompts = ["a cat", "a dog runs across the grass", "rain"]
    negatives = [None, "blurry", "ugly"]
    settings = [PromptSettings(num_frames=1, height=64, width=64), PromptSettings(), PromptSettings(num_frames=9)]
    cond, uncond = encode_prompts(tiny_tokenizer, prompts, negatives, settings)
    for i in range(3):
        c, u = encode_prompts(tiny_tokenizer, prompts[i], negatives[i], settings[i])
        assert cond[i] == c[0] and uncond[i] == u[0]
    assert len({len(c) for c in cond}) > 1  # lengths differ: no padding in the ids


def test_tokenizer_save_load_round_trip(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "text_tokenizer")
    loaded = load_text_tokenizer(str(tmp_path))
    text = "Ünïcode ✓ and JSON {\"a\": 1}"
    assert loaded.decode(loaded.encode(text)) == text
    assert encode_prompts(loaded, "a cat") == encode_prompts(tiny_tokenizer, "a cat")
    assert build_tiny_tokenizer().get_vocab() == tiny_tokenizer.get_vocab()  # deterministic


def test_errors(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="`num_frames` must be a positive int"):
        PromptSettings(num_frames=0)
    with pytest.raises(ValueError, match="`fps`"):
        PromptSettings(fps=float("nan"))
    with pytest.raises(ValueError, match="`action_mode`"):
        PromptSettings(action_mode="teleport")
    with pytest.raises(ValueError, match="`action_view_point`"):
        PromptSettings(action_mode="policy", action_view_point="top_down")
    with pytest.raises(TypeError, match="`prompt` must be a str"):
        encode_prompts(tiny_tokenizer, [3])
    with pytest.raises(ValueError, match="`negative_prompts` has 1 entries for 2 prompts"):
        encode_prompts(tiny_tokenizer, ["a", "b"], ["c"])
    with pytest.raises(FileNotFoundError):
        load_text_tokenizer(str(tmp_path / "missing"))


def test_numpy_numbers_are_accepted(tiny_tokenizer):
    import numpy as np

    settings = PromptSettings(num_frames=np.int64(9), height=64, width=64, fps=np.float32(16.0))
    assert encode_prompts(tiny_tokenizer, "a cat", None, settings) == encode_prompts(
        tiny_tokenizer, "a cat", None, PromptSettings(num_frames=9, height=64, width=64, fps=16.0)
    )
