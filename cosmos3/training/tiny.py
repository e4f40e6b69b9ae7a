"""Cosmos3-Tiny: the architecture and the untrained starting folder of the small model cosmos3 trains and ships.

The published checkpoints are 16B-64B; Cosmos3-Tiny keeps their folder layout (transformer with both towers and
action heads, `AutoencoderKLWan`, BPE tokenizer with the chat template, scheduler) at a size that trains on a CPU:

* transformer: hidden 256, 6 layers, 4 heads of 64 (2 KV heads), MLP 768, vocabulary 1024, action heads (64-wide,
  32 domains), no sound; 11.2 M parameters (about 21 MiB in bfloat16);
* VAE: `cosmos3.training.vae.TINY_VAE_CONFIG` (16 latent channels, 16x spatial / 4x temporal), trained first;
* tokenizer: byte-level BPE trained on the texts the model will see: synthetic scene captions, MetaWorld
  instructions, the action captions and the pipelines' prompt templates.

`build_base(out_dir, vae_dir)` writes the starting folder (random transformer, the trained VAE, the tokenizer, the
scheduler) that `configs/tiny.toml` fine-tunes; the recipe's README section lists every step.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from ..io import atomic_directory, atomic_write_text

TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, vocab_size=1024, rope_axes_dim=[12, 10, 10], rope_theta=10000.0, action_gen=True, action_dim=64,
    num_embodiment_domains=32, sound_gen=False,
)  # fmt: skip
TOKENIZER_VOCAB = 1024


def tokenizer_corpus(n_captions: int = 2000, seed: int = 0) -> list[str]:
    """Texts the tiny tokenizer is trained on: what the pipelines will feed it."""
    import numpy as np

    from ..robotics.envs import METAWORLD_INSTRUCTIONS
    from ..tokenizers.text import ACTION_VIEWPOINTS, PromptSettings, action_caption, prompt_texts
    from .synthetic import caption, sample_scene

    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n_captions):
        scene = sample_scene(rng, video=bool(i % 2), heldout=False)  # held-out captions stay unseen
        texts.append(caption(scene["attributes"], template=scene["template"]))
    instructions = list(METAWORLD_INSTRUCTIONS.values())
    texts += instructions
    for i, instruction in enumerate(instructions):
        view = list(ACTION_VIEWPOINTS)[i % len(ACTION_VIEWPOINTS)]
        texts.append(action_caption(instruction, view_point=view, num_frames=17, fps=80.0, height=64, width=64))
    for frames, size in ((1, 64), (9, 64), (17, 128)):
        settings = PromptSettings(num_frames=frames, height=size, width=size, fps=8.0)
        texts += list(prompt_texts(texts[0], None, settings))
    return texts


def build_tokenizer(seed: int = 0):
    from ..tokenizers.text import build_tiny_tokenizer

    return build_tiny_tokenizer(TOKENIZER_VOCAB, tokenizer_corpus(seed=seed))


def build_base(out_dir: str, vae_dir: str, seed: int = 0) -> str:
    """Write the untrained Cosmos3-Tiny pipeline folder (random transformer, the trained VAE at `vae_dir`, a freshly
    trained tokenizer, the flow scheduler); atomically. Returns `out_dir`."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    from ..models.transformer_cosmos3 import Cosmos3Transformer
    from ..pipelines import Cosmos3WorldActionPipeline

    vae = AutoencoderKLWan.from_pretrained(vae_dir)
    tokenizer = build_tokenizer(seed)
    z = int(vae.config.z_dim)
    torch.manual_seed(seed)
    model = Cosmos3Transformer(**TINY_TRANSFORMER_CONFIG, latent_channel=z, patch_latent_dim=z * 4)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens, over the model's {model.config.vocab_size}.")
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = Cosmos3WorldActionPipeline(transformer=model, text_tokenizer=tokenizer, vae=vae, scheduler=scheduler,
                                      default_use_system_prompt=False)
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp)
    return out_dir


# The settings the shipped folder recommends (`call_defaults.json`): the size it was trained at.
TINY_CALL_DEFAULTS: dict[str, Any] = {"height": 64, "width": 64, "num_frames": 9, "fps": 8.0,
                                      "num_inference_steps": 20, "guidance_scale": 4.0}


def write_caption_file(folder: str, out_path: str | None = None, kind: str = "image") -> str:
    """The distinct captions of a synthetic folder's training `kind` samples, one per line (the distillation
    prompts; held-out captions are in `heldout.jsonl`, not in `metadata.jsonl`)."""
    from .synthetic import read_jsonl

    out_path = out_path or os.path.join(folder, f"captions-train-{kind}.txt")
    captions = sorted({line["text"] for line in read_jsonl(os.path.join(folder, "metadata.jsonl"))
                       if line.get("kind", kind) == kind})
    atomic_write_text(out_path, "\n".join(captions) + "\n")
    return out_path


