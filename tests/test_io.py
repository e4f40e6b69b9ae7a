"""cosmos3.io: round trips, hostile files, limits, the isolated decoder and streaming.

Tolerances (smooth synthetic content, default encoder settings): H.264 crf 18 and VP9 crf 30 within a mean absolute
error of 3 (of 255; most of it is 4:2:0 chroma subsampling), JPEG/WebP at quality 95 within 2, PNG and float WAV
exact, 16-bit WAV/FLAC within one quantization step, AAC within a mean absolute error of 0.01 on a 0.3-amplitude
tone.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import stat
import struct
import tempfile
import time
import zlib
from io import BytesIO
from types import SimpleNamespace

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")

from PIL import Image  # noqa: E402

from cosmos3 import io as cio  # noqa: E402
from cosmos3.io import MediaDecodeError, MediaLimits  # noqa: E402

T, H, W, FPS, SR = 12, 64, 96, 24, 16_000


def gradient_clip(t: int = T, h: int = H, w: int = W) -> np.ndarray:
    """A smooth gradient drifting over time: content lossy codecs reproduce well (noise would not)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = [
        np.stack([x / w * 200 + 4 * i, y / h * 200 + 3 * i, 128 + 60 * np.sin(x / 9 + y / 13 + i / 3)], -1)
        for i in range(t)
    ]
    return np.clip(np.stack(frames), 0, 255).round().astype(np.uint8)


def tone(seconds: float, channels: int = 2) -> np.ndarray:
    n = np.arange(round(seconds * SR)) / SR
    return np.stack([0.3 * np.sin(2 * np.pi * (440 + 220 * c) * n) for c in range(channels)]).astype(np.float32)


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    frames, audio = gradient_clip(), tone(T / FPS)
    cio.write_video(root / "clip.mp4", frames, FPS)
    cio.write_video(root / "muxed.mp4", frames, FPS, audio=audio, sample_rate=SR)
    full = cio.read_video(root / "clip.mp4", isolated=False)  # the reference for selections and streams
    return SimpleNamespace(frames=frames, audio=audio, mp4=root / "clip.mp4", muxed=root / "muxed.mp4", full=full)


# ---------------------------------------------------------------------------------------------- round trips


def test_mp4_round_trip(media):
    clip = cio.read_video(media.mp4)
    assert clip.frames.shape == (T, H, W, 3) and clip.frames.dtype == np.uint8
    assert clip.fps == FPS and clip.duration == pytest.approx(T / FPS) and clip.audio is None
    assert mae(clip.frames, media.frames) < 3.0
    np.testing.assert_array_equal(clip.frames, media.full.frames)  # isolated == in-process, bit for bit
    tensor = clip.to_torch()
    assert tensor.dtype == torch.uint8 and tensor.data_ptr() == clip.frames.ctypes.data


def test_webm_round_trip(tmp_path):
    frames = gradient_clip()
    cio.write_video(tmp_path / "clip.webm", torch.from_numpy(frames), FPS)  # torch input works too
    with av.open(str(tmp_path / "clip.webm")) as container:
        assert container.streams.video[0].codec_context.name in ("vp9", "vp8")
    clip = cio.read_video(tmp_path / "clip.webm")
    assert clip.frames.shape == frames.shape and clip.fps == FPS
    assert mae(clip.frames, frames) < 3.0


def test_probe_video(media):
    info = cio.probe_video(media.muxed)
    assert (info.width, info.height, info.fps, info.num_frames, info.has_audio) == (W, H, FPS, T, True)
    assert info.duration == pytest.approx(T / FPS, abs=0.05)


@pytest.mark.parametrize(
    ("kwargs", "index", "fps"),
    [
        ({"start_frame": 2, "end_frame": 10}, np.arange(2, 10), FPS),
        ({"fps": 12}, np.arange(0, T, 2), 12),
        ({"fps": 8}, np.arange(0, T, 3), 8),
        ({"fps": 48}, np.arange(T), FPS),  # never upsampled
        ({"max_frames": 5}, np.arange(5), FPS),
        ({"start_frame": 1, "fps": 12, "max_frames": 3}, np.array([1, 3, 5]), 12),
    ],
)
def test_frame_selection(media, kwargs, index, fps):
    clip = cio.read_video(media.mp4, isolated=False, **kwargs)
    np.testing.assert_array_equal(clip.frames, media.full.frames[index])
    assert clip.fps == fps


