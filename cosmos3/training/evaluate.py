"""Quality measurements of a trained model (used for Cosmos3-Tiny's figures in the README).

    python -m cosmos3.training.evaluate faithfulness --model M --heldout data/shapes/heldout.jsonl --n 64
    python -m cosmos3.training.evaluate forward-dynamics --model M --data data/metaworld-mt3-eval

* **Prompt faithfulness** (`prompt_faithfulness`): text-to-image on captions of attribute combinations held out
  of training (`synthetic.write_folder_dataset`'s `heldout.jsonl`), scored by `synthetic.score_image` (colours,
  shapes, sizes, positions, background): the mean fraction of checks passed and the fraction of images with every
  check passed. The same scorer on clean renders of those captions is the ceiling (near 1.0).
* **Forward dynamics** (`forward_dynamics_psnr`): from an episode's first frame and the actions really taken, the
  world-action pipeline predicts the next frames; PSNR (dB) against the simulator's frames on the same canvas.
  Two baselines frame it: holding the first frame (a model that predicts no motion) and the VAE round trip of the
  real frames (the best the latent space allows).

Every call takes a seed; samples are drawn with one generator each, so a figure is reproducible.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import synthetic
from .vae import psnr


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def prompt_faithfulness(pipe, lines: Sequence[dict], *, size: int = 64, num_inference_steps: int | None = None,
                        guidance_scale: float | None = None, seed: int = 0, batch_size: int = 16,
                        kinds: Sequence[str] = ("image",)) -> dict[str, Any]:
    """Generate one image per held-out caption (`lines`: `heldout.jsonl` entries with `text`, `attributes`,
    `kind`) with `pipe` (a text-to-image pipeline) and score it. Returns `accuracy`, `correct`, `n`, the same two
    for clean renders (`render_accuracy`, `render_correct`), and the settings used."""
    lines = [line for line in lines if line.get("kind", "image") in kinds]
    if not lines:
        raise ValueError(f"no held-out captions of kind {list(kinds)}")
    options: dict[str, Any] = {}
    if num_inference_steps is not None:
        options["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        options["guidance_scale"] = guidance_scale
    generated, rendered = [], []
    for start in range(0, len(lines), batch_size):
        part = lines[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(part))]
        out = pipe([line["text"] for line in part], height=size, width=size, generator=generators, output_type="np",
                   **options)
        images = np.asarray(out.images if hasattr(out, "images") else out.frames)
        generated += [(_to_uint8(image.reshape(size, size, 3)), line["attributes"])
                      for image, line in zip(images, part)]
        rendered += [(synthetic.render_heldout(line, size, 1), line["attributes"]) for line in part]
    scores = [synthetic.score_image(image, attributes) for image, attributes in generated]
    render_scores = [synthetic.score_image(image, attributes) for image, attributes in rendered]
    return {
        "n": len(scores), "accuracy": float(np.mean([s["accuracy"] for s in scores])),
        "per_attribute": attribute_accuracy(scores), "render_per_attribute": attribute_accuracy(render_scores),
        "correct": float(np.mean([s["correct"] for s in scores])),
        "render_accuracy": float(np.mean([s["accuracy"] for s in render_scores])),
        "render_correct": float(np.mean([s["correct"] for s in render_scores])),
        "size": size, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed,
        "images": [image for image, _ in generated],
    }


def attribute_accuracy(scores: Sequence[dict]) -> dict[str, float]:
    """Fraction of passed checks per attribute (background, and colour / shape / size / position over objects)."""
    checks: dict[str, list[bool]] = {"background": [bool(s["background"]) for s in scores]}
    for s in scores:
        for obj in s["objects"]:
            for name, ok in obj.items():
                if isinstance(ok, bool):
                    checks.setdefault(name, []).append(ok)
    return {name: float(np.mean(values)) for name, values in checks.items() if values}


def forward_dynamics_psnr(pipe, normalizer, data_root: str | os.PathLike, *, num_frames: int = 9,
                          resolution_tier: int = 64, embodiment: str = "libero", fps: float | None = None,
                          num_inference_steps: int = 30, guidance_scale: float = 1.0, max_clips: int = 64,
                          seed: int = 0, batch_size: int = 8) -> dict[str, Any]:
    """Forward-dynamics PSNR on the first clip of each episode of the LeRobot dataset at `data_root` (episodes the
    model did not train on). `normalizer` is the run's `ActionNormalizer` (`action_normalizer.json`)."""
    from PIL import Image

    from ..conditioning import action_canvas, tile_cameras
    from ..pipelines import ActionRequest
    from ..tokenizers.vision import Cosmos3VisionTokenizer, postprocess_video
    from .datasets import LeRobotDataset

    data = LeRobotDataset(data_root, clip_frames=num_frames, stride=10**9, state_key=None)  # one clip per episode
    indices = list(range(min(len(data), max_clips)))
    if not indices:
        raise ValueError(f"{data_root}: no clip of {num_frames} frames")
    fps = float(fps or data.fps)
    tokenizer = Cosmos3VisionTokenizer(pipe.vae)
    model_psnr, hold_psnr, vae_psnr, per_task = [], [], [], {}
    for start in range(0, len(indices), batch_size):
        samples = [data[i] for i in indices[start : start + batch_size]]
        requests, prompts, reals = [], [], []
        for sample in samples:
            frames = tile_cameras(sample["frames"], None)
            canvas = action_canvas([Image.fromarray(f) for f in frames], resolution_tier, num_frames)[0]
            reals.append(postprocess_video(canvas)[0])  # [T, H, W, 3] on the canvas, as the model sees it
            actions = normalizer.normalize(torch.as_tensor(np.asarray(sample["action"]), dtype=torch.float32))
            requests.append(ActionRequest(mode="forward_dynamics", chunk_size=num_frames - 1, domain_name=embodiment,
                                          image=Image.fromarray(frames[0]), actions=actions,
                                          resolution_tier=resolution_tier, action_dim=actions.shape[1]))
            prompts.append(sample["task"])
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(samples))]
        out = pipe(prompts, requests, fps=fps, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, output_type="np", generator=generators)
        for k, (sample, real) in enumerate(zip(samples, reals)):
            predicted = _to_uint8(np.asarray(out.frames[k]))[:, : real.shape[1], : real.shape[2]]
            with torch.no_grad():
                video = torch.from_numpy(real).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
                round_trip = postprocess_video(tokenizer.decode(tokenizer.encode(video.to(pipe.vae.dtype))))[0]
            future = slice(1, None)  # frame 0 is the conditioning frame
            model_psnr.append(psnr(predicted[future], real[future]))
            hold_psnr.append(psnr(np.broadcast_to(real[:1], real[future].shape), real[future]))
            vae_psnr.append(psnr(round_trip[future], real[future]))
            per_task.setdefault(sample["task"], []).append(model_psnr[-1])
    return {"clips": len(model_psnr), "psnr": float(np.mean(model_psnr)), "hold_first_frame_psnr":
            float(np.mean(hold_psnr)), "vae_round_trip_psnr": float(np.mean(vae_psnr)),
            "per_task_psnr": {t: float(np.mean(v)) for t, v in per_task.items()}, "num_frames": num_frames,
            "num_inference_steps": num_inference_steps, "seed": seed}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m cosmos3.training.evaluate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    f = sub.add_parser("faithfulness", help="text-to-image prompt faithfulness on held-out captions")
    f.add_argument("--model", required=True)
    f.add_argument("--heldout", required=True, help="heldout.jsonl of a synthetic folder")
    f.add_argument("--n", type=int, default=64)
    f.add_argument("--size", type=int, default=64)
    f.add_argument("--steps", type=int, default=None)
    f.add_argument("--guidance", type=float, default=None)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--save", default=None, help="write the generated images as one PNG grid here")
    d = sub.add_parser("forward-dynamics", help="forward-dynamics PSNR against held-out simulator episodes")
    d.add_argument("--model", required=True, help="a world-action folder with action_normalizer.json")
    d.add_argument("--data", required=True, help="a LeRobot dataset of episodes not trained on")
    d.add_argument("--steps", type=int, default=30)
    d.add_argument("--max-clips", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.what == "faithfulness":
        from ..pipelines import Cosmos3TextToImagePipeline

        pipe = Cosmos3TextToImagePipeline.from_pretrained(args.model, dtype=torch.float32)
        lines = synthetic.read_jsonl(args.heldout)
        lines = [line for line in lines if line.get("kind", "image") == "image"][: args.n]
        result = prompt_faithfulness(pipe, lines, size=args.size, num_inference_steps=args.steps,
                                     guidance_scale=args.guidance, seed=args.seed)
        images = result.pop("images")
        if args.save:
            from PIL import Image

            cols = 8
            rows = math.ceil(len(images) / cols)
            grid = np.zeros((rows * args.size, cols * args.size, 3), np.uint8)
            for i, image in enumerate(images):
                r, c = divmod(i, cols)
                grid[r * args.size : (r + 1) * args.size, c * args.size : (c + 1) * args.size] = image
            Image.fromarray(grid).save(args.save)
    else:
        from ..pipelines import Cosmos3WorldActionPipeline
        from ..robotics.policy import PolicyConfig
        from ..tokenizers.action import ActionNormalizer

        pipe = Cosmos3WorldActionPipeline.from_pretrained(args.model, dtype=torch.float32)
        config = PolicyConfig.load(args.model)
        normalizer = ActionNormalizer.load(os.path.join(args.model, "action_normalizer.json"))
        result = forward_dynamics_psnr(pipe, normalizer, args.data, num_frames=config.chunk_size + 1,
                                       resolution_tier=config.resolution_tier, embodiment=config.embodiment,
                                       fps=config.fps, num_inference_steps=args.steps, max_clips=args.max_clips,
                                       seed=args.seed)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
