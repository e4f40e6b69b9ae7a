"""Control maps: the edge and blur hints that Cosmos-Transfer computes from the input video at inference.

Cosmos-Transfer 2.5 (`AddControlInputEdge` / `AddControlInputBlur` with `use_random=False`, reached through
`get_augmentor_for_eval` from its inference pipeline) computes these two hints on the fly from the uint8 RGB
frames; diffusers computes none. This module reproduces them without OpenCV:

* `edge_map`: `cv2.Canny(frame, low, high)` on each 3-channel RGB frame (no grayscale conversion, no
  presmoothing), the map repeated in 3 channels. Thresholds by preset (`EDGE_PRESETS`); "medium" (100, 200) is the
  default. `canny` equals OpenCV's bit for bit: 3x3 Sobel with replicated borders, per pixel the channel of the
  largest L1 magnitude (first channel on ties), L1 magnitude, OpenCV's fixed-point non-maximum suppression,
  `> low` candidates, `> high` seeds, 8-connected hysteresis.
* `blur_map`: `cv2.resize` down by the preset's blur factor (INTER_AREA), `cv2.bilateralFilter(d=30,
  sigmaColor=150, sigmaSpace=100)`, `cv2.resize` back up (INTER_LINEAR), then torchvision's antialiased bicubic
  resize down by the preset's down-up factor and back to the frame size (uint8 after every step, as upstream).
  The resizes are OpenCV's uint8 INTER_AREA and fixed-point INTER_LINEAR, bit for bit. The bilateral filter is
  OpenCV's algorithm (circular window of radius d // 2, L1 colour distance over the channels, float32 weights
  from the same tables, reflect-101 borders) but accumulates in another order and without OpenCV's fused
  multiply-adds, so about 1 value in 10^4 differs by 1 (tests/tokenizers/test_control.py measures it).

Frames are uint8 `[T, H, W, 3]` RGB arrays, lists of PIL images, or `[T, 3, H, W]` tensors (float in [0, 1] or
uint8); both maps come back as uint8 `[T, H, W, 3]` numpy arrays, ready for `control_videos`. The work runs in
torch on `device` (default: the input tensor's device, else the CPU).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# Cosmos-Transfer's inference presets (`preset_edge_threshold`): (low, high) Canny thresholds.
EDGE_PRESETS: dict[str, tuple[int, int]] = {
    "none": (20, 50),
    "very_low": (20, 50),
    "low": (50, 100),
    "medium": (100, 200),
    "high": (200, 300),
    "very_high": (300, 400),
}

# Cosmos-Transfer 2.5's inference presets (`preset_blur_strength`): (blur downscale factor, down-up factor).
# "none" returns the frames unchanged, as upstream does.
BLUR_PRESETS: dict[str, tuple[int, int] | None] = {
    "none": None,
    "very_low": (1, 4),
    "low": (4, 4),
    "medium": (2, 10),
    "high": (1, 16),
    "very_high": (4, 16),
}

# The bilateral filter upstream applies at inference, whatever the preset (`BilateralFilterConfig` defaults).
BILATERAL_D, BILATERAL_SIGMA_COLOR, BILATERAL_SIGMA_SPACE = 30, 150.0, 100.0

# Pixels per pass (whole frames, at least one): bound the working buffers for long or large clips, about 60 bytes a
# pixel for the edges and 40 bytes a (downscaled) pixel for the bilateral filter.
_EDGE_PIXELS_PER_CHUNK = 1 << 22
_BLUR_PIXELS_PER_CHUNK = 1 << 21

_TG22 = 13573  # round(tan(22.5 deg) * 2**15): OpenCV's fixed-point direction test
_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: linear resize weights are multiples of 1/2048


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _pick_device(frames, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return frames.device if isinstance(frames, Tensor) else torch.device("cpu")


def _clip_to_uint8(frames, name: str, device: torch.device) -> Tensor:
    """Any accepted clip as a uint8 `[T, H, W, 3]` tensor on `device`."""
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise TypeError(f"`{name}` as an array must be uint8 [T, H, W, 3] RGB, got dtype {frames.dtype}.")
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"`{name}` as an array must be [T, H, W, 3] RGB, got shape {frames.shape}.")
        clip = torch.from_numpy(np.ascontiguousarray(frames) if frames.flags.writeable else frames.copy())
    elif isinstance(frames, Tensor):
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"`{name}` as a tensor must be [T, 3, H, W], got shape {tuple(frames.shape)}.")
        if frames.dtype == torch.uint8:
            clip = frames.permute(0, 2, 3, 1)
        elif frames.is_floating_point():
            if frames.numel() and not bool(torch.isfinite(frames).all()):
                raise ValueError(f"`{name}` has NaN or infinite values; give frames in [0, 1].")
            if frames.numel() and (float(frames.min()) < 0 or float(frames.max()) > 1):
                raise ValueError(f"`{name}` must be in [0, 1], got values in [{float(frames.min()):.4g}, "
                                 f"{float(frames.max()):.4g}].")
            clip = (frames.to(device, torch.float32) * 255).round_().to(torch.uint8).permute(0, 2, 3, 1)
        else:
            raise TypeError(f"`{name}` as a tensor must be float in [0, 1] or uint8, got dtype {frames.dtype}.")
    elif isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError(f"`{name}` is empty: give at least one frame.")
        arrays = []
        for i, frame in enumerate(frames):
            if not isinstance(frame, Image.Image):
                raise TypeError(f"`{name}[{i}]` must be a PIL image, got {type(frame).__name__}.")
            arrays.append(np.asarray(frame if frame.mode == "RGB" else frame.convert("RGB")))
            if arrays[-1].shape != arrays[0].shape:
                raise ValueError(f"`{name}` frames must share one size, got {arrays[0].shape[1::-1]} (frame 0) and "
                                 f"{arrays[-1].shape[1::-1]} (frame {i}).")
        clip = torch.from_numpy(np.stack(arrays))
    else:
        raise TypeError(f"`{name}` must be a uint8 [T, H, W, 3] array, a list of PIL images or a [T, 3, H, W] "
                        f"tensor, got {type(frames).__name__}.")
    if 0 in clip.shape:
        raise ValueError(f"`{name}` is empty: got {clip.shape[0]} frames of {clip.shape[1]}x{clip.shape[2]} pixels.")
    return clip.to(device).contiguous()


def _image_to_uint8(image, name: str, device: torch.device) -> tuple[Tensor, int]:
    """A uint8 `[H, W]`, `[H, W, C]` or `[N, H, W, C]` array or tensor as `[N, H, W, C]`, and its `ndim`."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image) if image.flags.writeable else image.copy())
    if not isinstance(image, Tensor):
        raise TypeError(f"`{name}` must be a uint8 numpy array or tensor, got {type(image).__name__}.")
    if image.dtype != torch.uint8:
        raise TypeError(f"`{name}` must be uint8 (0..255), got dtype {image.dtype}.")
    if image.ndim not in (2, 3, 4):
        raise ValueError(f"`{name}` must be [H, W], [H, W, C] or [N, H, W, C], got shape {tuple(image.shape)}.")
    ndim = image.ndim
    image = image[None, ..., None] if ndim == 2 else image if ndim == 4 else image[None]
    if 0 in image.shape:
        raise ValueError(f"`{name}` is empty: got shape {tuple(image.shape)}.")
    return image.to(device).contiguous(), ndim