@pytest.mark.parametrize("isolated", [True, False])
def test_stream_chunks_concatenate_to_full_read(media, isolated):
    with cio.stream_video(media.mp4, chunk_frames=5, isolated=isolated) as stream:
        assert stream.fps == FPS and (stream.info.width, stream.info.height) == (W, H)
        chunks = list(stream)
    assert [len(c) for c in chunks] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), media.full.frames)
    sub = list(cio.stream_video(media.mp4, chunk_frames=4, fps=12, start_frame=1, isolated=isolated))
    np.testing.assert_array_equal(np.concatenate(sub), cio.read_video(media.mp4, fps=12, start_frame=1).frames)


def test_abandoned_stream_releases_its_worker(media):
    stream = cio.stream_video(media.mp4, chunk_frames=2)
    next(stream)
    worker = stream._worker
    stream.close()
    assert worker.proc.poll() is not None and not os.path.exists(worker.tmpdir)
    assert list(stream) == []


@pytest.mark.parametrize(("ext", "tolerance"), [(".png", 0.0), (".jpg", 2.0), (".webp", 2.0)])
def test_image_round_trip(tmp_path, ext, tolerance):
    image = gradient_clip(1, 48, 80)[0]
    cio.write_image(tmp_path / f"image{ext}", image)
    out = cio.read_image(tmp_path / f"image{ext}")
    assert out.shape == image.shape and out.dtype == np.uint8 and out.flags.writeable
    assert mae(out, image) <= tolerance


def test_image_alpha_is_dropped(tmp_path):
    Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(tmp_path / "alpha.png")
    image = cio.read_image(tmp_path / "alpha.png", isolated=False)
    np.testing.assert_array_equal(image, np.full((4, 5, 3), [10, 20, 30]))


@pytest.mark.parametrize(
    ("name", "subtype", "tolerance"),
    [
        ("float.wav", "FLOAT", 0.0),
        ("pcm16.wav", None, 2**-15),
        ("pcm24.flac", "PCM_24", 2**-23),
        ("pcm16.flac", None, 2**-15),
    ],
)
def test_wav_flac_round_trip(tmp_path, name, subtype, tolerance):
    audio = tone(0.25)
    cio.write_audio(tmp_path / name, audio, SR, subtype=subtype)
    clip = cio.read_audio(tmp_path / name)
    assert clip.sample_rate == SR and clip.samples.shape == audio.shape and clip.samples.dtype == np.float32
    assert np.abs(clip.samples - audio).max() <= tolerance


def test_aac_round_trip(tmp_path):
    audio = tone(1.0)
    cio.write_audio(tmp_path / "tone.m4a", audio, SR)
    clip = cio.read_audio(tmp_path / "tone.m4a")
    assert clip.sample_rate == SR and clip.samples.shape[0] == 2
    assert abs(clip.samples.shape[1] - audio.shape[1]) <= 1024  # one AAC frame
    n = min(clip.samples.shape[1], audio.shape[1])
    assert mae(clip.samples[:, :n], audio[:, :n]) < 0.01


