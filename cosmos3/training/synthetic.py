"""Captioned synthetic scenes whose captions are known exactly: training data that needs no download, and a
prompt-faithfulness metric for what a model generates from such captions.

    write_folder_dataset("data/shapes", n_images=4000, n_videos=500)   # a FolderDataset folder + heldout.jsonl
    scene = sample_scene(np.random.default_rng(0))                     # attributes + layout (jitter)
    image = render_scene(scene)                                        # uint8 [H, W, 3]
    attributes = parse_caption("a large red circle on the left of a blue background")
    score_image(generated, attributes)["correct"]                     # colour, shape, size, position, background

Scenes: one or two flat shapes (`SHAPES`) in `SHAPE_COLORS`, `small` or `large`, at one of `POSITIONS`, on one of
`BACKGROUND_COLORS`; videos hold one shape moving in one of `DIRECTIONS`. Notable choices:

* **Attributes are measurable**: a shape's *size* is its area (small ~2.5% of the image, large ~10%, +-20% jitter,
  whatever the shape), its *position* is its centroid (every shape is drawn around its centroid), so the scorer
  measures the same quantities the generator controls and the classes are separated by wide margins.
* **Deterministic**: sample `i` of a kind draws from `np.random.default_rng((seed, kind, i))`, so a dataset's first
  n samples do not depend on how many are written, and the same seed gives the same bytes (PNG and x264 are
  deterministic). Rendering is supersampled 4x and box-filtered (anti-aliased edges), numpy and PIL only.
* **Held-out compositions**: a stable hash of a scene's attributes (its *key*, template-free) puts ~5% of all
  attribute combinations aside. Training never contains them, in any caption template; `heldout.jsonl` lists
  captions of them with their attributes (and seeds to render references), for a prompt-faithfulness evaluation of
  combinations a model has never seen, built only from words it has seen.
* **Atomic folder**: everything is written to a sibling temporary directory that is renamed into place last.

The scorer (`detect` / `score_image` / `score_video`) reads an image as mixtures `alpha * colour + (1 - alpha) *
background`: the background is the median of the border pixels, each pixel goes to the palette colour whose
segment from the background passes closest to it, with coverage `alpha` (so anti-aliased or blurred edges still
count for their shape, rather than for a colour halfway between). Per expected colour it then measures

* **color**: the colour covers at least `MIN_AREA` of the image and is among the n most covering colours
  (n = number of shapes in the caption): "the dominant non-background colours are the stated ones";
* **position**: the coverage-weighted centroid falls in the stated region (`center` = within 0.12 of the middle,
  else the dominant axis decides left/right/top/bottom);
* **size**: the covered area (sum of alpha) is above or below `SIZE_THRESHOLD` (geometric middle of the classes);
* **shape**: of the five shapes rendered at the measured centroid and area, the stated one overlaps the detected
  coverage best (soft IoU);
* **background**: the border median is nearest the stated background colour;
* **motion** (videos): the centroid moves at least 10% of the image along the stated direction's axis, in its
  sign, further than along the other axis (first frame to last); a clip's other checks are majorities over its
  frames (x264's 4:2:0 chroma blurs small shapes in some frames).

`score_image` returns these booleans per object, `accuracy` (fraction of checks passed) and `correct` (all
passed). It is exact on clean renders (the tests require >= 95%); on generated images it measures what survives.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
    "gray": (128, 128, 128),
}  # fmt: skip
SHAPE_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
BACKGROUND_COLORS = ("black", "gray", "white", "blue")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
DIRECTIONS = ("left", "right", "up", "down")

AREA = {"small": 0.025, "large": 0.10}  # fraction of the image a shape covers
AREA_JITTER = 0.2
SIZE_THRESHOLD = math.sqrt(AREA["small"] * AREA["large"])  # 0.05: each class is a factor 2 away from it
ANCHORS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7), "center": (0.5, 0.5)}
PAIR_ANCHORS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
POSITION_JITTER = 0.04
CENTER_RADIUS = 0.12  # a centroid this close to the middle (max norm) reads as "center"
MIN_AREA = 0.005  # a colour covering less than this is not an object
MOTION_TRAVEL = (0.35, 0.45)  # distance a moving shape covers over a clip, fraction of the image
MIN_MOTION = 0.10
HELDOUT_FRACTION = 0.05
SUPERSAMPLE = 4
KINDS = {"image": 0, "video": 1, "heldout": 2}

POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}
DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
# Caption templates. {objects} is one or two "a {size} {color} {shape} {position}" phrases joined by " and ".
IMAGE_TEMPLATES = ("{objects} of a {background} background", "a {background} background with {objects}",
                   "a picture of {objects}, {background} background")
VIDEO_TEMPLATES = ("{object} moving {direction} on a {background} background",
                   "a {background} background, {object} moves {direction}",
                   "a video of {object} moving {direction}, {background} background")

# Area of each shape drawn with "radius" r (circumradius; half side for the square), in units of r^2.
_STAR_INNER = 0.5
_UNIT_AREA = {"circle": math.pi, "square": 4.0, "triangle": 3 * math.sqrt(3) / 4, "diamond": 2.0,
              "star": 5 * _STAR_INNER * math.sin(math.radians(36))}


# ---------------------------------------------------------------------------------------------------------- scenes


def _radius(shape: str, area: float) -> float:
    """The drawing radius (fraction of the image side) that gives `shape` the area `area` (fraction of the image)."""
    return math.sqrt(area / _UNIT_AREA[shape])


def _extent(shape: str, r: float) -> tuple[float, float, float, float]:
    """How far the shape reaches from its centroid: (left, right, up, down), in the units of `r`."""
    if shape == "triangle":
        return (r * math.sqrt(3) / 2, r * math.sqrt(3) / 2, r, r / 2)
    if shape == "star":
        return (r * math.cos(math.radians(18)),) * 2 + (r, r * math.cos(math.radians(36)))
    return (r, r, r, r)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices (y down) of a polygonal shape centred (centroid) at (cx, cy); apexes point up."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(math.radians(a)), cy - r * math.sin(math.radians(a))) for a in (90, 210, 330)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * _STAR_INNER
            angle = math.radians(90 + 36 * k)
            points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown polygon shape {shape!r}")


def shape_coverage(shape: str, center: tuple[float, float], area: float, size: int) -> np.ndarray:
    """Coverage in [0, 1] (`[size, size]` float32) of `shape` with centroid `center` and area `area` (fractions of
    the image), anti-aliased by drawing at `SUPERSAMPLE`x and averaging."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = center[0] * big, center[1] * big, _radius(shape, area) * big
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=255)
    mask = np.asarray(canvas, dtype=np.float32).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE)
    return mask.mean(axis=(1, 3)) / 255.0


