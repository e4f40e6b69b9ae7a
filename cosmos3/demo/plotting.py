"""Pictures the demo draws itself, so nothing is downloaded: the example observations and the action-chunk plot."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")


def draw_tabletop(size: int = 256) -> Image.Image:
    """An example observation: a red cube and a blue bowl on a table, seen from above and in front."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (205, 200, 190))
    draw = ImageDraw.Draw(image)
    s = size / 256
    draw.rectangle([0, 0, size, int(70 * s)], fill=(120, 130, 140))  # wall
    draw.rectangle([0, int(70 * s), size, size], fill=(160, 120, 80))  # table
    draw.rectangle([int(60 * s), int(150 * s), int(100 * s), int(190 * s)], fill=(200, 30, 30))  # cube
    draw.polygon([(60 * s, 150 * s), (72 * s, 140 * s), (112 * s, 140 * s), (100 * s, 150 * s)], fill=(230, 70, 70))
    draw.ellipse([int(150 * s), int(145 * s), int(220 * s), int(195 * s)], fill=(30, 60, 190))  # bowl
    draw.ellipse([int(158 * s), int(150 * s), int(212 * s), int(175 * s)], fill=(60, 100, 230))
    draw.rectangle([int(118 * s), 0, int(138 * s), int(90 * s)], fill=(60, 60, 60))  # gripper
    draw.rectangle([int(108 * s), int(90 * s), int(114 * s), int(115 * s)], fill=(40, 40, 40))
    draw.rectangle([int(142 * s), int(90 * s), int(148 * s), int(115 * s)], fill=(40, 40, 40))
    draw.rectangle([int(108 * s), int(86 * s), int(148 * s), int(92 * s)], fill=(50, 50, 50))
    return image


def draw_landscape(size: int = 256) -> Image.Image:
    """An example first frame: hills under an evening sky with a low sun."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for y in range(size):
        t = y / size
        draw.line([(0, y), (size, y)], fill=(int(250 - 120 * t), int(160 - 40 * t), int(90 + 110 * t)))
    s = size / 256
    draw.ellipse([int(150 * s), int(90 * s), int(200 * s), int(140 * s)], fill=(255, 230, 150))
    draw.polygon([(0, 170 * s), (70 * s, 130 * s), (150 * s, 175 * s), (0, size)], fill=(40, 90, 50))
    draw.polygon([(60 * s, size), (170 * s, 150 * s), (256 * s, 160 * s), (256 * s, size)], fill=(30, 70, 40))
    return image


def action_labels(embodiment: str, width: int) -> list[str]:
    """A name per action channel from the embodiment's documented block layout (`arm.gripper`), else `a0, a1, ...`."""
    from ..tokenizers.action import EMBODIMENTS

    layout = getattr(EMBODIMENTS.get(embodiment), "layout", None)
    if not layout or layout[-1].stop != width:
        return [f"a{i}" for i in range(width)]
    labels = []
    for seg in layout:
        n = seg.stop - seg.start
        labels += [f"{seg.group}.{seg.kind}" + (f"[{i}]" if n > 1 else "") for i in range(n)]
    return labels


def plot_actions(actions: Any, labels: list[str] | None = None, title: str = "", size: tuple[int, int] = (720, 380),
                 ) -> Image.Image:
    """A line plot of an action chunk `[T, D]` (one line per channel over the T steps), drawn with PIL so the demo
    needs no plotting library."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    values = np.asarray(actions, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise ValueError(f"`actions` must be [T >= 1, D >= 1], got shape {values.shape}.")
    steps, dims = values.shape
    labels = list(labels) if labels is not None else [f"a{i}" for i in range(dims)]
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 64, width - 190, 36, height - 40
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 1.0, high + 1.0
    pad = 0.05 * (high - low)
    low, high = low - pad, high + pad

    def x_of(step: float) -> float:
        return left + (right - left) * (step / max(steps - 1, 1))

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * (value - low) / (high - low)

    title = title or "action chunk"  # centred: a gr.Image label badge covers the top-left corner
    draw.text(((left + right) / 2 - 3 * len(title), 10), title, fill="black", font=font)
    for k in range(5):  # horizontal grid and value labels
        value = low + (high - low) * k / 4
        y = y_of(value)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((6, y - 6), f"{value:.3g}", fill=(80, 80, 80), font=font)
    for step in range(0, steps, max(1, math.ceil(steps / 10))):
        x = x_of(step)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x - 3, bottom + 8), str(step), fill=(80, 80, 80), font=font)
    draw.text(((left + right) / 2 - 12, height - 16), "step", fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    for d in range(dims):
        color = _PALETTE[d % len(_PALETTE)]
        points = [(x_of(t), y_of(v)) for t, v in enumerate(values[:, d]) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points if len(points) <= 40 else ():
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
    shown = min(dims, 14)
    for d in range(shown):
        y = top + 14 * d
        draw.line([(right + 12, y + 6), (right + 30, y + 6)], fill=_PALETTE[d % len(_PALETTE)], width=3)
        draw.text((right + 36, y), labels[d][:26], fill="black", font=font)
    if dims > shown:
        draw.text((right + 12, top + 14 * shown), f"+{dims - shown} more", fill=(80, 80, 80), font=font)
    return image