def test_muxed_audio_and_video(media):
    clip = cio.read_video(media.muxed, with_audio=True)
    assert clip.frames.shape == (T, H, W, 3) and clip.sample_rate == SR and clip.audio.shape[0] == 2
    assert abs(clip.audio.shape[1] / SR - clip.duration) <= 1 / FPS
    n = min(clip.audio.shape[1], media.audio.shape[1])
    assert mae(clip.audio[:, :n], media.audio[:, :n]) < 0.01
    assert cio.read_audio(media.muxed).samples.shape == clip.audio.shape  # the audio track alone
    # a selection cuts the audio to its own time span
    tail = cio.read_video(media.muxed, start_frame=6, with_audio=True, isolated=False)
    assert tail.audio.shape[1] == pytest.approx(SR * 6 / FPS, abs=1)
    assert mae(tail.audio, media.audio[:, SR // 4 : SR // 4 + tail.audio.shape[1]]) < 0.01
    assert cio.read_video(media.mp4, with_audio=True).audio is None  # no audio track: None, not an empty array


# ---------------------------------------------------------------------------------------------- hostile files


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (CRC fixed up) claims `width x height`."""
    buffer = BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def y4m(width: int, height: int, frames: int = 0) -> bytes:
    """A YUV4MPEG2 stream: a plain-text header, then raw 4:2:0 frames (none: the header alone)."""
    header = f"YUV4MPEG2 W{width} H{height} F24:1 Ip A1:1 C420jpeg\n".encode()
    if not frames:
        return header + b"FRAME\n" + bytes(64)
    return header + (b"FRAME\n" + bytes(width * height * 3 // 2)) * frames


def faststart_mp4(path) -> bytes:
    """An mp4 with its index first, so that a cut in the middle leaves an index promising missing packets."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        noise = np.random.default_rng(0).integers(0, 256, (24, 96, 128, 3), dtype=np.uint8)
        for frame in noise:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path.read_bytes()


@pytest.mark.parametrize(
    ("name", "reader", "make"),
    [
        ("empty.mp4", "video", lambda m, p: b""),
        ("empty.png", "image", lambda m, p: b""),
        ("empty.wav", "audio", lambda m, p: b""),
        ("truncated.mp4", "video", lambda m, p: m.mp4.read_bytes()[: m.mp4.stat().st_size // 2]),
        ("truncated_faststart.mp4", "video", lambda m, p: faststart_mp4(p)[: int(p.stat().st_size * 0.9)]),
        ("garbage.mp4", "video", lambda m, p: np.random.default_rng(1).bytes(20_000)),
        ("wav_named.mp4", "video", lambda m, p: (cio.write_audio(p, tone(0.1), SR), p.read_bytes())[1]),
        ("text.png", "image", lambda m, p: b"this is not an image\n" * 50),
        ("truncated.png", "image", lambda m, p: (cio.write_image(p, gradient_clip(1)[0]), p.read_bytes()[:300])[1]),
        ("mp4_named.png", "image", lambda m, p: m.mp4.read_bytes()),
        ("text.wav", "audio", lambda m, p: b"RIFF\x10\x00\x00\x00WAVEjunk" + b"x" * 100),
        ("garbage.m4a", "audio", lambda m, p: np.random.default_rng(2).bytes(5_000)),
        ("huge_png.png", "image", lambda m, p: png_claiming(100_000, 100_000)),
        ("huge_y4m.y4m", "video", lambda m, p: y4m(100_000, 100_000)),
    ],
)
def test_hostile_file_raises(media, tmp_path, name, reader, make):
    path = tmp_path / name
    path.write_bytes(make(media, path))
    read = {"video": cio.read_video, "image": cio.read_image, "audio": cio.read_audio}[reader]
    started = time.monotonic()
    with pytest.raises(MediaDecodeError, match=name):
        read(path)
    assert time.monotonic() - started < 10
    with pytest.raises(MediaDecodeError):  # the same verdict in-process (none of these crash this FFmpeg)
        read(path, isolated=False)


@pytest.mark.parametrize("isolated", [True, False])
def test_absurd_dimensions_are_refused_from_the_header(tmp_path, isolated):
    (tmp_path / "wide.png").write_bytes(png_claiming(10_000, 10))  # under Pillow's bomb limit: ours must catch it
    (tmp_path / "big.y4m").write_bytes(y4m(16_000, 16_000))  # 384 MB per frame, only the header is present
    with pytest.raises(MediaDecodeError, match="10000x10, over max_width=8192"):
        cio.read_image(tmp_path / "wide.png", isolated=isolated)
    with pytest.raises(MediaDecodeError, match="16000x16000, over max_width=8192"):
        cio.read_video(tmp_path / "big.y4m", isolated=isolated)
    with pytest.raises(MediaDecodeError, match="max_pixels"):
        cio.read_image(tmp_path / "wide.png", limits=MediaLimits(max_width=20_000, max_pixels=50_000))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        cio.read_video(tmp_path / "nope.mp4")
    with pytest.raises(MediaDecodeError, match="not a regular file"):
        cio.read_image(tmp_path)


# ---------------------------------------------------------------------------------------------- isolation

HOOKS = """
import os, signal, time

def segfault(request, channel):
    os.kill(os.getpid(), signal.SIGSEGV)

def abort(request, channel):
    os.abort()

def hang(request, channel):
    time.sleep(60)
"""


@pytest.fixture
def worker_entry(tmp_path, monkeypatch):
    """Point the worker at a test function (a crash or a hang) instead of the real decoder."""
    (tmp_path / "cosmos3_io_hooks.py").write_text(HOOKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # to check the worker's directory is removed
    return lambda name: monkeypatch.setattr(cio, "_WORKER_ENTRY", f"cosmos3_io_hooks:{name}")


@pytest.mark.parametrize(("hook", "signame"), [("segfault", "SIGSEGV"), ("abort", "SIGABRT")])
def test_decoder_crash_is_reported(media, tmp_path, worker_entry, hook, signame):
    worker_entry(hook)
    with pytest.raises(MediaDecodeError, match=f"clip.mp4.*crashed with signal {signame}"):
        cio.read_video(media.mp4)
    assert not list(tmp_path.glob("cosmos3-io-*"))


def test_decoder_hang_is_killed_after_the_timeout(media, tmp_path, worker_entry):
    worker_entry("hang")
    started = time.monotonic()
    with pytest.raises(MediaDecodeError, match=r"timed out after 0.5 s"):
        cio.read_image(media.mp4, limits=MediaLimits(timeout_s=0.5))
    assert time.monotonic() - started < 5
    assert not list(tmp_path.glob("cosmos3-io-*"))


def test_tiny_timeout_on_a_real_decode(media):
    with pytest.raises(MediaDecodeError, match="timed out after 0.001 s"):
        cio.read_video(media.mp4, limits=MediaLimits(timeout_s=0.001))


def test_worker_killed_mid_stream(media):
    stream = cio.stream_video(media.mp4, chunk_frames=4)
    next(stream)
    os.kill(stream._worker.proc.pid, signal.SIGKILL)
    with pytest.raises(MediaDecodeError, match="SIGKILL"):
        list(stream)


# ---------------------------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("limits", "named"),
    [
        (MediaLimits(max_frames=5), "max_frames=5"),
        (MediaLimits(max_duration_s=0.25), "max_duration_s=0.25"),
        (MediaLimits(max_width=64), "max_width=64"),
        (MediaLimits(max_height=32), "max_height=32"),
        (MediaLimits(max_pixels=1000), "max_pixels=1000"),
        (MediaLimits(max_bytes=100), "max_bytes=100"),
        (MediaLimits(max_output_bytes=10_000), "max_output_bytes"),
    ],
)
def test_video_limits(media, limits, named):
    with pytest.raises(MediaDecodeError, match=named):
        cio.read_video(media.mp4, limits=limits)


def test_limits_hold_when_the_header_does_not_declare_them(tmp_path):
    # y4m declares neither a frame count nor a duration: the limits are enforced frame by frame
    (tmp_path / "small.y4m").write_bytes(y4m(16, 16, frames=10))
    assert cio.read_video(tmp_path / "small.y4m").frames.shape == (10, 16, 16, 3)
    with pytest.raises(MediaDecodeError, match="max_frames=4"):
        cio.read_video(tmp_path / "small.y4m", limits=MediaLimits(max_frames=4))
    with pytest.raises(MediaDecodeError, match="max_duration_s"):
        cio.read_video(tmp_path / "small.y4m", limits=MediaLimits(max_duration_s=0.2), isolated=False)
    with pytest.raises(MediaDecodeError, match="max_frames=3"):
        list(cio.stream_video(tmp_path / "small.y4m", chunk_frames=2, limits=MediaLimits(max_frames=3)))


def test_audio_limits(tmp_path, media):
    cio.write_audio(tmp_path / "a.wav", tone(0.1), SR)
    with pytest.raises(MediaDecodeError, match="max_audio_channels=1"):
        cio.read_audio(tmp_path / "a.wav", limits=MediaLimits(max_audio_channels=1))
    with pytest.raises(MediaDecodeError, match="max_audio_samples=100"):
        cio.read_audio(tmp_path / "a.wav", limits=MediaLimits(max_audio_samples=100))
    with pytest.raises(MediaDecodeError, match="max_audio_samples=100"):
        cio.read_audio(media.muxed, limits=MediaLimits(max_audio_samples=100), isolated=False)


def test_empty_selection_is_an_error(media):
    with pytest.raises(MediaDecodeError, match="no frames in \\[start_frame=100"):
        cio.read_video(media.mp4, start_frame=100)
    with pytest.raises(MediaDecodeError, match="no audio stream"):
        cio.read_audio(media.mp4)


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"start_frame": -1}, ValueError, "`start_frame` must be an int >= 0, got -1"),
        ({"start_frame": 1.5}, ValueError, "`start_frame`"),
        ({"end_frame": 0}, ValueError, "`end_frame`"),
        ({"start_frame": 5, "end_frame": 5}, ValueError, "`end_frame`=5 must be greater than `start_frame`=5"),
        ({"fps": 0}, ValueError, "`fps` must be a positive finite number, got 0"),
        ({"fps": float("nan")}, ValueError, "`fps`"),
        ({"max_frames": 0}, ValueError, "`max_frames`"),
        ({"with_audio": "yes"}, TypeError, "`with_audio`"),
        ({"limits": {"max_frames": 3}}, TypeError, "`limits` must be a MediaLimits"),
    ],
)
def test_read_video_arguments(media, kwargs, error, match):
    with pytest.raises(error, match=match):
        cio.read_video(media.mp4, **kwargs)