def _check_thresholds(low, high) -> tuple[int, int]:
    for name, value in (("low", low), ("high", high)):
        if not _is_number(value) or value < 0:
            raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
    low, high = sorted((low, high))  # as OpenCV: swapped thresholds are put in order
    # magnitudes are at most 2040: any threshold above that keeps no edge, so capping keeps int16 comparisons valid
    return min(math.floor(low), 32767), min(math.floor(high), 32767)


# ------------------------------------------------------------------------------------------------------------------
# Canny


def _replicate_pad(x: Tensor, dim_h: int, dim_w: int) -> Tensor:
    """`x` with one replicated pixel around (any dtype: torch's replicate padding is float-only)."""
    x = torch.cat([x.narrow(dim_h, 0, 1), x, x.narrow(dim_h, x.shape[dim_h] - 1, 1)], dim=dim_h)
    return torch.cat([x.narrow(dim_w, 0, 1), x, x.narrow(dim_w, x.shape[dim_w] - 1, 1)], dim=dim_w)


def _sobel(x: Tensor) -> tuple[Tensor, Tensor]:
    """OpenCV's 3x3 Sobel (dx, dy) of `[N, H, W, C]` with replicated borders, int16 (|d| <= 4 * 255)."""
    p = _replicate_pad(x.to(torch.int16), 1, 2)
    rows = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]  # [1, 2, 1] along x
    diff = p[:, :, 2:] - p[:, :, :-2]  # [-1, 0, 1] along x
    dx = diff[:, :-2] + 2 * diff[:, 1:-1] + diff[:, 2:]
    dy = rows[:, 2:] - rows[:, :-2]
    return dx, dy