def scene_key(attributes: dict[str, Any]) -> str:
    """The template-free identity of a scene's attributes: what the held-out split is decided on."""
    parts = [attributes["background"], attributes.get("motion") or "-"]
    for obj in attributes["objects"]:
        parts.append("/".join(str(obj.get(k)) for k in ("size", "color", "shape", "position")))
    return "|".join(parts)


def is_heldout(attributes: dict[str, Any], fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether this combination of attributes is reserved for evaluation (stable hash, about `fraction` of them)."""
    digest = hashlib.sha256(scene_key(attributes).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _sample_attributes(rng: np.random.Generator, video: bool) -> dict[str, Any]:
    background = str(rng.choice(BACKGROUND_COLORS))
    n_objects = 1 if video or rng.random() < 0.6 else 2
    colors = [str(c) for c in rng.permutation([c for c in SHAPE_COLORS if c != background])[:n_objects]]
    if video:
        positions: list[str | None] = [None]
    elif n_objects == 2:
        positions = list(rng.permutation(["left", "right"] if rng.random() < 0.5 else ["top", "bottom"]))
    else:
        positions = [str(rng.choice(POSITIONS))]
    objects = [{"shape": str(rng.choice(SHAPES)), "color": colors[j], "size": str(rng.choice(SIZES)),
                "position": None if positions[j] is None else str(positions[j])} for j in range(n_objects)]
    return {"background": background, "objects": objects, "motion": str(rng.choice(DIRECTIONS)) if video else None}


def _place(rng: np.random.Generator, obj: dict[str, Any], anchor: tuple[float, float]) -> dict[str, Any]:
    """Jittered area and centroid for `obj` near `anchor`, kept inside the image (1 pixel margin at 64 px)."""
    area = AREA[obj["size"]] * (1 + AREA_JITTER * (2 * rng.random() - 1))
    r = _radius(obj["shape"], area)
    left, right, up, down = _extent(obj["shape"], r)
    margin = 1 / 64
    cx = float(np.clip(anchor[0] + POSITION_JITTER * (2 * rng.random() - 1), left + margin, 1 - right - margin))
    cy = float(np.clip(anchor[1] + POSITION_JITTER * (2 * rng.random() - 1), up + margin, 1 - down - margin))
    return {**obj, "area": area, "center": (cx, cy)}


def _layout_image(rng: np.random.Generator, attributes: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Jittered placement; None when two shapes keep overlapping (two large shapes stacked vertically may not fit:
    the caller then draws other attributes, rather than letting one shape hide part of the other)."""
    anchors = ANCHORS if len(attributes["objects"]) == 1 else PAIR_ANCHORS
    for _ in range(20):
        placed = [_place(rng, obj, anchors[obj["position"]]) for obj in attributes["objects"]]
        if len(placed) < 2:
            return placed
        masks = [shape_coverage(p["shape"], p["center"], p["area"], 64) for p in placed]
        if not ((masks[0] > 0) & (masks[1] > 0)).any():
            return placed
    return None


def _layout_video(rng: np.random.Generator, attributes: dict[str, Any]) -> list[dict[str, Any]]:
    """One shape travelling `MOTION_TRAVEL` along the stated direction, centred on the image's middle line."""
    obj = _place(rng, attributes["objects"][0], (0.5, 0.5))
    travel = float(rng.uniform(*MOTION_TRAVEL))
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[attributes["motion"]]
    cx, cy = obj["center"]
    if dx:
        cx = 0.5
    else:
        cy = 0.5
    start = (cx - dx * travel / 2, cy - dy * travel / 2)
    return [{**obj, "center": start, "velocity": (dx * travel, dy * travel)}]


def sample_scene(rng: np.random.Generator, *, video: bool = False, heldout: bool | None = False) -> dict[str, Any]:
    """Draw a scene: `attributes` (what a caption says), `layout` (jittered areas and centroids) and `template`.

    `heldout=False` redraws scenes whose attributes are held out, `True` draws only held-out ones, `None` either.
    """
    while True:
        attributes = _sample_attributes(rng, video)
        if heldout is not None and is_heldout(attributes) != heldout:
            continue
        layout = _layout_video(rng, attributes) if video else _layout_image(rng, attributes)
        if layout is not None:
            break
    template = int(rng.integers(len(VIDEO_TEMPLATES if video else IMAGE_TEMPLATES)))
    return {"attributes": attributes, "layout": layout, "template": template}


def caption(attributes: dict[str, Any], template: int = 0) -> str:
    """The caption of `attributes` in template `template` (see `IMAGE_TEMPLATES` / `VIDEO_TEMPLATES`)."""

    def phrase(obj: dict[str, Any]) -> str:
        text = f"a {obj['size']} {obj['color']} {obj['shape']}"
        return text if obj.get("position") is None else f"{text} {POSITION_PHRASES[obj['position']]}"

    if attributes.get("motion"):
        return VIDEO_TEMPLATES[template].format(object=phrase(attributes["objects"][0]),
                                                direction=DIRECTION_PHRASES[attributes["motion"]],
                                                background=attributes["background"])
    objects = " and ".join(phrase(obj) for obj in attributes["objects"])
    return IMAGE_TEMPLATES[template].format(objects=objects, background=attributes["background"])


def render_scene(scene: dict[str, Any], size: int = 64, frames: int = 1) -> np.ndarray:
    """uint8 `[H, W, 3]` for an image scene, `[frames, H, W, 3]` for a video scene (the shape moves linearly from
    its start to its end position over the frames)."""
    attributes, layout = scene["attributes"], scene["layout"]
    video = attributes.get("motion") is not None
    count = frames if video else 1
    out = np.empty((count, size, size, 3), np.uint8)
    background = np.array(COLORS[attributes["background"]], np.float32)
    for t in range(count):
        image = np.broadcast_to(background, (size, size, 3)).copy()
        for obj in layout:
            center = obj["center"]
            if video:
                s = t / max(count - 1, 1)
                center = (center[0] + s * obj["velocity"][0], center[1] + s * obj["velocity"][1])
            alpha = shape_coverage(obj["shape"], center, obj["area"], size)[..., None]
            image = image * (1 - alpha) + np.array(COLORS[obj["color"]], np.float32) * alpha
        out[t] = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return out if video else out[0]


# ---------------------------------------------------------------------------------------------------------- folder


def _scene_record(scene: dict[str, Any]) -> dict[str, Any]:
    layout = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in obj.items()} for obj in scene["layout"]]
    return {"attributes": scene["attributes"], "layout": layout, "template": scene["template"]}