def test_other_reader_arguments(media):
    with pytest.raises(TypeError, match="`path` must be a str or os.PathLike, got int"):
        cio.read_image(123)
    with pytest.raises(ValueError, match="`chunk_frames`"):
        cio.stream_video(media.mp4, chunk_frames=0)
    with pytest.raises(ValueError, match="MediaLimits.max_frames must be a positive finite number, got 0"):
        MediaLimits(max_frames=0)
    with pytest.raises(ValueError, match="MediaLimits.timeout_s"):
        MediaLimits(timeout_s=float("inf"))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("x.mp4", gradient_clip(2).astype(np.float32), FPS), {}, TypeError, "`frames` must be uint8"),
        (("x.mp4", gradient_clip(2)[0], FPS), {}, ValueError, r"`frames` must have shape \[T, H, W, 3\]"),
        (("x.mp4", gradient_clip(2, 63, 96), FPS), {}, ValueError, "must be even"),
        (("x.avi", gradient_clip(2), FPS), {}, ValueError, "extension '.avi'; valid"),
        (("x.mp4", gradient_clip(2), -1), {}, ValueError, "`fps`"),
        (("x.mp4", gradient_clip(2), FPS), {"sample_rate": SR}, ValueError, "without `audio`"),
        (("x.mp4", gradient_clip(2), FPS), {"audio": np.zeros((2, 9), "i2"), "sample_rate": SR}, TypeError, "`audio`"),
        (("x.mp4", gradient_clip(2), FPS), {"audio": tone(0.1).T, "sample_rate": SR}, ValueError, "pass audio.T"),
        (("x.mp4", gradient_clip(2), FPS), {"codec": "nope"}, ValueError, "`codec`='nope'"),
        (("x.mp4", gradient_clip(2), FPS), {"options": {"crf": 18}}, TypeError, "`options`"),
        (("x.mp4", [1, 2], FPS), {}, TypeError, "`frames` must be a numpy array or a torch tensor, got list"),
    ],
)
def test_write_video_arguments(tmp_path, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        cio.write_video(tmp_path / args[0], *args[1:], **kwargs)
    assert not list(tmp_path.iterdir())


def test_write_audio_and_image_arguments(tmp_path):
    with pytest.raises(ValueError, match="`subtype`='MP3'"):
        cio.write_audio(tmp_path / "a.wav", tone(0.1), SR, subtype="MP3")
    with pytest.raises(ValueError, match="extension '.mp3'"):
        cio.write_audio(tmp_path / "a.mp3", tone(0.1), SR)
    with pytest.raises(ValueError, match="`sample_rate`=12345 is not supported by the aac encoder"):
        cio.write_audio(tmp_path / "a.m4a", tone(0.1), 12345)
    with pytest.raises(ValueError, match="`quality` must be in 1..100, got 101"):
        cio.write_image(tmp_path / "a.jpg", gradient_clip(1)[0], quality=101)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_writes_are_atomic(media, tmp_path):
    path = tmp_path / "clip.mp4"
    cio.write_video(path, media.frames, FPS)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="sample_rate"):  # fails inside the write, after the temp file exists
        cio.write_video(path, media.frames[:4], FPS, audio=tone(0.1), sample_rate=12345)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    old = os.umask(0o022)
    try:
        cio.write_image(tmp_path / "a.png", media.frames[0])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o644  # not mkstemp's 0600