def _hysteresis(candidate: Tensor, strong: Tensor) -> Tensor:
    """The candidates 8-connected to a strong pixel, `[N, H, W]` bool.

    Connected components over the candidate pixels only (a few percent of the frame): labels start as each
    pixel's own index, every edge hooks the larger label onto the smaller (scatter-min), and pointer jumping
    flattens the label trees, which converges in a few rounds even for long thin edges (plain dilation would need
    as many rounds as the longest edge has pixels)."""
    n, h, w = candidate.shape
    padded = F.pad(candidate, (1, 1, 1, 1))  # a non-candidate frame around every image: no wrap, no cross-frame link
    flat = padded.reshape(-1)
    where = flat.nonzero().squeeze(1)
    m = where.numel()
    if m == 0:
        return candidate
    ids = torch.full((flat.numel(),), -1, dtype=torch.int64, device=flat.device)
    ids[where] = torch.arange(m, device=flat.device)
    stride = w + 2
    src, dst = [], []
    for step in (1, stride - 1, stride, stride + 1):  # E, SW, S, SE: each undirected link once
        other = ids[where + step]
        keep = other >= 0
        src.append(torch.arange(m, device=flat.device)[keep])
        dst.append(other[keep])
    src, dst = torch.cat(src), torch.cat(dst)
    labels = torch.arange(m, device=flat.device)
    while src.numel():
        ls, ld = labels[src], labels[dst]
        labels.scatter_reduce_(0, torch.maximum(ls, ld), torch.minimum(ls, ld), reduce="amin")
        while True:
            jumped = labels[labels]
            if torch.equal(jumped, labels):
                break
            labels = jumped
        differ = labels[src] != labels[dst]
        if not bool(differ.any()):
            break
        src, dst = src[differ], dst[differ]  # links already inside one component stay so
    seeded = torch.zeros(m, dtype=torch.bool, device=flat.device)
    seeded[labels[F.pad(strong, (1, 1, 1, 1)).reshape(-1)[where]]] = True
    out = torch.zeros_like(flat)
    out[where] = seeded[labels]
    return out.view(n, h + 2, w + 2)[:, 1:-1, 1:-1]