def write_folder_dataset(
    out_dir: str | os.PathLike,
    n_images: int,
    n_videos: int,
    size: int = 64,
    frames: int = 9,
    seed: int = 0,
    *,
    fps: float = 8.0,
    n_heldout: int = 200,
    overwrite: bool = False,
    video_options: dict[str, str] | None = None,
) -> str:
    """Write a `FolderDataset` folder of `n_images` PNGs and `n_videos` mp4 clips with their captions, atomically.

    Layout: `images/000000.png`, `videos/000000.mp4`, `metadata.jsonl` (`file_name`, `text`, `attributes`, `kind`),
    `heldout.jsonl` (`n_heldout` captions of held-out attribute combinations: `text`, `attributes`, `kind`, `seed`,
    `index`; `render_heldout(line, size, frames)` draws the reference), and `dataset.json` (the arguments).
    Half the held-out lines are image captions, half video captions when `n_videos` > 0. Returns `out_dir`.
    """
    from .. import io as media
    from ..tokenizers.vision import check_multiple, check_num_frames

    out_dir = os.path.normpath(os.fspath(out_dir))
    check_multiple(size, 16, name="`size`")  # the VAE's factors
    check_num_frames(frames, 4, name="`frames`")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir!r} exists and is not empty; pass overwrite=True to replace it.")
    with media.atomic_directory(out_dir) as tmp:
        lines = []
        for kind, count in (("image", n_images), ("video", n_videos)):
            if count:
                os.makedirs(os.path.join(tmp, f"{kind}s"))
            for i in range(count):
                rng = np.random.default_rng((seed, KINDS[kind], i))
                scene = sample_scene(rng, video=kind == "video")
                media_frames = render_scene(scene, size, frames)
                if kind == "image":
                    name = f"images/{i:06d}.png"
                    media.write_image(os.path.join(tmp, name), media_frames)
                else:
                    name = f"videos/{i:06d}.mp4"
                    media.write_video(os.path.join(tmp, name), media_frames, fps, options=video_options)
                lines.append({"file_name": name, "text": caption(scene["attributes"], scene["template"]),
                              "kind": kind, "attributes": scene["attributes"]})
        with open(os.path.join(tmp, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        with open(os.path.join(tmp, "heldout.jsonl"), "w", encoding="utf-8") as f:
            for i in range(n_heldout):
                video = n_videos > 0 and i % 2 == 1
                scene = sample_scene(np.random.default_rng((seed, KINDS["heldout"], i)), video=video, heldout=True)
                f.write(json.dumps({"text": caption(scene["attributes"], scene["template"]),
                                    "kind": "video" if video else "image", "attributes": scene["attributes"],
                                    "seed": seed, "index": i}) + "\n")
        settings = {"generator": "cosmos3.training.synthetic", "version": 1, "n_images": n_images,
                    "n_videos": n_videos, "size": size, "frames": frames, "fps": fps, "seed": seed,
                    "n_heldout": n_heldout, "heldout_fraction": HELDOUT_FRACTION}
        with open(os.path.join(tmp, "dataset.json"), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)
    return out_dir


def render_heldout(line: dict[str, Any], size: int = 64, frames: int = 9) -> np.ndarray:
    """The reference render of a `heldout.jsonl` line (same scene as written: same seed and index)."""
    rng = np.random.default_rng((line["seed"], KINDS["heldout"], line["index"]))
    scene = sample_scene(rng, video=line["kind"] == "video", heldout=True)
    return render_scene(scene, size, frames)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------- parsing

_VOCAB = {**dict.fromkeys(SHAPES, "shape"), **dict.fromkeys(COLORS, "color"), **dict.fromkeys(SIZES, "size"),
          "left": "position", "right": "position", "top": "position", "bottom": "position", "center": "position",
          "up": "direction", "down": "direction"}


def parse_caption(text: str) -> dict[str, Any]:
    """Attributes of a caption in any of the templates: `{"background", "objects": [{"shape", "color", "size",
    "position"}], "motion"}` (`position` None for videos, `motion` None for images).

    The parse is by vocabulary, not by template: the colour right before "background" is the background; each
    shape word takes the size and colour words since the previous object, and the position words after it up to
    the next object; "moving"/"moves" turns the following left/right/up/down into the motion.
    Raises ValueError when no background or no shape is found.
    """
    words = re.findall(r"[a-z]+", text.lower())
    background = None
    if "background" in words:
        i = words.index("background")
        if i > 0 and words[i - 1] in COLORS:
            background = words[i - 1]
            words = words[: i - 1] + words[i + 1 :]
    motion = None
    for verb in ("moving", "moves"):
        if verb in words:
            i = words.index(verb)
            direction = next((w for w in words[i + 1 :] if w in DIRECTIONS), None)
            if direction is not None:
                motion = direction
                j = words.index(direction, i + 1)
                words = words[:i] + words[j + 1 :]
            break
    objects: list[dict[str, Any]] = []
    pending: dict[str, str] = {}
    for word in words:
        role = _VOCAB.get(word)
        if role in ("size", "color"):
            pending[role] = word
        elif role == "shape":
            objects.append({"shape": word, "color": pending.get("color"), "size": pending.get("size"),
                            "position": None})
            pending = {}
        elif role == "position" and objects and objects[-1]["position"] is None:
            objects[-1]["position"] = word
    if background is None or not objects:
        raise ValueError(f"not a synthetic-scene caption (no background colour or no shape): {text!r}")
    return {"background": background, "objects": objects, "motion": motion}


# ---------------------------------------------------------------------------------------------------------- scoring


def _as_rgb(image: Any) -> np.ndarray:
    """uint8 or float ([0, 1] or [-1, 1]) `[H, W, 3]` (numpy, torch or PIL) -> float32 0..255."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    image = image.astype(np.float32)
    if image.min() < 0:
        image = (image + 1) / 2
    return np.clip(image, 0, 1) * 255


def _background(image: np.ndarray) -> tuple[str, np.ndarray]:
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3), image[:, :2].reshape(-1, 3),
                             image[:, -2:].reshape(-1, 3)])
    measured = np.median(border, axis=0)
    name = min(BACKGROUND_COLORS, key=lambda c: float(np.sum((np.array(COLORS[c]) - measured) ** 2)))
    return name, measured


def _coverage_by_color(image: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel, the shape colour (index into SHAPE_COLORS) whose segment from the background passes
    closest, and the coverage alpha along it (0 where the pixel is background or far from every segment)."""
    pixels = image.reshape(-1, 3) - background
    residuals, alphas = [], []
    for name in SHAPE_COLORS:
        direction = np.array(COLORS[name], np.float32) - background
        norm2 = float(direction @ direction)
        if norm2 < 30.0**2:  # the background itself (or nearly): cannot be told apart from it
            residuals.append(np.full(len(pixels), np.inf, np.float32))
            alphas.append(np.zeros(len(pixels), np.float32))
            continue
        alpha = np.clip(pixels @ direction / norm2, 0, 1)
        residuals.append(np.linalg.norm(pixels - alpha[:, None] * direction, axis=1))
        alphas.append(alpha)
    residual, alpha = np.stack(residuals), np.stack(alphas)
    best = residual.argmin(axis=0)
    picked = alpha[best, np.arange(len(pixels))]
    picked = np.where(residual[best, np.arange(len(pixels))] < 60.0, picked, 0.0)  # far from every colour: noise
    picked = np.where(picked > 0.2, picked, 0.0)  # faint noise and compression ringing are not a shape
    shape = image.shape[:2]
    return best.reshape(shape), picked.reshape(shape).astype(np.float32)


def _classify_position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "bottom" if dy > 0 else "top"


def _classify_shape(coverage: np.ndarray, center: tuple[float, float], area: float) -> str:
    """The shape whose render at `center` with `area` overlaps `coverage` best (soft IoU: sum min / sum max, which
    uses the anti-aliased edges instead of thresholding them away)."""
    size = coverage.shape[0]
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        template = shape_coverage(shape, center, area, size)
        union = float(np.maximum(template, coverage).sum())
        iou = float(np.minimum(template, coverage).sum()) / union if union else 0.0
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def detect(image: Any, n_objects: int = 2) -> dict[str, Any]:
    """What the scorer sees: `{"background", "objects": [{"color", "shape", "size", "position", "area",
    "center"}]}` for up to `n_objects` colours covering at least `MIN_AREA`, most covering first."""
    rgb = _as_rgb(image)
    if rgb.shape[0] != rgb.shape[1]:
        raise ValueError(f"the scorer reads square images, got {rgb.shape[:2]}")
    background, measured = _background(rgb)
    color_index, alpha = _coverage_by_color(rgb, measured)
    size = rgb.shape[0]
    ys, xs = (np.mgrid[0:size, 0:size] + 0.5) / size
    found = []
    for k, name in enumerate(SHAPE_COLORS):
        weight = np.where(color_index == k, alpha, 0.0)
        area = float(weight.sum()) / size**2
        if area < MIN_AREA:
            continue
        center = (float((weight * xs).sum() / weight.sum()), float((weight * ys).sum() / weight.sum()))
        found.append({"color": name, "area": area, "center": center, "position": _classify_position(*center),
                      "size": "large" if area > SIZE_THRESHOLD else "small",
                      "shape": _classify_shape(weight, center, area)})
    found.sort(key=lambda o: -o["area"])
    return {"background": background, "objects": found[:n_objects]}


def score_image(image: Any, attributes: dict[str, Any]) -> dict[str, Any]:
    """Check an image against caption attributes (see the module docstring for what each check measures).

    Returns `{"background": bool, "objects": [{"color", "shape", "size", "position": bool}], "accuracy": float,
    "correct": bool, "detected": detect(...)}`; `position` is skipped for objects without one.
    """
    expected = attributes["objects"]
    detected = detect(image, n_objects=len(expected))
    by_color = {o["color"]: o for o in detected["objects"]}
    objects = []
    for obj in expected:
        found = by_color.get(obj["color"])
        checks = {"color": found is not None}
        for key in ("shape", "size", "position"):
            if key != "position" or obj.get("position") is not None:
                checks[key] = found is not None and found[key] == obj[key]
        objects.append(checks)
    flags = [detected["background"] == attributes["background"]] + [v for o in objects for v in o.values()]
    return {"background": flags[0], "objects": objects, "accuracy": sum(flags) / len(flags), "correct": all(flags),
            "detected": detected}


def score_video(frames: Any, attributes: dict[str, Any]) -> dict[str, Any]:
    """Check a clip `[T, H, W, 3]` against caption attributes: each `score_image` check (colour, shape, size,
    background) by majority over the frames (video codecs blur small shapes in some frames), plus `motion` from the
    centroid of the stated colour in the first and last frames."""
    frames = [frames[t] for t in range(len(frames))]
    per_frame = [score_image(frame, attributes) for frame in frames]

    def majority(values: list[bool]) -> bool:
        return 2 * sum(values) > len(values)

    background = majority([r["background"] for r in per_frame])
    objects = [{key: majority([r["objects"][j][key] for r in per_frame]) for key in per_frame[0]["objects"][j]}
               for j in range(len(attributes["objects"]))]
    color = attributes["objects"][0]["color"]
    ends = []
    for frame in (frames[0], frames[-1]):
        ends.append(next((o for o in detect(frame, len(SHAPE_COLORS))["objects"] if o["color"] == color), None))
    motion = False
    if attributes.get("motion") and ends[0] is not None and ends[1] is not None:
        dx = ends[1]["center"][0] - ends[0]["center"][0]
        dy = ends[1]["center"][1] - ends[0]["center"][1]
        axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[attributes["motion"]]
        along, across = (dx, dy) if axis == 0 else (dy, dx)
        motion = sign * along >= MIN_MOTION and abs(along) > abs(across)
    objects[0]["motion"] = motion
    flags = [background] + [v for o in objects for v in o.values()]
    return {"background": background, "objects": objects, "accuracy": sum(flags) / len(flags),
            "correct": all(flags), "detected": per_frame[len(frames) // 2]["detected"]}


def accuracy(samples: Sequence[tuple[Any, dict[str, Any]]]) -> float:
    """Fraction of (image or clip, attributes) pairs whose every check passes."""
    scores = [(score_video(x, a) if a.get("motion") else score_image(x, a))["correct"] for x, a in samples]
    return sum(scores) / max(len(scores), 1)