# ------------------------------------------------------------------------------------- review regressions


def test_stream_dropped_without_close_releases_its_worker(media):
    """No reference cycle: dropping the last reference ends the decoder process, no garbage collection needed."""
    import gc

    gc.disable()
    try:
        stream = cio.stream_video(media.mp4, chunk_frames=2)
        next(stream)
        worker = stream._worker
        del stream
        deadline = time.monotonic() + 5
        while worker.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.proc.poll() is not None and not os.path.exists(worker.tmpdir)
    finally:
        gc.enable()


def test_playlists_cannot_pull_in_other_files(tmp_path):
    """An HLS playlist would make the demuxer open the files it names; only plain container demuxers are allowed."""
    secret = tmp_path / "private.mp4"
    cio.write_video(secret, gradient_clip(t=4), FPS)
    playlist = tmp_path / "upload.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{secret}\n#EXT-X-ENDLIST\n")
    for isolated in (True, False):
        with pytest.raises(MediaDecodeError, match="not a readable media file"):
            cio.read_video(playlist, isolated=isolated)


@pytest.mark.parametrize("ext", [".mkv", ".webm"])
def test_truncated_matroska_is_an_error_not_a_short_clip(tmp_path, ext):
    path = tmp_path / f"clip{ext}"
    cio.write_video(path, gradient_clip(t=24), FPS)
    data = path.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaDecodeError, match="truncated"):
        cio.read_video(cut)


