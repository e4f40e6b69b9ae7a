"""Quality measurements of a trained model (used for Cosmos3-Tiny's figures in the README).

    python -m cosmos3.training.evaluate faithfulness --model M --heldout data/shapes/heldout.jsonl --n 64
    python -m cosmos3.training.evaluate forward-dynamics --model M --data data/metaworld-mt3-eval
    python -m cosmos3.training.evaluate transfer --model M --data data/shapes --n 32

* **Prompt faithfulness** (`prompt_faithfulness`): text-to-image on captions of attribute combinations held out
  of training (`synthetic.write_folder_dataset`'s `heldout.jsonl`), scored by `synthetic.score_image` (colours,
  shapes, sizes, positions, background): the mean fraction of checks passed and the fraction of images with every
  check passed. The same scorer on clean renders of those captions is the ceiling (near 1.0).
* **Forward dynamics** (`forward_dynamics_psnr`): from an episode's first frame and the actions really taken, the
  world-action pipeline predicts the next frames; PSNR (dB) against the simulator's frames on the same canvas.
  Two baselines frame it: holding the first frame (a model that predicts no motion) and the VAE round trip of the
  real frames (the best the latent space allows).
* **Edge agreement** (`edge_agreement`): transfer on held-out clips (`heldout_clips`: the video captions of
  `heldout.jsonl`, rendered), each generated with its own edge map (`tokenizers.control.edge_map`, the "medium"
  Canny preset) as the hint; the edge map of the generated frames is matched against the hint's with a 1-pixel
  tolerance (`edge_f1`). With `hint=False` the same clips come from text-to-video on their captions alone: what
  agreement the caption by itself buys. Two baselines frame it: each clip's edges against another held-out clip's
  (`shuffled`, chance level for scenes of this kind) and the VAE round trip of the source (`vae_round_trip`, the
  best the latent space allows).
  Edge F1 has little range at 64 pixels (the VAE round trip of the source itself scores ~0.30 against ~0.25 for
  another clip), so `edge_agreement` also scores where the objects are (`position_agreement`): the foreground
  (pixels far from the frame's border colour) of each generated frame against the source's, as mask IoU and
  centroid distance in pixels.

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


def _dilate(mask: np.ndarray, tolerance: int) -> np.ndarray:
    """`[T, H, W]` bool, each frame dilated by a `(2 tolerance + 1)` square max (zero padding)."""
    if tolerance == 0:
        return mask
    x = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[:, None]
    k = 2 * tolerance + 1
    return torch.nn.functional.max_pool2d(x, k, stride=1, padding=tolerance)[:, 0].numpy() > 0


def _edge_mask(edges: np.ndarray) -> np.ndarray:
    """An `edge_map` result (uint8 `[T, H, W, 3]` or `[T, H, W]`, 0/255) as `[T, H, W]` bool."""
    edges = np.asarray(edges)
    return (edges[..., 0] if edges.ndim == 4 else edges) > 0


def edge_f1(generated: np.ndarray, source: np.ndarray, tolerance: int = 1) -> dict[str, float]:
    """Agreement of two edge maps of one clip (`edge_map` outputs, same shape), pooled over its frames.

    With G and S the generated and source edge pixels and D(.) a `(2 tolerance + 1)` square dilation in each frame:
    precision = |G & D(S)| / |G| (generated edges within `tolerance` pixels of a source edge), recall =
    |S & D(G)| / |S| (source edges within `tolerance` of a generated one), F1 = 2 P R / (P + R). An empty side has
    nothing wrong in it (precision 1 when G is empty, recall 1 when S is empty), so two empty maps score 1 and an
    empty map against a non-empty one scores 0."""
    g, s = _edge_mask(generated), _edge_mask(source)
    if g.shape != s.shape:
        raise ValueError(f"edge maps of different shapes: {g.shape} (generated) vs {s.shape} (source)")
    precision = float((g & _dilate(s, tolerance)).sum() / g.sum()) if g.any() else 1.0
    recall = float((s & _dilate(g, tolerance)).sum() / s.sum()) if s.any() else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}


def foreground(frames: np.ndarray, threshold: float = 40.0) -> np.ndarray:
    """`[T, H, W]` bool: the pixels of uint8 `[T, H, W, 3]` frames farther than `threshold` (RGB distance) from their
    frame's background, taken as the median colour of the frame's border (the synthetic scenes' backgrounds are
    flat and their objects never cover a whole border)."""
    v = np.asarray(frames, dtype=np.float32)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {v.shape}")
    border = np.concatenate([v[:, 0], v[:, -1], v[:, :, 0], v[:, :, -1]], axis=1)
    background = np.median(border, axis=1)[:, None, None]
    return np.linalg.norm(v - background, axis=-1) > threshold


def position_agreement(generated: np.ndarray, source: np.ndarray) -> dict[str, float]:
    """Where the objects of two clips are (uint8 `[T, H, W, 3]`, same shape), frame by frame: the mean IoU of their
    `foreground` masks and the mean distance (pixels) between the masks' centroids. A frame where either side has
    no foreground scores IoU 0 and distance H/2 (as far as a miss is taken to be)."""
    a, b = foreground(generated), foreground(source)
    if a.shape != b.shape:
        raise ValueError(f"clips of different shapes: {a.shape} (generated) vs {b.shape} (source)")
    union = (a | b).sum((1, 2))
    iou = np.where(union > 0, (a & b).sum((1, 2)) / np.maximum(union, 1), 0.0)
    ys, xs = np.mgrid[: a.shape[1], : a.shape[2]]

    def centroids(m):
        n = np.maximum(m.sum((1, 2)), 1)
        return np.stack([(m * ys).sum((1, 2)) / n, (m * xs).sum((1, 2)) / n], -1)

    both = a.any((1, 2)) & b.any((1, 2))
    distance = np.where(both, np.linalg.norm(centroids(a) - centroids(b), axis=-1), a.shape[1] / 2)
    return {"iou": float(iou.mean()), "centroid_px": float(distance.mean())}


def heldout_clips(data_root: str | os.PathLike, n: int, *, size: int = 64, frames: int = 9,
                  ) -> tuple[list[np.ndarray], list[str]]:
    """The first `n` video captions of a synthetic folder's `heldout.jsonl` (attribute combinations its training
    clips never show), rendered: uint8 `[frames, size, size, 3]` clips and their captions."""
    lines = [line for line in synthetic.read_jsonl(os.path.join(data_root, "heldout.jsonl"))
             if line.get("kind") == "video"][:n]
    if not lines:
        raise ValueError(f"{data_root}: heldout.jsonl has no video captions (write the folder with n_videos > 0)")
    return [synthetic.render_heldout(line, size, frames) for line in lines], [line["text"] for line in lines]


def _mean_scores(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([s[k] for s in scores])) for k in ("f1", "precision", "recall")}


def _mean_of(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def edge_agreement(pipe, clips: Sequence[np.ndarray], prompts: Sequence[str], *, hint: bool = True,
                   num_inference_steps: int = 20, guidance_scale: float = 4.0, control_guidance: float = 1.0,
                   fps: float = 8.0, tolerance: int = 1, seed: int = 0, batch_size: int = 8,
                   round_trip: bool = True) -> dict[str, Any]:
    """Edge-map agreement (`edge_f1`, averaged over clips) of videos generated for `clips` (uint8 `[T, H, W, 3]`,
    one size) and their `prompts`.

    `hint=True`: `pipe` is a `Cosmos3TransferPipeline`, called with each clip's `edge_map` as
    `control_videos={"edge": ...}`; `hint=False`: a `Cosmos3TextToVideoPipeline`, called with the prompt alone
    (`num_frames` = T). Clip i is drawn with `torch.Generator().manual_seed(seed * 1_000_003 + i)` whatever the
    batching, so two models (or hint and no hint) are compared on the same noise. Returns `f1`, `precision`,
    `recall`, `per_clip_f1`, the `shuffled` baseline (each source against the next clip's source edges), with
    `round_trip` the `vae_round_trip` ceiling (through `pipe.vae`), the settings, and the generated `frames`."""
    from ..tokenizers.control import edge_map

    if len(clips) != len(prompts) or not clips:
        raise ValueError(f"need one prompt per clip and at least one clip; got {len(clips)} clips and "
                         f"{len(prompts)} prompts")
    clips = [np.asarray(c) for c in clips]
    if any(c.dtype != np.uint8 or c.ndim != 4 or c.shape != clips[0].shape for c in clips):
        raise ValueError("clips must be uint8 [T, H, W, 3] arrays of one shape")
    num_frames, height, width = clips[0].shape[:3]
    sources = [edge_map(c) for c in clips]
    options: dict[str, Any] = dict(height=height, width=width, fps=fps, num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale, output_type="np")
    if hint:
        options["control_guidance"] = control_guidance
    else:
        options["num_frames"] = num_frames
    generated = []
    for start in range(0, len(clips), batch_size):
        part = range(start, min(start + batch_size, len(clips)))
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in part]
        extra = {"control_videos": [{"edge": sources[i]} for i in part]} if hint else {}
        out = pipe([prompts[i] for i in part], generator=generators, **extra, **options)
        generated += [_to_uint8(np.asarray(f))[:num_frames] for f in out.frames]
    scores = [edge_f1(edge_map(g), s, tolerance) for g, s in zip(generated, sources)]
    positions = [position_agreement(g, c) for g, c in zip(generated, clips)]
    result: dict[str, Any] = {
        "n": len(scores), **_mean_scores(scores), "per_clip_f1": [s["f1"] for s in scores],
        "shuffled": _mean_scores([edge_f1(sources[(i + 1) % len(sources)], s, tolerance)
                                  for i, s in enumerate(sources)]),
        "position": _mean_of(positions),
        "position_shuffled": _mean_of([position_agreement(clips[(i + 1) % len(clips)], c)
                                       for i, c in enumerate(clips)]),
    }
    if round_trip:
        from ..tokenizers.vision import Cosmos3VisionTokenizer, postprocess_video

        tokenizer = Cosmos3VisionTokenizer(pipe.vae)
        trips = []
        with torch.no_grad():
            for clip, source in zip(clips, sources):
                video = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
                decoded = postprocess_video(tokenizer.decode(tokenizer.encode(video.to(pipe.vae.dtype))))[0]
                trips.append(edge_f1(edge_map(decoded[:num_frames]), source, tolerance))
        result["vae_round_trip"] = _mean_scores(trips)
    result.update(hint=hint, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                  control_guidance=control_guidance if hint else None, tolerance=tolerance, seed=seed,
                  frames=generated)
    return result


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
    t = sub.add_parser("transfer", help="edge-map agreement of transfer (or text-to-video) on held-out clips")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True, help="a synthetic folder (write_folder_dataset) with video captions")
    t.add_argument("--n", type=int, default=32)
    t.add_argument("--size", type=int, default=64)
    t.add_argument("--frames", type=int, default=9)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--guidance", type=float, default=4.0)
    t.add_argument("--control-guidance", type=float, default=1.0)
    t.add_argument("--no-hint", action="store_true", help="text-to-video on the captions alone (the baseline)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save", default=None, help="write source | its edges | generated | their edges as one PNG")
    args = parser.parse_args(argv)
    if args.what == "transfer":
        from ..pipelines import Cosmos3TextToVideoPipeline, Cosmos3TransferPipeline

        cls = Cosmos3TextToVideoPipeline if args.no_hint else Cosmos3TransferPipeline
        pipe = cls.from_pretrained(args.model, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        clips, prompts = heldout_clips(args.data, args.n, size=args.size, frames=args.frames)
        result = edge_agreement(pipe, clips, prompts, hint=not args.no_hint, num_inference_steps=args.steps,
                                guidance_scale=args.guidance, control_guidance=args.control_guidance, seed=args.seed)
        frames = result.pop("frames")
        if args.save:
            from PIL import Image

            from ..tokenizers.control import edge_map

            # one row per clip: its frames side by side, in four bands
            rows = [np.concatenate([np.concatenate(list(x), axis=1) for x in (c, edge_map(c), g, edge_map(g))])
                    for c, g in zip(clips, frames)]
            Image.fromarray(np.concatenate(rows)).save(args.save)
    elif args.what == "faithfulness":
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