def package(pipeline_dir: str, out_dir: str, *, call_defaults: dict[str, Any] | None = None,
            policy: dict[str, Any] | None = None, examples: dict[str, Any] | None = None) -> dict[str, int]:
    """Write the shippable Cosmos3-Tiny folder: the trained pipeline with every floating-point weight in bfloat16
    (loaders cast back to the dtype they are asked for), `call_defaults.json`, `policy_config.json` fields changed
    by `policy` (e.g. fewer denoising steps), and the demo's `demo_examples.json` (`examples`; image files it names
    are copied into `examples/`). Atomic. Returns the safetensors bytes per component."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    with atomic_directory(out_dir) as tmp:
        shutil.copytree(pipeline_dir, tmp, dirs_exist_ok=True)
        sizes: dict[str, int] = {}
        for root, _, files in os.walk(tmp):
            for name in files:
                path = os.path.join(root, name)
                if name.endswith(".safetensors"):
                    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
                               for k, v in load_file(path).items()}
                    save_file(tensors, path, metadata={"format": "pt"})
                    part = os.path.relpath(root, tmp)
                    sizes[part] = sizes.get(part, 0) + os.path.getsize(path)
        with open(os.path.join(tmp, "call_defaults.json"), "w") as f:
            json.dump(call_defaults or TINY_CALL_DEFAULTS, f, indent=2)
        if policy:
            from ..robotics.policy import PolicyConfig

            config = PolicyConfig.load(tmp)
            PolicyConfig(**{**config.__dict__, **policy}).save(tmp)
        if examples:
            examples = json.loads(json.dumps(examples))
            os.makedirs(os.path.join(tmp, "examples"), exist_ok=True)
            for entry in examples.get("world_action", []):
                name = os.path.basename(entry["image"])
                shutil.copy(entry["image"], os.path.join(tmp, "examples", name))
                entry["image"] = f"examples/{name}"
            with open(os.path.join(tmp, "demo_examples.json"), "w") as f:
                json.dump(examples, f, indent=2)
    return sizes


# The demo's examples for the shipped folder: held-out-style captions and a MetaWorld frame per task.
TINY_T2I_EXAMPLES = [
    "a large red circle on the left and a small blue square on the right of a white background",
    "a yellow star at the top of a black background",
    "a picture of a large green triangle at the bottom, gray background",
]


def main(argv: list[str] | None = None) -> None:
    """`python -m cosmos3.training.tiny shapes|base|package ...`: the steps of the Cosmos3-Tiny recipe around
    `cosmos3 collect`, the VAE trainer, `cosmos3 train` and `cosmos3 distill` (README, "Cosmos3-Tiny")."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m cosmos3.training.tiny", description=main.__doc__)
    sub = parser.add_subparsers(dest="step", required=True)
    s = sub.add_parser("shapes", help="the captioned synthetic scenes (images and clips) and the caption file")
    s.add_argument("--out", required=True)
    s.add_argument("--images", type=int, default=4000)
    s.add_argument("--videos", type=int, default=800)
    s.add_argument("--size", type=int, default=64)
    b = sub.add_parser("base", help="the untrained starting folder around a trained VAE")
    b.add_argument("--vae", required=True)
    b.add_argument("--out", required=True)
    p = sub.add_parser("package", help="the shippable bf16 folder from a trained pipeline folder")
    p.add_argument("--pipeline", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--policy-steps", type=int, default=10, help="denoising steps per policy chunk")
    p.add_argument("--example-frames", default=None, help="a LeRobot dataset: its first frame per task becomes a "
                   "world-action example of the demo")
    args = parser.parse_args(argv)
    if args.step == "shapes":
        from .synthetic import write_folder_dataset

        root = write_folder_dataset(args.out, args.images, args.videos, size=args.size)
        print(json.dumps({"folder": root, "captions": write_caption_file(root)}))
    elif args.step == "base":
        print(json.dumps({"folder": build_base(args.out, args.vae)}))
    else:
        import tempfile

        examples: dict[str, Any] = {"t2i": TINY_T2I_EXAMPLES, "world_action": []}
        with tempfile.TemporaryDirectory() as scratch:
            if args.example_frames:
                examples["world_action"] = _first_frames(args.example_frames, scratch)
            sizes = package(args.pipeline, args.out, policy={"num_inference_steps": args.policy_steps},
                            examples=examples)
        print(json.dumps({"folder": args.out, "safetensors_bytes": sizes, "total_bytes": sum(sizes.values())}))


def _first_frames(root: str, scratch: str) -> list[dict[str, str]]:
    """The first frame of the first episode of each task of a LeRobot dataset, as PNGs in `scratch`."""
    from PIL import Image

    from ..conditioning import tile_cameras
    from .datasets import LeRobotDataset

    data = LeRobotDataset(root, clip_frames=1, stride=10**9, action_key=None, state_key=None)
    out, seen = [], set()
    for i in range(len(data)):
        sample = data[i]
        if sample["task"] in seen:
            continue
        seen.add(sample["task"])
        path = os.path.join(scratch, f"task{len(out)}.png")
        Image.fromarray(tile_cameras(sample["frames"], None)[0]).save(path)
        out.append({"image": path, "instruction": sample["task"]})
    return out


if __name__ == "__main__":
    main()