def test_truncated_wav_is_an_error(tmp_path):
    path = tmp_path / "tone.wav"
    cio.write_audio(path, tone(1.0), SR)
    data = path.read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaDecodeError, match="truncated WAV"):
        cio.read_audio(tmp_path / "cut.wav")


# ---------------------------------------------------------------------------------------------- atomic file writes


class _Fspath:
    """An os.PathLike that is not a pathlib.Path, as third-party path types are."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __fspath__(self) -> str:
        return self.path


@contextlib.contextmanager
def _umask_set(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


WRITERS = {
    "bytes": (lambda p: cio.atomic_write_bytes(p, b"new \x00 bytes"), lambda p: p.read_bytes() == b"new \x00 bytes"),
    "text": (lambda p: cio.atomic_write_text(p, "new tëxt\n"), lambda p: p.read_text("utf-8") == "new tëxt\n"),
    "json": (lambda p: cio.atomic_write_json(p, {"a": [1, 2.5, None]}), lambda p: json.loads(p.read_text()) == {
        "a": [1, 2.5, None]}),
}


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize("wrap", [str, pathlib.Path, _Fspath], ids=["str", "Path", "PathLike"])
def test_atomic_writes_replace_the_file_whole(tmp_path, kind, wrap):
    write, check = WRITERS[kind]
    path = tmp_path / "out.dat"
    path.write_bytes(b"old")
    write(wrap(path))
    assert check(path) and os.listdir(tmp_path) == ["out.dat"]


@pytest.mark.parametrize("wrap", [str, pathlib.Path, _Fspath], ids=["str", "Path", "PathLike"])
def test_atomic_path_shows_the_file_only_after_the_body(tmp_path, wrap):
    path = tmp_path / "out.bin"
    with cio.atomic_path(wrap(path)) as tmp:
        assert isinstance(tmp, str) and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as f:
            f.write(b"half")
            assert not path.exists()  # a reader sees nothing until the body completes
            f.write(b" and the rest")
    assert path.read_bytes() == b"half and the rest" and os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [True, False], ids=["old file", "no file"])
def test_atomic_path_error_keeps_the_old_file_and_leaves_no_temp(tmp_path, error, existing):
    path = tmp_path / "out.json"
    if existing:
        path.write_text("old content")
    with pytest.raises(error), cio.atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half of the new con")
        raise error("died mid-write")
    assert os.listdir(tmp_path) == (["out.json"] if existing else [])
    if existing:
        assert path.read_text() == "old content"


def test_atomic_write_json_refuses_unserializable_without_touching_disk(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old content")
    with pytest.raises(TypeError, match="not JSON serializable"):
        cio.atomic_write_json(path, {"a": object()})
    with pytest.raises(ValueError, match="Out of range float"):
        cio.atomic_write_json(path, [float("nan")], allow_nan=False)
    assert path.read_text() == "old content" and os.listdir(tmp_path) == ["out.json"]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, mask, mode):
    with _umask_set(mask):
        cio.atomic_write_text(tmp_path / "a.txt", "x")
        with cio.atomic_path(tmp_path / "b.bin") as tmp, open(tmp, "wb") as f:
            f.write(b"x")
    for name in ("a.txt", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode  # not mkstemp's 0600


def test_atomic_write_json_format_and_round_trip(tmp_path):
    obj = {"b": [1, 2], "a": {"x": "ü", "y": 0.1, "z": True, "n": None}}
    cio.atomic_write_json(tmp_path / "a.json", obj)
    text = (tmp_path / "a.json").read_text()
    assert json.loads(text) == obj and text == json.dumps(obj, indent=2) + "\n"
    cio.atomic_write_json(tmp_path / "b.json", obj, indent=None, sort_keys=True)
    assert (tmp_path / "b.json").read_text() == json.dumps(obj, sort_keys=True) + "\n"


def test_atomic_write_fsync_flushes_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.exists(tmp_path / "b.json")) or real_fsync(fd))
    cio.atomic_write_json(tmp_path / "a.json", [1])
    assert synced == []
    cio.atomic_write_json(tmp_path / "b.json", [1], fsync=True)
    assert synced == [False] and json.loads((tmp_path / "b.json").read_text()) == [1]


def test_atomic_write_arguments(tmp_path):
    with pytest.raises(TypeError, match="`path` must be a str or os.PathLike, got int"):
        cio.atomic_write_text(3, "x")
    with pytest.raises(ValueError, match="`path` must name a file"):
        cio.atomic_write_bytes("", b"x")
    with pytest.raises(TypeError, match="`data` must be bytes, bytearray or memoryview, got str"):
        cio.atomic_write_bytes(tmp_path / "a", "text")
    with pytest.raises(TypeError, match="`text` must be a str, got bytes"):
        cio.atomic_write_text(tmp_path / "a", b"bytes")
    with pytest.raises(FileNotFoundError):  # the folder must exist: nothing is created on the way
        cio.atomic_write_text(tmp_path / "missing" / "a.txt", "x")
    assert not list(tmp_path.iterdir())
