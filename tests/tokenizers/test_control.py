"""Edge and blur control maps against OpenCV (the oracle Cosmos-Transfer calls at inference).

Canny and the two resizes must equal OpenCV bit for bit; the bilateral filter (and so the blur map) may differ by 1
in rare values because OpenCV accumulates with fused multiply-adds: measured about 1e-4 of the values, bounded here
at 1e-3.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cosmos3.tokenizers.control import (
    BILATERAL_D,
    BILATERAL_SIGMA_COLOR,
    BILATERAL_SIGMA_SPACE,
    BLUR_PRESETS,
    EDGE_PRESETS,
    _resize_area,
    _resize_linear,
    bilateral_filter,
    blur_map,
    canny,
    edge_map,
)

cv2 = pytest.importorskip("cv2")

MAX_OFF_BY_ONE = 1e-3  # the share of bilateral / blur values allowed to differ from OpenCV's (by 1 at most)


def scene(h, w, seed, shapes=12, noise=5.0):
    """A synthetic frame: two colour ramps, filled discs and rotated rectangles, Gaussian noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = (rng.uniform(0, 255, 3) * (xx / w)[..., None] + rng.uniform(0, 255, 3) * (yy / h)[..., None]) / 2
    for _ in range(shapes):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        if rng.random() < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(1, max(2, min(h, w) / 3)) ** 2
        else:
            a, b, t = rng.uniform(1, max(2, h / 3)), rng.uniform(1, max(2, w / 3)), rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
            v = (yy - cy) * np.cos(t) - (xx - cx) * np.sin(t)
            mask = (np.abs(u) < b) & (np.abs(v) < a)
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def smooth_noise(h, w, seed):
    """Noise upsampled 4x (bilinear): soft texture with edges in every direction."""
    small = np.random.default_rng(seed).integers(0, 256, (max(1, h // 4), max(1, w // 4), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def patterns(h, w):
    """Ramps and rings in the three channels: gradients at all angles, for the direction tests."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.hypot(yy - h / 2, xx - w / 2)
    chans = [127 + 120 * np.sin(r / 2.5), 127 + 120 * np.sin((xx + 2 * yy) / 3.0), (xx * 7 + yy * 3) % 256]
    return np.clip(np.stack(chans, -1), 0, 255).round().astype(np.uint8)


def ties(h, w):
    """Channels with equal gradient magnitudes at many pixels but different directions (OpenCV keeps the first)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = ((xx // 3 + yy // 4) % 2) * 120
    return np.stack([base, base.T[:h, :w] if h == w else base[::-1], base], -1).astype(np.uint8)


def images():
    rng = np.random.default_rng(7)
    yield "noise", rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    yield "smooth-noise", smooth_noise(96, 128, 1)
    yield "shapes", scene(97, 131, 2)
    yield "shapes-clean", scene(64, 80, 3, noise=0.0)
    yield "patterns", patterns(70, 90)
    yield "ties", ties(40, 40)
    yield "flat", np.full((16, 20, 3), 77, np.uint8)
    for h, w in [(1, 7), (7, 1), (1, 1), (2, 3), (3, 2), (5, 5)]:
        yield f"tiny-{h}x{w}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yield "gray", scene(50, 70, 4)[..., 0].copy()
    yield "one-channel", scene(50, 70, 5)[..., 1:2].copy()
    yield "four-channel", np.concatenate([scene(40, 60, 6), scene(40, 60, 7)[..., :1]], -1)


THRESHOLDS = sorted(set(EDGE_PRESETS.values())) + [(0, 0), (5, 10), (200, 100), (99.7, 150.2), (1000, 3000)]


@pytest.mark.parametrize("name,image", list(images()), ids=[n for n, _ in images()])
def test_canny_equals_cv2_bit_for_bit(name, image):
    for low, high in THRESHOLDS:
        expected = cv2.Canny(image, low, high)
        got = canny(image, low, high)
        assert got.dtype == np.uint8 and got.shape == expected.shape
        bad = int((got != expected).sum())
        assert bad == 0, f"{name} ({low}, {high}): {bad} of {expected.size} pixels differ from cv2.Canny"


def test_canny_batches_frames_independently():
    frames = np.stack([scene(33, 45, s) for s in range(3)])
    assert np.array_equal(canny(frames, 50, 100), np.stack([cv2.Canny(f, 50, 100) for f in frames]))


def test_canny_finds_edges_on_the_test_scenes():
    # the equality tests are only worth something where there are edges to find, weak and strong
    image = scene(97, 131, 2)
    assert 0.02 < (canny(image, 100, 200) > 0).mean() < 0.3
    assert (canny(image, 20, 50) > 0).sum() > (canny(image, 100, 200) > 0).sum()


def test_edge_map_is_the_upstream_recipe():
    """Cosmos-Transfer: `cv2.Canny(frame, t_lower, t_upper)` per RGB frame, expanded to 3 channels."""
    clip = np.stack([scene(48, 64, s) for s in range(3)])
    for preset in ("medium", "very_low", "high"):
        low, high = EDGE_PRESETS[preset]
        expected = np.stack([cv2.Canny(f, low, high) for f in clip])[..., None].repeat(3, -1)
        got = edge_map(clip, low=low, high=high)
        assert got.dtype == np.uint8 and got.shape == clip.shape
        assert np.array_equal(got, expected), preset
    assert np.array_equal(edge_map(clip), edge_map(clip, low=100, high=200))


def test_edge_map_accepts_pil_frames_and_tensors():
    clip = np.stack([scene(40, 56, s) for s in range(2)])
    expected = edge_map(clip)
    assert set(np.unique(expected)) <= {0, 255} and expected.any()
    assert np.array_equal(expected[..., 0], expected[..., 2])
    assert np.array_equal(edge_map([Image.fromarray(f) for f in clip]), expected)
    assert np.array_equal(edge_map(torch.from_numpy(clip).permute(0, 3, 1, 2)), expected)  # uint8 [T, 3, H, W]
    assert np.array_equal(edge_map(torch.from_numpy(clip).permute(0, 3, 1, 2) / 255.0), expected)  # [0, 1] floats
    gray = [Image.fromarray(f[..., 0], mode="L") for f in clip]  # converted to RGB as diffusers' docstring does
    assert np.array_equal(edge_map(gray)[..., 0], np.stack([cv2.Canny(f[..., :1].repeat(3, -1), 100, 200)
                                                             for f in clip]))


def test_resizes_equal_cv2_bit_for_bit():
    for h, w in [(48, 64), (49, 67), (37, 53), (30, 30), (10, 13)]:
        image = scene(h, w, h * w)
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        for f in (2, 3, 4):
            small = cv2.resize(image, (w // f, h // f), interpolation=cv2.INTER_AREA)
            got = _resize_area(x, h // f, w // f)[0].permute(1, 2, 0).numpy()
            assert np.array_equal(got, small), (h, w, f, "area")
            up = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
            got = _resize_linear(torch.from_numpy(small).permute(2, 0, 1)[None], h, w)[0].permute(1, 2, 0).numpy()
            assert np.array_equal(got, up), (h, w, f, "linear")


def _off_by_one(got, expected, what):
    assert got.shape == expected.shape and got.dtype == np.uint8, what
    diff = np.abs(got.astype(np.int16) - expected)
    share = float((diff > 0).mean())
    assert diff.max() <= 1 and share <= MAX_OFF_BY_ONE, f"{what}: max {diff.max()}, {share:.2e} of values differ"
    return share


@pytest.mark.parametrize("d,sigma_color,sigma_space", [(BILATERAL_D, BILATERAL_SIGMA_COLOR, BILATERAL_SIGMA_SPACE),
                                                       (9, 75, 75), (5, 30, 10), (0, 50, 3)])
def test_bilateral_filter_matches_cv2(d, sigma_color, sigma_space):
    rng = np.random.default_rng(d)
    cases = {"shapes": scene(60, 80, 1), "noise": rng.integers(0, 256, (31, 45, 3), dtype=np.uint8),
             "gray": scene(40, 50, 2)[..., 0].copy(), "smaller-than-window": scene(9, 11, 3),
             "one-pixel": rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)}
    for name, image in cases.items():
        # OpenCV's IPP build filters single-channel images with small windows in IPP, not with OpenCV's algorithm
        # (about half the values 1 apart); its own algorithm is what `setUseOptimized(False)` runs
        ipp = image.ndim == 2 and 0 < d <= 5
        try:
            cv2.setUseOptimized(not ipp)
            expected = cv2.bilateralFilter(image, d, sigma_color, sigma_space)
        finally:
            cv2.setUseOptimized(True)
        _off_by_one(bilateral_filter(image, d, sigma_color, sigma_space), expected, f"{name}, d={d}")


def test_bilateral_filter_reads_nonpositive_sigmas_as_one():
    image = scene(30, 40, 9)
    _off_by_one(bilateral_filter(image, 4, 0, -2), cv2.bilateralFilter(image, 4, 0, -2), "sigmas <= 0")
    assert np.array_equal(bilateral_filter(image, 4, 0, -2), bilateral_filter(image, 4, 1, 1))


def reference_blur(clip: np.ndarray, strength: str) -> np.ndarray:
    """Cosmos-Transfer 2.5's `AddControlInputBlur(use_random=False)` on `[T, H, W, 3]`, with cv2. torchvision's
    `resize(uint8, BICUBIC, antialias=True)` is this float32 `interpolate`, clamped and rounded."""
    if BLUR_PRESETS[strength] is None:
        return clip
    factor, downup = BLUR_PRESETS[strength]
    t, h, w, _ = clip.shape
    frames = []
    for frame in clip:
        x = cv2.resize(frame, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
        x = cv2.bilateralFilter(x, 30, 150, 100)
        frames.append(cv2.resize(x, (w, h), interpolation=cv2.INTER_LINEAR))
    x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)  # C, T, H, W as upstream

    def resize(x, size):
        y = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        return torch.round(y.clamp(min=0, max=255)).to(torch.uint8)

    return resize(resize(x, (int(h / downup), int(w / downup))), (h, w)).permute(1, 2, 3, 0).numpy()


@pytest.mark.parametrize("strength", list(BLUR_PRESETS))
def test_blur_map_matches_the_upstream_recipe(strength):
    clip = np.stack([scene(50, 71, s) for s in range(2)])
    got = blur_map(clip, strength=strength)
    _off_by_one(got, reference_blur(clip, strength), strength)
    if strength == "none":
        assert np.array_equal(got, clip)
    else:  # a blur: far smoother than the frames
        assert np.abs(np.diff(got.astype(int), axis=2)).mean() < 0.5 * np.abs(np.diff(clip.astype(int), axis=2)).mean()


def test_blur_map_default_is_medium_and_accepts_tensors():
    clip = np.stack([scene(40, 48, s) for s in range(2)])
    expected = blur_map(clip, strength="medium")
    assert np.array_equal(blur_map(clip), expected)
    assert np.array_equal(blur_map(torch.from_numpy(clip).permute(0, 3, 1, 2) / 255.0), expected)
    assert np.array_equal(blur_map([Image.fromarray(f) for f in clip]), expected)


def test_bad_inputs_are_refused():
    clip = np.zeros((2, 16, 16, 3), np.uint8)
    for fn in (edge_map, blur_map):
        with pytest.raises(TypeError, match="uint8"):
            fn(clip.astype(np.float32))
        with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
            fn(clip[..., :2])
        with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
            fn(clip[0])
        with pytest.raises(ValueError, match="empty"):
            fn(clip[:0])
        with pytest.raises(ValueError, match="empty"):
            fn(np.zeros((1, 0, 5, 3), np.uint8))
        with pytest.raises(ValueError, match="empty"):
            fn([])
        with pytest.raises(TypeError, match="PIL image"):
            fn([Image.new("RGB", (8, 8)), np.zeros((8, 8, 3), np.uint8)])
        with pytest.raises(ValueError, match="one size"):
            fn([Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))])
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fn(torch.full((1, 3, 16, 16), 1.5))
        with pytest.raises(ValueError, match="NaN"):
            fn(torch.full((1, 3, 16, 16), float("nan")))
        with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
            fn(torch.zeros(1, 16, 16, 3))
        with pytest.raises(TypeError, match="float in"):
            fn(torch.zeros(1, 3, 16, 16, dtype=torch.int32))
        with pytest.raises(TypeError, match="list of PIL images"):
            fn("clip.mp4")
    for low, high in [(-1, 10), (10, float("nan")), (True, 10), ("100", 200)]:
        with pytest.raises(ValueError, match="finite number >= 0"):
            edge_map(clip, low=low, high=high)
    with pytest.raises(ValueError, match="`strength` must be one of"):
        blur_map(clip, strength="extreme")
    with pytest.raises(ValueError, match="too small"):
        blur_map(np.zeros((1, 8, 40, 3), np.uint8), strength="medium")  # 8 / 10 rounds to no row
    with pytest.raises(TypeError, match="uint8"):
        canny(np.zeros((4, 4), np.int16), 1, 2)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        canny(np.zeros((1, 1, 4, 4, 3), np.uint8), 1, 2)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        bilateral_filter(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match="`d` must be an int"):
        bilateral_filter(np.zeros((4, 4, 3), np.uint8), d=3.5)
    with pytest.raises(ValueError, match="must be positive"):
        bilateral_filter(np.zeros((4, 4, 3), np.uint8), d=0, sigma_space=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    clip = np.stack([scene(64, 96, s) for s in range(2)])
    assert np.array_equal(edge_map(clip, device="cuda"), edge_map(clip))
    _off_by_one(blur_map(clip, device="cuda"), reference_blur(clip, "medium"), "cuda medium")
