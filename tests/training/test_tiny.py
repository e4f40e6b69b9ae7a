"""Cosmos3-Tiny's starting folder: the published layout, loadable by every pipeline, the tokenizer fits the model."""

import torch

from cosmos3.pipelines import Cosmos3TextToImagePipeline, Cosmos3WorldActionPipeline
from cosmos3.pipelines.common import read_call_defaults
from cosmos3.training.synthetic import read_jsonl, write_folder_dataset
from cosmos3.training.tiny import TINY_CALL_DEFAULTS, build_base, build_tokenizer, package, write_caption_file
from cosmos3.training.vae import make_vae


def test_build_base_and_package(tmp_path):
    make_vae().save_pretrained(str(tmp_path / "vae"))
    folder = build_base(str(tmp_path / "base"), str(tmp_path / "vae"))
    for name in ("model_index.json", "transformer/config.json", "vae/config.json", "text_tokenizer/tokenizer.json"):
        assert (tmp_path / "base" / name).exists(), name
    pipe = Cosmos3WorldActionPipeline.from_pretrained(folder)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    assert 8e6 < params < 15e6
    assert len(pipe.text_tokenizer) <= pipe.transformer.config.vocab_size
    assert pipe.transformer.config.latent_channel == pipe.vae.config.z_dim
    t2i = Cosmos3TextToImagePipeline.from_pretrained(folder)
    t2i.set_progress_bar_config(disable=True)
    out = t2i("a small red circle", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
              generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images[0].shape == (64, 64, 3)

    # the shipped form: bfloat16 weights (about half the bytes), call defaults, same outputs up to bf16 rounding
    from PIL import Image

    from cosmos3.robotics.policy import PolicyConfig

    PolicyConfig(embodiment="libero", action_dim=4, chunk_size=8, resolution_tier=64, fps=80.0).save(folder)
    Image.new("RGB", (64, 64)).save(tmp_path / "frame.png")
    examples = {"t2i": ["a red circle"], "world_action": [{"image": str(tmp_path / "frame.png"), "instruction": "go"}]}
    sizes = package(folder, str(tmp_path / "shipped"), policy={"num_inference_steps": 10}, examples=examples)
    assert PolicyConfig.load(str(tmp_path / "shipped")).num_inference_steps == 10
    from cosmos3.demo import _model_examples

    shipped_examples = _model_examples(str(tmp_path / "shipped"))
    assert shipped_examples["world_action"][0]["image"] == str(tmp_path / "shipped" / "examples" / "frame.png")
    assert set(sizes) == {"transformer", "vae"} and sum(sizes.values()) < 30e6
    assert read_call_defaults(str(tmp_path / "shipped")) == TINY_CALL_DEFAULTS
    shipped = Cosmos3TextToImagePipeline.from_pretrained(str(tmp_path / "shipped"), dtype=torch.float32)
    assert shipped.transformer.dtype == torch.float32
    for name, p in t2i.transformer.state_dict().items():
        assert torch.equal(shipped.transformer.state_dict()[name], p.to(torch.bfloat16).float()), name


def test_caption_file_holds_training_captions_only(tmp_path):
    root = write_folder_dataset(tmp_path / "d", 12, 2, size=32, frames=5, n_heldout=4)
    path = write_caption_file(root)
    with open(path) as f:
        captions = f.read().splitlines()
    heldout = {line["text"] for line in read_jsonl(f"{root}/heldout.jsonl")}
    assert 0 < len(captions) <= 12 and not heldout & set(captions)


def test_tokenizer_is_deterministic_and_compact():
    a, b = build_tokenizer(), build_tokenizer()
    text = "a large red circle on the left of a blue background"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert len(a(text)["input_ids"]) <= 16  # captions tokenize into whole words


def test_the_shipped_model(tmp_path, capsys):
    """cosmos3/assets/cosmos3-tiny: within its size budget, the default of `cosmos3 generate`, follows prompts'
    backgrounds (always right on the held-out captions when it was measured), and runs as a policy."""
    import json
    import os

    import numpy as np
    from PIL import Image

    from cosmos3.cli import main
    from cosmos3.demo import default_model_folder
    from cosmos3.robotics.policy import Cosmos3Policy
    from cosmos3.training.synthetic import detect
    from cosmos3.training.vae import safetensors_bytes

    folder = default_model_folder()
    total = sum(safetensors_bytes(os.path.join(folder, part)) for part in ("transformer", "vae"))
    assert total <= 30 * 2**20
    for i, (prompt, background) in enumerate((("a large red circle on the left of a white background", "white"),
                                              ("a small yellow star at the top of a black background", "black"),
                                              ("a blue background with a large green square", "blue"))):
        out = tmp_path / f"{i}.png"
        main(["generate", "--task", "t2i", "--prompt", prompt, "--out", str(out), "--seed", str(i)])
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"out": str(out)}
        image = Image.open(out)
        assert image.size == (64, 64) and detect(image)["background"] == background, prompt

    policy = Cosmos3Policy.from_pretrained(folder, device="cpu")
    with open(os.path.join(folder, "demo_examples.json")) as f:
        example = json.load(f)["world_action"][0]
    frame = np.asarray(Image.open(os.path.join(folder, example["image"])).convert("RGB"))
    chunk = policy.predict_action_chunk({"observation.images.corner2": frame, "task": example["instruction"]})
    # MetaWorld units (deltas and gripper in [-1, 1]; the environment clips what goes past)
    assert chunk.shape == (8, 4) and np.isfinite(chunk).all() and np.abs(chunk).max() < 2.0