def _canny(x: Tensor, low: int, high: int) -> Tensor:
    """`cv2.Canny(x, low, high)` (L1, aperture 3) of uint8 `[N, H, W, C]`: bool `[N, H, W]`."""
    dx, dy = _sobel(x)  # [N, H, W, C]
    mags = dx.abs() + dy.abs()
    # per pixel the channel of the largest magnitude; a later channel wins only if strictly larger, as in OpenCV
    mag, gx, gy = mags[..., 0], dx[..., 0], dy[..., 0]
    for c in range(1, mags.shape[-1]):
        larger = mags[..., c] > mag
        mag = torch.where(larger, mags[..., c], mag)
        gx, gy = torch.where(larger, dx[..., c], gx), torch.where(larger, dy[..., c], gy)
    dx, dy = gx.to(torch.int32), gy.to(torch.int32)
    p = F.pad(mag, (1, 1, 1, 1))  # OpenCV compares the border pixels against zero magnitudes
    left, right, up, down = p[:, 1:-1, :-2], p[:, 1:-1, 2:], p[:, :-2, 1:-1], p[:, 2:, 1:-1]
    x_abs, y_abs = dx.abs(), dy.abs() << 15
    tg22x = x_abs * _TG22
    tg67x = tg22x + (x_abs << 16)
    horizontal = y_abs < tg22x
    vertical = ~horizontal & (y_abs > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0  # gradient along the main diagonal: compare up-left with down-right
    peak = (horizontal & (mag > left) & (mag >= right)) | (vertical & (mag > up) & (mag >= down))
    peak |= diagonal & same_sign & (mag > p[:, :-2, :-2]) & (mag > p[:, 2:, 2:])
    peak |= diagonal & ~same_sign & (mag > p[:, :-2, 2:]) & (mag > p[:, 2:, :-2])
    candidate = peak & (mag > low)
    return _hysteresis(candidate, candidate & (mag > high))


def canny(image, low, high, *, device=None) -> np.ndarray:
    """`cv2.Canny(image, low, high)` bit for bit (aperture 3, L1 gradient), without OpenCV.

    `image`: uint8 `[H, W]`, `[H, W, C]` (the channel of the largest gradient per pixel, as OpenCV) or a batch
    `[N, H, W, C]`. Returns uint8 0/255 `[H, W]` (or `[N, H, W]`). Swapped thresholds are put in order."""
    low, high = _check_thresholds(low, high)
    dev = _pick_device(image, device)
    x, ndim = _image_to_uint8(image, "image", dev)
    edges = (_canny(x, low, high).to(torch.uint8) * 255).cpu().numpy()
    return edges if ndim == 4 else edges[0]


def edge_map(frames, *, low=EDGE_PRESETS["medium"][0], high=EDGE_PRESETS["medium"][1], device=None) -> np.ndarray:
    """The edge control clip as Cosmos-Transfer computes it at inference: `cv2.Canny(frame, low, high)` on each
    RGB frame, repeated in 3 channels. Defaults: the "medium" preset (100, 200); other presets in `EDGE_PRESETS`.

    `frames`: uint8 `[T, H, W, 3]` RGB, a list of PIL images (converted to RGB) or a `[T, 3, H, W]` tensor (float in
    [0, 1], rounded to 0..255, or uint8). Returns uint8 0/255 `[T, H, W, 3]`."""
    low, high = _check_thresholds(low, high)
    dev = _pick_device(frames, device)
    clip = _clip_to_uint8(frames, "frames", dev)
    t, h, w, _ = clip.shape
    chunk = max(1, _EDGE_PIXELS_PER_CHUNK // (h * w))
    out = np.empty((t, h, w, 3), dtype=np.uint8)
    for start in range(0, t, chunk):
        edges = _canny(clip[start : start + chunk], low, high).to(torch.uint8) * 255
        out[start : start + chunk] = edges[..., None].expand(-1, -1, -1, 3).cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------------------------------
# Bilateral filter


def _reflect101(n: int, pad: int, device) -> Tensor:
    """Source indices of `n` samples padded by `pad` on each side with OpenCV's BORDER_REFLECT_101 (`gfedcb|abcdefgh|
    gfedcba`), repeated for pads longer than the side, as `copyMakeBorder` does."""
    p = np.arange(-pad, n + pad)
    if n == 1:
        return torch.zeros(p.size, dtype=torch.int64, device=device)
    period = 2 * (n - 1)
    p = np.mod(p, period)
    p = np.where(p >= n, period - p, p)
    return torch.from_numpy(p).to(device)


def _bilateral_tables(d: int, sigma_color: float, sigma_space: float, channels: int):
    """OpenCV's radius, colour weights (by L1 distance) and space offsets / weights, in its order."""
    sigma_color = sigma_color if sigma_color > 0 else 1.0
    sigma_space = sigma_space if sigma_space > 0 else 1.0
    radius = d // 2 if d > 0 else int(np.rint(sigma_space * 1.5))
    radius = max(radius, 1)
    color = np.exp(np.arange(256 * channels, dtype=np.float64) ** 2 * (-0.5 / sigma_color**2)).astype(np.float32)
    offsets, weights = [], []
    for i in range(-radius, radius + 1):
        for j in range(-radius, radius + 1):
            r = math.sqrt(i * i + j * j)
            if r <= radius:
                offsets.append((i, j))
                weights.append(np.float32(math.exp(r * r * (-0.5 / sigma_space**2))))
    return radius, color, offsets, weights


def _bilateral(x: Tensor, d: int, sigma_color: float, sigma_space: float) -> Tensor:
    """`cv2.bilateralFilter(x, d, sigma_color, sigma_space)` of uint8 `[N, H, W, C]` (C 1 or 3), same layout.

    The window's offsets come in pairs (o, -o) with equal space weights, and the colour distance of p to p + o is
    that of p + o to p: one weight map over the window's bounding box serves both offsets, halving the work."""
    n, h, w, c = x.shape
    radius, color, offsets, space = _bilateral_tables(d, sigma_color, sigma_space, c)
    ys, xs = _reflect101(h, radius, x.device), _reflect101(w, radius, x.device)
    padded = x.permute(0, 3, 1, 2)[:, :, ys][:, :, :, xs].to(torch.int16)  # [N, C, H + 2r, W + 2r]
    values = padded.float()
    color_t = torch.from_numpy(color).to(x.device)
    acc = torch.zeros(n, c, h, w, dtype=torch.float32, device=x.device)
    wsum = torch.zeros(n, h, w, dtype=torch.float32, device=x.device)
    r = radius
    half = len(offsets) // 2  # offsets[k] == -offsets[-1 - k]; the middle one is (0, 0)
    for k in range(half + 1):
        i, j = offsets[k]  # i <= 0; the pair is (i, j) and (-i, -j)
        table = color_t * space[k]  # one float32 product per weight, as OpenCV's space * colour
        if k == half:  # the centre: distance 0
            wsum += table[0]
            acc += values[:, :, r : r + h, r : r + w] * table[0]
            break
        # w(q) = f(|P[q + o] - P[q]|) over the q that either offset needs: +o at p uses w(p), -o uses w(p - o)
        c0, c1 = r + min(0, -j), r + w + max(0, -j)
        base = padded[:, :, r : r + h - i, c0:c1]
        moved = padded[:, :, r + i : r + h, c0 + j : c1 + j]
        dist = (moved - base).abs_().sum(1, dtype=torch.int16)  # L1 over channels, <= 765
        wmap = table.index_select(0, dist.view(-1).long()).view(dist.shape)  # [N, h + |i|, w + |j|]
        for sign, (qy, qx) in ((1, (0, r - c0)), (-1, (-i, r - j - c0))):
            part = wmap[:, qy : qy + h, qx : qx + w]
            wsum += part
            acc.addcmul_(values[:, :, r + sign * i : r + sign * i + h, r + sign * j : r + sign * j + w], part[:, None])
    return (acc / wsum[:, None]).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def bilateral_filter(image, d: int = BILATERAL_D, sigma_color: float = BILATERAL_SIGMA_COLOR,
                     sigma_space: float = BILATERAL_SIGMA_SPACE, *, device=None) -> np.ndarray:
    """`cv2.bilateralFilter(image, d, sigma_color, sigma_space)` (reflect-101 borders) without OpenCV.

    `image`: uint8 `[H, W]`, `[H, W, C]` or `[N, H, W, C]` with C 1 or 3. Defaults: the filter Cosmos-Transfer 2.5
    applies at inference (d 30, sigma_color 150, sigma_space 100). Equal to OpenCV's own algorithm but for rare
    values 1 apart (its fused multiply-adds round differently). OpenCV builds with Intel IPP hand single-channel
    images with d <= 5 to IPP, which rounds otherwise (about half the values 1 apart)."""
    if not isinstance(d, numbers.Integral) or isinstance(d, bool):
        raise TypeError(f"`d` must be an int, got {type(d).__name__}.")
    for name, value in (("sigma_color", sigma_color), ("sigma_space", sigma_space)):
        if not _is_number(value):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    if d <= 0 and sigma_space <= 0:
        raise ValueError(f"`d` ({d}) or `sigma_space` ({sigma_space}) must be positive to size the window.")
    dev = _pick_device(image, device)
    x, ndim = _image_to_uint8(image, "image", dev)
    if x.shape[-1] not in (1, 3):
        raise ValueError(f"`image` must have 1 or 3 channels (as OpenCV), got {x.shape[-1]}.")
    chunk = max(1, _BLUR_PIXELS_PER_CHUNK // (x.shape[1] * x.shape[2]))
    out = np.concatenate([_bilateral(x[s : s + chunk], int(d), float(sigma_color), float(sigma_space)).cpu().numpy()
                          for s in range(0, x.shape[0], chunk)])
    return out if ndim == 4 else out[0] if ndim == 3 else out[0, ..., 0]


# ------------------------------------------------------------------------------------------------------------------
# OpenCV's uint8 resizes


def _area_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA taps along one axis for a downscale: `[dst, K]` source indices and float32 weights in
    its order (increasing source index), padded with zero weights."""
    scale = 1.0 / (dst / src)
    taps: list[list[tuple[int, np.float32]]] = []
    for d in range(dst):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, src - f1)
        s1, s2 = math.ceil(f1), math.floor(f2)
        s2 = min(s2, src - 1)
        s1 = min(s1, s2)
        row = []
        if s1 - f1 > 1e-3:
            row.append((s1 - 1, np.float32((s1 - f1) / cell)))
        row += [(s, np.float32(1.0 / cell)) for s in range(s1, s2)]
        if f2 - s2 > 1e-3:
            row.append((s2, np.float32(min(min(f2 - s2, 1.0), cell) / cell)))
        taps.append(row)
    k = max(len(row) for row in taps)
    index = np.zeros((dst, k), dtype=np.int64)
    weight = np.zeros((dst, k), dtype=np.float32)
    for d, row in enumerate(taps):
        for t, (s, wt) in enumerate(row):
            index[d, t], weight[d, t] = s, wt
    return index, weight


def _resize_area(x: Tensor, h: int, w: int) -> Tensor:
    """`cv2.resize(x, (w, h), interpolation=cv2.INTER_AREA)` of uint8 `[N, C, H, W]` for a downscale.

    Whole-block scales sum integers (rounded half up for 2x2, OpenCV's vector path, else to even); other scales
    accumulate float32 products in OpenCV's order (columns, then rows), so both are bit-exact."""
    height, width = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    scale_y, scale_x = 1.0 / (h / height), 1.0 / (w / width)
    ky, kx = round(scale_y), round(scale_x)
    if abs(scale_y - ky) < 2.220446049250313e-16 and abs(scale_x - kx) < 2.220446049250313e-16:
        total = x.view(*x.shape[:-2], h, ky, w, kx).sum((-3, -1), dtype=torch.int32)
        if (ky, kx) == (2, 2):
            return ((total + 2) >> 2).to(torch.uint8)
        return (total.float() * np.float32(1.0 / (ky * kx))).round_().clamp_(0, 255).to(torch.uint8)
    v = x.float()
    ix, wx = (torch.from_numpy(a).to(x.device) for a in _area_taps(width, w))
    rows = v[..., ix[:, 0]] * wx[:, 0]
    for t in range(1, ix.shape[1]):
        rows = rows + v[..., ix[:, t]] * wx[:, t]  # a separate product and sum per tap, as OpenCV's float code
    iy, wy = (torch.from_numpy(a).to(x.device) for a in _area_taps(height, h))
    out = rows[..., iy[:, 0], :] * wy[:, 0, None]
    for t in range(1, iy.shape[1]):
        out = out + rows[..., iy[:, t], :] * wy[:, t, None]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _linear_taps(src: int, dst: int, clamp_weights: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR first source index and fixed-point weights (each rounded, about 2048 in all) along one
    axis. Along x OpenCV moves the border taps onto the edge pixel with weight 2048; along y it keeps the weights
    and reads the edge row twice (`clamp_weights` False)."""
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = f - s.astype(np.float32)
    if clamp_weights:
        low, high = s < 0, s >= src - 1
        f[low | high] = 0
        s[low] = 0
        s[high] = src - 1
    a0 = np.rint((np.float32(1) - f) * (1 << _COEF_BITS)).astype(np.int64)
    a1 = np.rint(f * (1 << _COEF_BITS)).astype(np.int64)
    return s, a0, a1


def _resize_linear(x: Tensor, h: int, w: int) -> Tensor:
    """`cv2.resize(x, (w, h), interpolation=cv2.INTER_LINEAR)` of uint8 `[N, C, H, W]` for an upscale, in
    OpenCV's fixed point: 11-bit weights per axis, rows first, then its vector path's rounding of the columns."""
    height, width = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    dev = x.device
    sx, ax0, ax1 = (torch.from_numpy(a).to(dev) for a in _linear_taps(width, w, True))
    sy, ay0, ay1 = (torch.from_numpy(a).to(dev) for a in _linear_taps(height, h, False))
    v = x.to(torch.int32)
    nx = (sx + 1).clamp_(max=width - 1)  # the second tap has weight 0 where it would fall outside
    rows = v[..., sx] * ax0.int() + v[..., nx] * ax1.int()  # [N, C, H, w], values * 2048
    y0, y1 = sy.clamp(0, height - 1), (sy + 1).clamp_(0, height - 1)
    r0, r1 = rows[..., y0, :] >> 4, rows[..., y1, :] >> 4
    out = ((r0 * ay0.int()[:, None]) >> 16) + ((r1 * ay1.int()[:, None]) >> 16)
    return ((out + 2) >> 2).clamp_(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------------------------------
# Blur control


def _bicubic(x: Tensor, h: int, w: int) -> Tensor:
    """torchvision's `F.resize(x, (h, w), BICUBIC, antialias=True)` of a uint8 tensor: float32, clamped, rounded."""
    out = F.interpolate(x.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 255).round_().to(torch.uint8)


def blur_map(frames, *, strength: str = "medium", device=None) -> np.ndarray:
    """The blur ("vis") control clip as Cosmos-Transfer 2.5 computes it at inference, for a `strength` preset of
    `BLUR_PRESETS` ("medium" by default; "none" gives the frames back):

    1. `cv2.resize` by 1 / blur factor (INTER_AREA; `W // f, H // f`),
    2. `cv2.bilateralFilter(d=30, sigmaColor=150, sigmaSpace=100)`,
    3. `cv2.resize` back to `W x H` (INTER_LINEAR),
    4. torchvision's antialiased bicubic resize to `int(H / s) x int(W / s)` and back to `H x W`, s the down-up
       factor.

    Steps 1 and 3 are bit-exact with OpenCV, step 4 is the same torch computation as torchvision's, and step 2
    differs from OpenCV only in rare values 1 apart (its fused multiply-adds); each step returns uint8 as upstream.

    `frames`: uint8 `[T, H, W, 3]` RGB, a list of PIL images (converted to RGB) or a `[T, 3, H, W]` tensor (float in
    [0, 1], rounded to 0..255, or uint8). Returns uint8 `[T, H, W, 3]`."""
    if not isinstance(strength, str) or strength not in BLUR_PRESETS:
        raise ValueError(f"`strength` must be one of {sorted(BLUR_PRESETS)}, got {strength!r}.")
    dev = _pick_device(frames, device)
    clip = _clip_to_uint8(frames, "frames", dev)
    preset = BLUR_PRESETS[strength]
    if preset is None:
        return clip.cpu().numpy()
    factor, downup = preset
    t, h, w, _ = clip.shape
    small = (h // factor, w // factor)
    if min(small) < 1 or int(h / downup) < 1 or int(w / downup) < 1:
        raise ValueError(f"`frames` of {h}x{w} are too small for the {strength!r} blur (it shrinks them by "
                         f"{factor} and by {downup}): give frames of at least {max(factor, downup)} pixels a side.")
    chunk = max(1, _BLUR_PIXELS_PER_CHUNK // (small[0] * small[1]))
    out = []
    for start in range(0, t, chunk):
        x = clip[start : start + chunk].permute(0, 3, 1, 2)  # [n, 3, H, W]
        x = _resize_area(x, *small)
        x = _bilateral(x.permute(0, 2, 3, 1), BILATERAL_D, BILATERAL_SIGMA_COLOR, BILATERAL_SIGMA_SPACE)
        x = _resize_linear(x.permute(0, 3, 1, 2), h, w)
        x = _bicubic(_bicubic(x, int(h / downup), int(w / downup)), h, w)
        out.append(x.permute(0, 2, 3, 1).cpu())
    return torch.cat(out).numpy()
