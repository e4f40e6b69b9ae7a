"""Safe media reading and writing: video (PyAV), images (Pillow), audio (soundfile, PyAV).

    clip = read_video("in.mp4", fps=12, max_frames=96)            # VideoClip: frames [T, H, W, 3] uint8 RGB, fps
    with stream_video("long.mp4", chunk_frames=64) as stream:      # bounded memory: one chunk at a time
        for chunk in stream: ...
    write_video("out.mp4", clip.frames, clip.fps, audio=wave, sample_rate=48000)   # h264 + aac, atomic

Notable choices:

* **Untrusted by default.** Every reader decodes in a child process: a fresh interpreter running this file
  (`python -P .../cosmos3/io.py --worker`), which imports only numpy and the decoder. Not `multiprocessing`: its
  spawn and forkserver children re-import the caller's `__main__` (unguarded scripts would recurse) and the whole
  `cosmos3` package (torch, ~3 s). A decoder that segfaults, aborts or hangs costs only the child: the caller gets a
  `MediaDecodeError` naming the signal, or the child is killed after `MediaLimits.timeout_s`. `isolated=False`
  decodes in-process for trusted files (no ~0.2 s process start; the timeout is then only checked between frames).
  Code with its own in-process decode of trusted files (`cosmos3.training.datasets` seeks by timestamp) builds
  on the same checks: `check_input_path`, `open_video`, `decode_frames`, `check_deadline`, `decode_error`.
* **Limits before work.** File size is checked before the child starts, and the container header (dimensions,
  duration, declared frame count, channels) before anything is decoded, so a header claiming 100000x100000 is
  refused without allocating. Headers lie, so the same limits are enforced again on every decoded frame.
* **Arrays travel as raw files, not pickles.** The child writes frames to a private temporary directory as it
  decodes; the parent reads them once into one preallocated array (a full read peaks at about one copy of the clip
  in the caller, while the child holds a frame). Streaming prefetches one chunk ahead.
* **Never silently empty.** Zero decoded frames or samples is an error.
* **Frame selection counts decoded frames** from the start of the stream (frame-exact, no keyframe seeking).
  `fps` keeps the first frame of each 1/fps interval and never repeats frames: the returned fps is
  `min(fps, source fps)`. Audio read along with video is cut to the time span of the selected frames.
* **Writes are atomic**: a temporary file in the destination directory, then `os.replace` (no fsync). The same
  machinery is public for any file: `atomic_path`, `atomic_write_bytes`/`_text`/`_json`, `atomic_directory`.
* **Only plain container demuxers** (mp4/mov, Matroska/WebM, AVI, MPEG-TS, Y4M, Ogg, MP3, AAC, WAV, FLAC): playlist
  and indirection formats (HLS, concat, image sequences) would open other files named inside the input.
* **Truncation is an error**, not a short clip: a video that decodes clearly fewer frames than its header declares
  (more than 2 frames and 5% short), or a WAV whose data chunk is cut off. MPEG-TS declares no length, so a cut TS
  file can only be caught when it breaks a packet.
* POSIX only (the parent polls the child's pipe; the child's stderr goes to a log quoted when it crashes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import json
import math
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # the only Pillow decoders we let near untrusted bytes
_IMAGE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
# extension -> (container format, video encoders in order of preference, audio encoder)
_VIDEO_CONTAINERS = {
    ".mp4": ("mp4", ("libx264",), "aac"),
    ".mov": ("mov", ("libx264",), "aac"),
    ".mkv": ("matroska", ("libx264",), "aac"),
    ".webm": ("webm", ("libvpx-vp9", "libvpx"), "libopus"),
}
# Constant-quality defaults: visually lossless for x264, good for VP9 (VP8 needs a bitrate cap with crf).
_ENCODER_OPTIONS = {
    "libx264": {"crf": "18", "preset": "medium"},
    "libvpx-vp9": {"crf": "30", "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"},
    "libvpx": {"crf": "10", "b": "4M", "deadline": "good", "cpu-used": "4"},
}
_SOUNDFILE_EXTENSIONS = {".wav": "WAV", ".flac": "FLAC"}
_AV_AUDIO_EXTENSIONS = {".m4a": "mp4", ".mp4": "mp4"}
_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
_ARRAY_DTYPES = ("uint8", "float32")
# "module:function" the worker runs instead of `_serve` (a test hook: a worker that crashes or hangs on purpose).
_WORKER_ENTRY: str | None = None


class MediaDecodeError(ValueError):
    """A media file was refused or could not be decoded: corrupt, unsupported, over a `MediaLimits` limit, or the
    decoder process crashed or timed out. The message names the file and what was wrong."""


@dataclass(frozen=True)
class MediaLimits:
    """What an untrusted file may cost. Every value must be positive.

    Args:
        max_bytes: Largest file accepted (checked before any decoding).
        max_frames: Most frames one read may return (streaming included).
        max_width / max_height / max_pixels: Largest frame or image (checked on the header, then on every frame).
        max_duration_s: Longest media, by header and by frame timestamps.
        max_audio_samples: Most samples per channel.
        max_audio_channels: Most audio channels.
        max_output_bytes: Largest array a full read may return (streams hold one chunk and are exempt).
        timeout_s: Wall-clock seconds the isolated decoder may work before it is killed (for streams, the time the
            caller waits for chunks, summed). In-process decoding checks it between frames of full reads only.
    """

    max_bytes: int = 2 << 30
    max_frames: int = 100_000
    max_width: int = 8192
    max_height: int = 8192
    max_pixels: int = 8192 * 4320
    max_duration_s: float = 3600.0
    max_audio_samples: int = 48_000 * 3600
    max_audio_channels: int = 8
    max_output_bytes: int = 8 << 30
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ValueError(f"MediaLimits.{field.name} must be a positive finite number, got {value!r}.")


DEFAULT_LIMITS = MediaLimits()


@dataclass
class VideoClip:
    """Decoded video: `frames` `[T, H, W, 3]` uint8 RGB at `fps`; `audio` `[C, S]` float32 at `sample_rate`."""

    frames: np.ndarray
    fps: float
    audio: np.ndarray | None = None
    sample_rate: int | None = None

    @property
    def duration(self) -> float:
        """Seconds of video: frames / fps."""
        return self.frames.shape[0] / self.fps

    def to_torch(self) -> Any:
        """The frames as a `torch.uint8` tensor `[T, H, W, 3]` sharing memory with `frames`."""
        import torch

        return torch.from_numpy(self.frames)


@dataclass
class AudioClip:
    """Decoded audio: `samples` `[C, S]` float32 (nominally in [-1, 1]) at `sample_rate` Hz."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return self.samples.shape[1] / self.sample_rate


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header declares (`num_frames`, `duration` are None when the container does not say)."""

    width: int
    height: int
    fps: float
    num_frames: int | None
    duration: float | None
    has_audio: bool


@dataclass(frozen=True)
class _Selection:
    start: int = 0
    end: int | None = None
    fps: str | None = None  # a Fraction as text, so the selection travels to the worker as JSON
    max_frames: int | None = None


# ---------------------------------------------------------------------------------------------- argument checks


def require_extra(module: str, extra: str) -> Any:
    """Import and return the optional dependency `module` (e.g. "av"); when it is missing, the `ImportError` says
    which extra of cosmos3 installs it (`pip install 'cosmos3[<extra>]'`)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"cosmos3.io needs `{module}` for this: pip install 'cosmos3[{extra}]'.") from e


def _int_arg(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}.")
    return int(value)


def _fps_arg(name: str, value: Any) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, int | float | Fraction) or not 0 < value < math.inf:
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
    return Fraction(value).limit_denominator(1_000_000)


def _selection(start_frame: Any, end_frame: Any, fps: Any, max_frames: Any) -> _Selection:
    start = _int_arg("start_frame", start_frame, 0)
    end = _int_arg("end_frame", end_frame, 1, allow_none=True)
    if end is not None and end <= start:
        raise ValueError(f"`end_frame`={end} must be greater than `start_frame`={start} (or None for the end).")
    target = None if fps is None else str(_fps_arg("fps", fps))
    return _Selection(start, end, target, _int_arg("max_frames", max_frames, 1, allow_none=True))


def check_input_path(path: str | os.PathLike, limits: MediaLimits) -> str:
    """Check a media file before anything opens it and return its path as a str: `path` must be a str or
    os.PathLike naming a non-empty regular file of at most `limits.max_bytes` (else `MediaDecodeError`; a missing
    file is `FileNotFoundError`), and `limits` a `MediaLimits` (else `TypeError`)."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    if not isinstance(limits, MediaLimits):
        raise TypeError(f"`limits` must be a MediaLimits, got {type(limits).__name__}.")
    path = os.fsdecode(path)
    info = os.stat(path)  # a missing file is FileNotFoundError, as everywhere else
    if not stat.S_ISREG(info.st_mode):
        raise MediaDecodeError(f"{path!r} is not a regular file.")
    if info.st_size == 0:
        raise MediaDecodeError(f"{path!r} is empty (0 bytes).")
    if info.st_size > limits.max_bytes:
        raise MediaDecodeError(f"{path!r} is {info.st_size} bytes, over max_bytes={limits.max_bytes}.")
    return path


def _check_size(path: str, what: str, width: int, height: int, limits: MediaLimits) -> None:
    if width <= 0 or height <= 0:
        raise MediaDecodeError(f"{path!r}: the {what} has no valid size ({width}x{height}).")
    for found, limit, name in ((width, limits.max_width, "max_width"), (height, limits.max_height, "max_height")):
        if found > limit:
            raise MediaDecodeError(f"{path!r}: the {what} is {width}x{height}, over {name}={limit}.")
    if width * height > limits.max_pixels:
        found = f"{width}x{height} = {width * height} pixels"
        raise MediaDecodeError(f"{path!r}: the {what} is {found}, over max_pixels={limits.max_pixels}.")


def _check_audio_header(path: str, rate: int, channels: int, duration: float | None, limits: MediaLimits) -> None:
    if not rate or not 0 < rate <= 768_000:
        raise MediaDecodeError(f"{path!r}: audio sample rate {rate!r} is missing or implausible.")
    if not 0 < channels <= limits.max_audio_channels:
        limit = f"max_audio_channels={limits.max_audio_channels}"
        raise MediaDecodeError(f"{path!r}: audio has {channels} channels; valid: 1..{limit}.")
    if duration is not None and duration > limits.max_duration_s:
        raise MediaDecodeError(f"{path!r}: audio lasts {duration:.1f} s, over max_duration_s={limits.max_duration_s}.")
    if duration is not None and duration * rate > limits.max_audio_samples:
        found = f"{round(duration * rate)} samples"
        raise MediaDecodeError(f"{path!r}: audio has {found}, over max_audio_samples={limits.max_audio_samples}.")


def check_deadline(path: str, deadline: float | None, limits: MediaLimits) -> None:
    """Raise `MediaDecodeError` once `time.monotonic()` is past `deadline` (None: no deadline). Callers set
    `deadline = time.monotonic() + limits.timeout_s` and check between frames: an in-process decode has no watchdog."""
    if deadline is not None and time.monotonic() > deadline:
        raise MediaDecodeError(f"{path!r}: decoding timed out after {limits.timeout_s} s (timeout_s).")


def decode_error(path: str, what: str, error: Exception) -> MediaDecodeError:
    """The `MediaDecodeError` to raise (`from None`) for a decoder exception `error` on `path`: the library's own
    exception types vary with the decoder and version, callers catch one type that names the file."""
    return MediaDecodeError(f"{path!r}: {what} ({type(error).__name__}: {error}).")


# ---------------------------------------------------------------------------------------------- decoding (any process)


# Demuxers allowed on untrusted input. Playlist and indirection demuxers (hls, concat, image2 patterns, ...) would
# open *other* files named inside the input, which neither the size limits nor the worker process can contain.
_DEMUXER_ALLOWLIST = "mov,matroska,avi,mpegts,yuv4mpegpipe,ogg,mp3,aac,wav,flac"


def _av_open(path: str) -> Any:
    av = require_extra("av", "video")
    try:
        return av.open(path, mode="r", metadata_errors="ignore", options={"format_whitelist": _DEMUXER_ALLOWLIST})
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise decode_error(path, "not a readable media file", e) from None


def _stream_kinds(container: Any) -> list[str]:
    return sorted({stream.type for stream in container.streams}) or ["none"]


def open_video(path: str, limits: MediaLimits) -> tuple[Any, Any, VideoInfo]:
    """Open `path` with PyAV, in this process, and check its first video stream's header against `limits`;
    nothing is decoded yet. Returns `(container, stream, info)`; the caller closes the container. For trusted
    files only (the readers above sandbox this); pass `path` through `check_input_path` first."""
    container = _av_open(path)
    try:
        if not container.streams.video:
            raise MediaDecodeError(f"{path!r}: no video stream (streams: {_stream_kinds(container)}).")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_size(path, "video", width, height, limits)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or not 0 < rate <= 1000:
            raise MediaDecodeError(f"{path!r}: the video frame rate {rate!r} is missing or implausible.")
        duration = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1_000_000  # AV_TIME_BASE
        if duration is not None and duration > limits.max_duration_s:
            found = f"video lasts {duration:.1f} s"
            raise MediaDecodeError(f"{path!r}: {found}, over max_duration_s={limits.max_duration_s}.")
        stream.thread_type = "AUTO"  # frame + slice threads; the output is the same
        info = VideoInfo(width, height, float(rate), stream.frames or None, duration, bool(container.streams.audio))
        return container, stream, info
    except BaseException:
        container.close()
        raise


def decode_frames(container: Any, stream: Any, path: str) -> Iterator[Any]:
    """Decoded `av` frames of `stream` (from `open_video`); a corrupt packet is a `MediaDecodeError`.

    Demuxing ourselves lets us refuse packets FFmpeg flags as corrupt, e.g. cut short by a truncated file: with
    frame threading the decoder itself reports nothing and just stops early."""
    for packet in container.demux(stream):
        if packet.is_corrupt:
            raise MediaDecodeError(f"{path!r}: truncated or corrupt {stream.type} packet at pts {packet.pts}.")
        yield from packet.decode()


def _precheck(path: str, info: VideoInfo, sel: _Selection, limits: MediaLimits, full: bool) -> int | None:
    """Refuse, from the declared frame count, a read that would exceed the limits, before decoding any of it.
    Returns the number of frames the selection should give, if the header says."""
    if info.num_frames is None:
        return None
    expected = max(min(info.num_frames, sel.end or info.num_frames) - sel.start, 0)
    if sel.fps is not None and Fraction(sel.fps) < info.fps:
        expected = math.ceil(expected * Fraction(sel.fps) / Fraction(info.fps))
    if sel.max_frames is not None:
        expected = min(expected, sel.max_frames)
    if expected > limits.max_frames:
        found = f"would return {expected} frames (the header declares {info.num_frames})"
        raise MediaDecodeError(f"{path!r}: {found}, over max_frames={limits.max_frames}.")
    if full and expected * info.width * info.height * 3 > limits.max_output_bytes:
        size = expected * info.width * info.height * 3
        raise MediaDecodeError(f"{path!r}: {expected} frames would take {size} bytes, over max_output_bytes.")
    return expected


def _frames(
    container: Any, stream: Any, sel: _Selection, limits: MediaLimits, path: str, deadline: float | None, full: bool
) -> Iterator[np.ndarray]:
    """The selected frames, `[H, W, 3]` uint8 each, with every limit enforced per frame."""
    width, height = stream.codec_context.width, stream.codec_context.height
    rate = Fraction(stream.average_rate or stream.guessed_rate or stream.base_rate)
    ratio = Fraction(sel.fps) / rate if sel.fps is not None and Fraction(sel.fps) < rate else None
    emitted, last_slot, index, first_time, ran_out = 0, -1, -1, None, False
    try:
        for index, frame in enumerate(decode_frames(container, stream, path)):
            check_deadline(path, deadline, limits)
            if (frame.width, frame.height) != (width, height):
                found = f"{frame.width}x{frame.height}"
                raise MediaDecodeError(f"{path!r}: frame {index} is {found} but the header says {width}x{height}.")
            if frame.time is not None:  # timestamps measured from the first frame's (streams may start anywhere)
                first_time = frame.time if first_time is None else first_time
                if frame.time - first_time > limits.max_duration_s:
                    at = f"{frame.time - first_time:.1f} s"
                    raise MediaDecodeError(f"{path!r}: frame {index} is at {at}, over max_duration_s.")
            if index < sel.start:
                continue
            if sel.end is not None and index >= sel.end:
                break
            if ratio is not None:
                slot = math.floor((index - sel.start) * ratio)
                if slot == last_slot:
                    continue
                last_slot = slot
            if emitted >= limits.max_frames:
                raise MediaDecodeError(f"{path!r}: more than max_frames={limits.max_frames} frames selected.")
            if full and (emitted + 1) * width * height * 3 > limits.max_output_bytes:
                raise MediaDecodeError(f"{path!r}: frames exceed max_output_bytes={limits.max_output_bytes}.")
            yield frame.to_ndarray(format="rgb24")
            emitted += 1
            if sel.max_frames is not None and emitted >= sel.max_frames:
                break
        else:
            ran_out = True
    except MediaDecodeError:
        raise
    except Exception as e:
        raise decode_error(path, f"decoding failed after frame {index}", e) from None
    if emitted == 0:
        found = f"the stream has {index + 1} decodable frames"
        raise MediaDecodeError(f"{path!r}: no frames in [start_frame={sel.start}, end_frame={sel.end}) ({found}).")
    declared = _declared_frames(container, stream)
    if ran_out and declared and index + 1 < declared - max(2, 0.05 * declared):
        found = f"decoded {index + 1} of the {declared} frames the header declares"
        raise MediaDecodeError(f"{path!r}: truncated: {found}.")


def _declared_frames(container: Any, stream: Any) -> int | None:
    """Frames the header promises: the stream's count, else its duration; the container's duration only when the
    video is its only stream (an audio track may legitimately run longer)."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        return None
    if stream.duration and stream.time_base:
        return round(float(stream.duration * stream.time_base * rate))
    if container.duration and len(container.streams) == 1:
        return round(container.duration / 1_000_000 * float(rate))
    return None


def _batched(frames: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Chunks of `size` frames, each filled in place (no list of frames next to a stacked copy)."""
    chunk, count = None, 0
    for frame in frames:
        if chunk is None:
            chunk = np.empty((size, *frame.shape), frame.dtype)
        chunk[count], count = frame, count + 1
        if count == size:
            yield chunk
            chunk, count = None, 0
    if chunk is not None:
        yield chunk[:count]


def _collect(frames: Iterable[np.ndarray], expected: int | None, row: tuple[int, ...]) -> np.ndarray:
    """Frames into one array, preallocated from the header's count: no second copy when the header is right (pages
    of an over-long buffer are never touched; `_precheck` capped it by the limits)."""
    out, extra, count = np.empty((expected or 0, *row), np.uint8), [], 0
    for frame in frames:
        if count < len(out):
            out[count] = frame
        else:
            extra.append(frame)
        count += 1
    if extra:
        return np.concatenate([out, np.stack(extra)])
    return out if count == len(out) else out[:count].copy()


def _output_fps(info: VideoInfo, sel: _Selection) -> float:
    return info.fps if sel.fps is None else min(info.fps, float(Fraction(sel.fps)))


def _audio_span(info: VideoInfo, sel: _Selection, num_frames: int) -> tuple[float, float]:
    """The seconds of source audio that go with `num_frames` selected frames (the clip's own duration)."""
    start = sel.start / info.fps
    return start, start + num_frames / _output_fps(info, sel)


def _decode_av_audio(
    path: str, limits: MediaLimits, deadline: float | None, window: tuple[float, float] | None = None,
    required: bool = True,
) -> tuple[np.ndarray | None, int | None]:
    """The first audio stream as `[C, S]` float32, optionally cut to `window` seconds; `(None, None)` if there is
    no audio stream and it is not `required`."""
    av = require_extra("av", "video")
    with _av_open(path) as container:
        if not container.streams.audio:
            if not required:
                return None, None
            raise MediaDecodeError(f"{path!r}: no audio stream (streams: {_stream_kinds(container)}).")
        stream = container.streams.audio[0]
        context = stream.codec_context
        rate, channels = context.sample_rate, context.layout.nb_channels
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        _check_audio_header(path, rate, channels, duration, limits)
        parts, total = [], 0
        try:
            resampler = av.AudioResampler(format="fltp", layout=context.layout, rate=rate)
            for frame in itertools.chain(decode_frames(container, stream, path), [None]):  # None flushes the resampler
                check_deadline(path, deadline, limits)
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(channels, -1))
                    total += parts[-1].shape[1]
                    if total > limits.max_audio_samples:
                        raise MediaDecodeError(f"{path!r}: audio exceeds max_audio_samples={limits.max_audio_samples}.")
        except MediaDecodeError:
            raise
        except Exception as e:
            raise decode_error(path, "audio decoding failed", e) from None
    samples = np.concatenate(parts, axis=1) if parts else np.zeros((channels, 0), np.float32)
    if duration is not None:  # AAC pads its last frame; the container knows the true length
        samples = samples[:, : round(duration * rate)]
    if window is not None:
        samples = samples[:, round(window[0] * rate) : round(window[1] * rate)]
    if samples.shape[1] == 0:
        raise MediaDecodeError(f"{path!r}: no audio samples decoded.")
    return np.ascontiguousarray(samples, dtype=np.float32), rate


def _check_wav_length(path: str) -> None:
    """libsndfile quietly shortens a WAV whose data chunk is cut off; compare the declared size with the file's."""
    with open(path, "rb") as f:
        f.seek(12)
        while True:
            header = f.read(8)
            if len(header) < 8:
                return
            size = int.from_bytes(header[4:], "little")
            if header[:4] == b"data":
                available = os.path.getsize(path) - f.tell()
                if size not in (0, 0xFFFFFFFF) and available < size:  # 0 / -1: streaming writers' placeholders
                    raise MediaDecodeError(f"{path!r}: truncated WAV: the data chunk declares {size} bytes, "
                                           f"the file holds {available}.")
                return
            f.seek(size + (size & 1), os.SEEK_CUR)


def _decode_soundfile(path: str, limits: MediaLimits) -> tuple[np.ndarray, int]:
    sf = require_extra("soundfile", "audio")
    try:
        info = sf.info(path)
        duration = info.frames / info.samplerate if info.samplerate else None
        _check_audio_header(path, info.samplerate, info.channels, duration, limits)
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except MediaDecodeError:
        raise
    except Exception as e:
        raise decode_error(path, "not a readable audio file", e) from None
    if data.shape[0] == 0:
        raise MediaDecodeError(f"{path!r}: no audio samples decoded.")
    if data.shape[0] > limits.max_audio_samples:
        raise MediaDecodeError(f"{path!r}: audio exceeds max_audio_samples={limits.max_audio_samples}.")
    return np.ascontiguousarray(data.T), int(rate)


def _decode_audio(path: str, limits: MediaLimits, deadline: float | None) -> tuple[np.ndarray, int]:
    """WAV and FLAC (by their magic bytes, not the extension) through libsndfile; anything else through FFmpeg."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        _check_wav_length(path)
    if (head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE") or head[:4] == b"fLaC":
        return _decode_soundfile(path, limits)
    samples, rate = _decode_av_audio(path, limits, deadline)
    return samples, rate


def _decode_image(path: str, limits: MediaLimits) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError
    from PIL.Image import DecompressionBombError

    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:  # reads the header only
            _check_size(path, "image", image.width, image.height, limits)
            image = ImageOps.exif_transpose(image)  # camera orientation, as viewers show it
            return np.array(image.convert("RGB"))  # a writable copy
    except MediaDecodeError:
        raise
    except UnidentifiedImageError as e:
        raise decode_error(path, f"not a {'/'.join(IMAGE_FORMATS)} image", e) from None
    except DecompressionBombError as e:  # Pillow checks the header size inside `open`, before we can
        raise decode_error(path, "the header claims an absurd size, refused before decoding", e) from None
    except Exception as e:  # truncated data, ...
        raise decode_error(path, "image decoding failed", e) from None


# ---------------------------------------------------------------------------------------------- the worker process


class _Channel:
    """The worker's side: JSON lines to the parent, arrays as raw files in the parent's temporary directory."""

    def __init__(self, out: Any, inp: Any, tmpdir: str) -> None:
        self.out, self.inp, self.tmpdir = out, inp, tmpdir

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message).encode() + b"\n")

    def wait_next(self) -> None:
        if not self.inp.readline():
            os._exit(0)  # the parent closed the stream (or died)

    def save(self, name: str, rows: Iterable[np.ndarray], row_shape: tuple[int, ...], dtype: str) -> dict[str, Any]:
        """Write `rows` (each `row_shape`) to one file as they come; the spec the parent loads it from."""
        count = 0
        with open(os.path.join(self.tmpdir, name), "wb") as f:
            for row in rows:
                f.write(np.ascontiguousarray(row, dtype=dtype).reshape(row_shape).data)
                count += 1
        return {"file": name, "shape": [count, *row_shape], "dtype": dtype}


def _serve(request: dict[str, Any], channel: _Channel) -> None:
    op, path, params = request["op"], request["path"], request["params"]
    limits = MediaLimits(**request["limits"])
    if op == "image":
        image = _decode_image(path, limits)
        channel.send({"type": "done", "image": channel.save("image", image, image.shape[1:], "uint8")})
        return
    if op == "audio":
        samples, rate = _decode_audio(path, limits, None)  # the parent keeps the time
        spec = channel.save("audio", samples, samples.shape[1:], "float32")
        channel.send({"type": "done", "audio": spec, "sample_rate": rate})
        return
    sel = _Selection(**params["selection"])
    container, stream, info = open_video(path, limits)
    with container:
        if op != "probe":
            _precheck(path, info, sel, limits, full=op == "video")
        channel.send({"type": "info", "info": dataclasses.asdict(info)})
        if op == "probe":
            return
        frames = _frames(container, stream, sel, limits, path, None, op == "video")
        row = (info.height, info.width, 3)
        if op == "stream":
            for i in itertools.count():  # each chunk is decoded (into its file) ahead of the parent's request
                spec = channel.save(f"chunk{i}", itertools.islice(frames, params["chunk_frames"]), row, "uint8")
                channel.wait_next()
                if not spec["shape"][0]:
                    break
                channel.send({"type": "chunk", "array": spec})
            channel.send({"type": "end"})
            return
        spec = channel.save("frames", frames, row, "uint8")
    done = {"type": "done", "frames": spec, "fps": _output_fps(info, sel), "audio": None, "sample_rate": None}
    if params["with_audio"]:
        span = _audio_span(info, sel, spec["shape"][0])
        audio, done["sample_rate"] = _decode_av_audio(path, limits, None, span, required=False)
        if audio is not None:
            done["audio"] = channel.save("audio", audio, audio.shape[1:], "float32")
    channel.send(done)


def _worker_main() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashing decoder should not leave core files around
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints from libraries go to the log, not into the protocol
    parent = os.getppid()

    def exit_with_parent() -> None:  # an orphaned worker stops instead of decoding on for nobody
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    request = json.loads(sys.stdin.buffer.readline())
    channel = _Channel(out, sys.stdin.buffer, request["tmpdir"])
    entry = _serve
    if request.get("entry"):
        sys.path[:0] = [p for p in request["sys_path"] if p not in sys.path]
        module, _, name = request["entry"].partition(":")
        entry = getattr(importlib.import_module(module), name)
    try:
        entry(request, channel)
    except MediaDecodeError as e:
        channel.send({"type": "error", "message": str(e)})
    except Exception as e:
        channel.send({"type": "error", "message": str(decode_error(request["path"], "decoding failed", e))})


class _Worker:
    """The parent's side of one worker process decoding one file."""

    def __init__(self, op: str, path: str, limits: MediaLimits, **params: Any) -> None:
        self.path, self.limits, self.waited, self.buffer = path, limits, 0.0, b""
        self.tmpdir = tempfile.mkdtemp(prefix="cosmos3-io-")
        request = {
            "op": op, "path": path, "params": params, "limits": dataclasses.asdict(limits), "tmpdir": self.tmpdir,
            "entry": _WORKER_ENTRY, "sys_path": list(sys.path) if _WORKER_ENTRY else [],
        }
        # -P: the script's directory (cosmos3/) must not shadow top-level packages such as `tokenizers`.
        command = [sys.executable, "-P", os.path.abspath(__file__), "--worker"]
        try:
            with open(os.path.join(self.tmpdir, "stderr"), "wb") as log:
                self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        except BaseException:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise
        self.send(request)

    def __enter__(self) -> _Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError):  # the worker is gone: `recv` says how it died
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        """The next message; a worker error, crash or timeout raises `MediaDecodeError` (and ends the worker)."""
        fd = self.proc.stdout.fileno()
        poller = select.poll()  # not select.select: it fails on descriptors >= 1024
        poller.register(fd, select.POLLIN)
        while b"\n" not in self.buffer:
            started = time.monotonic()
            ready = poller.poll(max(self.limits.timeout_s - self.waited, 0.0) * 1000)
            self.waited += time.monotonic() - started
            if not ready:
                self.close()
                raise MediaDecodeError(
                    f"{self.path!r}: decoding timed out after {self.limits.timeout_s} s (timeout_s); the decoder "
                    "process was killed."
                )
            data = os.read(fd, 1 << 16)
            if not data:
                raise self._died()
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            self.close()
            raise MediaDecodeError(f"{self.path!r}: the decoder process sent garbage: {line[:200]!r}.") from None
        if message.get("type") == "error":
            self.close()
            raise MediaDecodeError(message["message"])
        return message

    def _died(self) -> MediaDecodeError:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # closed its output but lives on: treat as broken
            self.close()
            code = self.proc.returncode
        try:
            how = f"crashed with signal {signal.Signals(-code).name} ({-code})" if code < 0 else f"exited with {code}"
        except ValueError:
            how = f"crashed with signal {-code}"
        with contextlib.suppress(OSError), open(os.path.join(self.tmpdir, "stderr"), "rb") as f:
            f.seek(max(os.fstat(f.fileno()).st_size - 400, 0))
            tail = f.read().decode(errors="replace").strip()
            how += f"; its last output: {tail!r}" if tail else ""
        self.close()
        return MediaDecodeError(f"{self.path!r}: the decoder process {how}.")

    def load(self, spec: dict[str, Any]) -> np.ndarray:
        """Read an array the worker wrote into one fresh buffer, checking its size against the declared shape."""
        if spec.get("dtype") not in _ARRAY_DTYPES or not all(isinstance(n, int) and n >= 0 for n in spec["shape"]):
            raise MediaDecodeError(f"{self.path!r}: the decoder process returned a malformed array spec {spec!r}.")
        array = np.empty(spec["shape"], spec["dtype"])
        file = os.path.join(self.tmpdir, os.path.basename(spec["file"]))
        with open(file, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != array.nbytes:
                raise MediaDecodeError(f"{self.path!r}: the decoder process returned a truncated array.")
            view, done = memoryview(array.reshape(-1)).cast("B") if array.nbytes else b"", 0
            while done < array.nbytes:  # one read() moves at most ~2 GiB on Linux
                n = f.readinto(view[done:])
                if not n:
                    raise MediaDecodeError(f"{self.path!r}: the decoder process returned a truncated array.")
                done += n
        os.unlink(file)
        return array

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- public readers


def probe_video(path: str | os.PathLike, *, limits: MediaLimits = DEFAULT_LIMITS, isolated: bool = True) -> VideoInfo:
    """What the video's header declares (size, fps, frame count, duration, audio), after checking it against
    `limits`; decodes nothing."""
    path = check_input_path(path, limits)
    if not isolated:
        container, _, info = open_video(path, limits)
        container.close()
        return info
    with _Worker("probe", path, limits, selection=dataclasses.asdict(_Selection())) as worker:
        return VideoInfo(**worker.recv()["info"])


def read_video(
    path: str | os.PathLike,
    *,
    start_frame: int = 0,
    end_frame: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    with_audio: bool = False,
    limits: MediaLimits = DEFAULT_LIMITS,
    isolated: bool = True,
) -> VideoClip:
    """Decode a video into a `VideoClip` (frames `[T, H, W, 3]` uint8 RGB).

    Frames `[start_frame, end_frame)` of the source are taken, subsampled to `fps` (if below the source rate),
    and at most `max_frames` are returned. `with_audio` adds the first audio stream, cut to the same time span
    (`audio` stays None when the file has none). `isolated=False` decodes in this process: trusted files only.
    """
    path = check_input_path(path, limits)
    sel = _selection(start_frame, end_frame, fps, max_frames)
    if not isinstance(with_audio, bool):
        raise TypeError(f"`with_audio` must be a bool, got {with_audio!r}.")
    if isolated:
        with _Worker("video", path, limits, selection=dataclasses.asdict(sel), with_audio=with_audio) as worker:
            worker.recv()  # the header, checked
            done = worker.recv()
            frames = worker.load(done["frames"])
            audio = worker.load(done["audio"]) if done["audio"] else None
        return VideoClip(frames, done["fps"], audio, done["sample_rate"])
    deadline = time.monotonic() + limits.timeout_s
    container, stream, info = open_video(path, limits)
    with container:
        expected = _precheck(path, info, sel, limits, full=True)
        frames = _frames(container, stream, sel, limits, path, deadline, True)
        frames = _collect(frames, expected, (info.height, info.width, 3))
    audio, rate = None, None
    if with_audio:
        audio, rate = _decode_av_audio(path, limits, deadline, _audio_span(info, sel, len(frames)), required=False)
    return VideoClip(frames, _output_fps(info, sel), audio, rate)


def _remote_chunks(worker: _Worker) -> Iterator[np.ndarray]:
    # A function of the worker, not a method: a generator holding the stream would make a reference cycle, and an
    # abandoned stream would keep its decoder process until the next full garbage collection.
    while True:
        worker.send({"type": "next"})
        message = worker.recv()
        if message["type"] == "end":
            return
        yield worker.load(message["array"])


class VideoStream:
    """Chunks `[n, H, W, 3]` uint8 RGB of a video, decoded as they are asked for (see `stream_video`).

    `info` is the checked header and `fps` the rate of the returned frames. Use as a context manager, or iterate
    to the end, so the decoder process is released promptly (`close()` does it explicitly).
    """

    def __init__(self, path: str, sel: _Selection, chunk_frames: int, limits: MediaLimits, isolated: bool) -> None:
        self.path, self._worker, self._container = path, None, None
        if isolated:
            selection = dataclasses.asdict(sel)
            self._worker = _Worker("stream", path, limits, selection=selection, chunk_frames=chunk_frames)
            try:
                self.info = VideoInfo(**self._worker.recv()["info"])
            except BaseException:
                self._worker.close()
                raise
            self._chunks = _remote_chunks(self._worker)
        else:
            self._container, stream, self.info = open_video(path, limits)
            try:
                _precheck(path, self.info, sel, limits, full=False)
            except BaseException:
                self._container.close()
                raise
            frames = _frames(self._container, stream, sel, limits, path, None, False)
            self._chunks = _batched(frames, chunk_frames)
        self.fps = _output_fps(self.info, sel)

    def __iter__(self) -> VideoStream:
        return self

    def __next__(self) -> np.ndarray:
        try:
            return next(self._chunks)
        except BaseException:  # the end, an error or an interrupt: release the decoder either way
            self.close()
            raise

    def close(self) -> None:
        self._chunks = iter(())
        if self._worker is not None:
            self._worker.close()
        if self._container is not None:
            self._container.close()

    def __enter__(self) -> VideoStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def stream_video(
    path: str | os.PathLike,
    *,
    chunk_frames: int = 32,
    start_frame: int = 0,
    end_frame: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    limits: MediaLimits = DEFAULT_LIMITS,
    isolated: bool = True,
) -> VideoStream:
    """Iterate over a video in chunks of `chunk_frames` frames, holding one chunk at a time (plus one decoded ahead
    in the worker). The selection arguments are those of `read_video`; concatenating the chunks gives its frames.
    The header is checked here, so a bad file raises before the first chunk."""
    path = check_input_path(path, limits)
    sel = _selection(start_frame, end_frame, fps, max_frames)
    return VideoStream(path, sel, _int_arg("chunk_frames", chunk_frames, 1), limits, isolated)


def read_image(
    path: str | os.PathLike, *, limits: MediaLimits = DEFAULT_LIMITS, isolated: bool = True
) -> np.ndarray:
    """Decode a PNG, JPEG or WebP image (by content, not extension) into `[H, W, 3]` uint8 RGB.

    EXIF orientation is applied; alpha is dropped; animated images give their first frame.
    """
    path = check_input_path(path, limits)
    if not isolated:
        return _decode_image(path, limits)
    with _Worker("image", path, limits) as worker:
        return worker.load(worker.recv()["image"])


def read_audio(
    path: str | os.PathLike, *, limits: MediaLimits = DEFAULT_LIMITS, isolated: bool = True
) -> AudioClip:
    """Decode audio into `[C, S]` float32: WAV/FLAC through soundfile, anything else (AAC in mp4/m4a, the audio
    track of a video, ...) through PyAV."""
    path = check_input_path(path, limits)
    if not isolated:
        samples, rate = _decode_audio(path, limits, time.monotonic() + limits.timeout_s)
        return AudioClip(samples, rate)
    with _Worker("audio", path, limits) as worker:
        done = worker.recv()
        return AudioClip(worker.load(done["audio"]), done["sample_rate"])


# ---------------------------------------------------------------------------------------------- writers


def _to_numpy(name: str, value: Any) -> np.ndarray:
    torch = sys.modules.get("torch")  # never import torch just to check: the worker and writers run without it
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"`{name}` must be a numpy array or a torch tensor, got {type(value).__name__}.")


def _uint8_arg(name: str, value: Any, shape: str, ndim: int) -> np.ndarray:
    array = _to_numpy(name, value)
    if array.dtype != np.uint8:
        raise TypeError(f"`{name}` must be uint8 (0..255), got dtype {array.dtype}.")
    if array.ndim != ndim or array.shape[-1] != 3 or 0 in array.shape:
        raise ValueError(f"`{name}` must have shape {shape} (RGB, non-empty), got {tuple(array.shape)}.")
    return array


def _audio_arg(audio: Any, sample_rate: Any, max_channels: int | None) -> tuple[np.ndarray, int]:
    array = _to_numpy("audio", audio)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"`audio` must be floating point in [-1, 1], got dtype {array.dtype}.")
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"`audio` must have shape [channels, samples], got {tuple(array.shape)}.")
    if max_channels is not None and array.shape[0] > max_channels:
        hint = " (it looks like [samples, channels]: pass audio.T)" if array.shape[1] <= max_channels else ""
        raise ValueError(f"`audio` has {array.shape[0]} channels; this format takes 1..{max_channels}{hint}.")
    rate = _int_arg("sample_rate", sample_rate, 1)
    return np.ascontiguousarray(array, dtype=np.float32), rate


def _extension(path: Any, valid: Iterable[str]) -> tuple[str, str]:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    path = os.fsdecode(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in valid:
        raise ValueError(f"`path` {path!r} has extension {ext!r}; valid: {sorted(valid)}.")
    return path, ext


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


# ---------------------------------------------------------------------------------------------- atomic writes


def _output_arg(path: Any) -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    path = os.fsdecode(path)
    if not path:
        raise ValueError("`path` must name a file, got ''.")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Write a file atomically: yields a temporary path in `path`'s folder (an empty file) to write to; when the
    body completes it is given the permissions of a newly created file (0o666 less the umask) and `os.replace`s
    `path`, so readers see the old file or the complete new one, never half of one. On an error, or a
    KeyboardInterrupt, the temporary file is removed and `path` is left as it was (absent, or the old file).

        with atomic_path("out.parquet") as tmp:
            pyarrow.parquet.write_table(table, tmp)

    The folder must exist. No fsync: a power cut can still lose the write (see `atomic_write_bytes(fsync=True)`).
    """
    path = _output_arg(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file should look like any other
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_atomically(path: Any, content: str | bytes, encoding: str | None, fsync: bool) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb" if encoding is None else "w", encoding=encoding) as f:
        f.write(content)
        if fsync:  # before the rename, so the name never points at data that is not on disk yet
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview, *, fsync: bool = False) -> None:
    """Write `data` to `path` atomically (`atomic_path`); `fsync=True` also flushes it to disk before the rename,
    for files that must survive a power cut."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"`data` must be bytes, bytearray or memoryview, got {type(data).__name__}.")
    _write_atomically(path, data, None, fsync)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = False) -> None:
    """Write `text` to `path` atomically (`atomic_path`), encoded with `encoding`; `fsync` as `atomic_write_bytes`."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}.")
    _write_atomically(path, text, encoding, fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, fsync: bool = False, **json_kwargs: Any) -> None:
    """Write `obj` as JSON to `path` atomically (`atomic_path`), with a trailing newline; `json_kwargs` go to
    `json.dumps` (default `indent=2`; `indent=None` for one line). `obj` is serialized before anything is created,
    so an object JSON cannot encode raises `TypeError`/`ValueError` with no file touched."""
    text = json.dumps(obj, **{"indent": 2, **json_kwargs})
    atomic_write_text(path, text + "\n", fsync=fsync)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """A new empty folder next to `path` to write into; when the body completes it takes the place of `path` (an
    old `path` is moved aside first, then deleted), so readers see the old folder or the complete new one, never
    half of one. On an error the new folder is removed and `path` is left as it was."""
    path = os.path.normpath(os.fspath(path))
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a written folder should look like any other
        if os.path.exists(path):
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.replace(path, os.path.join(trash, "old"))
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _add_audio_stream(container: Any, codec: str, channels: int, rate: int) -> Any:
    stream = container.add_stream(codec, rate=rate, layout=_LAYOUTS[channels])
    rates = stream.codec_context.codec.audio_rates
    if rates and rate not in rates:
        raise ValueError(f"`sample_rate`={rate} is not supported by the {codec} encoder; valid: {sorted(rates)}.")
    return stream


def _mux_audio(container: Any, stream: Any, audio: np.ndarray, start: int, stop: int) -> None:
    """Encode samples `[start, stop)` of `audio` (the encoder regroups them into its own frame size)."""
    av = require_extra("av", "video")
    if stop > start:
        layout = _LAYOUTS[audio.shape[0]]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, start:stop]), format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = stream.rate, start, Fraction(1, stream.rate)
        container.mux(stream.encode(frame))


def write_video(
    path: str | os.PathLike,
    frames: Any,
    fps: float,
    *,
    audio: Any = None,
    sample_rate: int | None = None,
    codec: str | None = None,
    options: dict[str, str] | None = None,
) -> None:
    """Encode `frames` `[T, H, W, 3]` uint8 RGB (numpy or torch; even H and W) at `fps`, atomically.

    The container follows the extension: `.mp4`/`.mov`/`.mkv` (H.264, AAC audio) or `.webm` (VP9, else VP8; Opus
    audio). `audio` `[C, S]` float is muxed in at `sample_rate`. `codec` overrides the encoder and `options` its
    settings (e.g. `{"crf": "23", "preset": "veryfast"}` for libx264; defaults in `_ENCODER_OPTIONS`).
    """
    path, ext = _extension(path, _VIDEO_CONTAINERS)
    frames = _uint8_arg("frames", frames, "[T, H, W, 3]", 4)
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"`frames` height and width must be even (yuv420p), got {height}x{width}; crop or pad.")
    rate = _fps_arg("fps", fps)
    if audio is None and sample_rate is not None:
        raise ValueError(f"`sample_rate`={sample_rate!r} was given without `audio`.")
    if audio is not None:
        audio, sample_rate = _audio_arg(audio, sample_rate, max(_LAYOUTS))
    if options is not None and not all(isinstance(x, str) for item in dict(options).items() for x in item):
        raise TypeError(f"`options` must map str to str (FFmpeg encoder options), got {options!r}.")
    av = require_extra("av", "video")
    container_format, encoders, audio_codec = _VIDEO_CONTAINERS[ext]
    if codec is None:
        codec = next((c for c in encoders if c in av.codecs_available), None)
        if codec is None:
            raise ImportError(f"This PyAV build has none of the encoders {list(encoders)} for {ext} files.")
    elif not isinstance(codec, str) or codec not in av.codecs_available:
        raise ValueError(f"`codec`={codec!r} is not an encoder of this PyAV build (e.g. {list(encoders)}).")
    with atomic_path(path) as tmp, av.open(tmp, mode="w", format=container_format) as container:
        video = container.add_stream(codec, rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {**_ENCODER_OPTIONS.get(codec, {}), **(options or {})}
        sound = None if audio is None else _add_audio_stream(container, audio_codec, audio.shape[0], sample_rate)
        written = 0
        for i, frame in enumerate(frames):
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            if sound is not None:  # interleave: audio up to the end of this frame
                upto = min(math.floor((i + 1) * sample_rate / rate), audio.shape[1])
                _mux_audio(container, sound, audio, written, upto)
                written = max(written, upto)
        container.mux(video.encode(None))
        if sound is not None:
            _mux_audio(container, sound, audio, written, audio.shape[1])
            container.mux(sound.encode(None))


def write_image(path: str | os.PathLike, image: Any, *, quality: int = 95) -> None:
    """Save `[H, W, 3]` uint8 RGB as PNG (lossless), JPEG or WebP (`quality` 1..100), by extension, atomically."""
    from PIL import Image

    path, ext = _extension(path, _IMAGE_EXTENSIONS)
    image = _uint8_arg("image", image, "[H, W, 3]", 3)
    quality = _int_arg("quality", quality, 1)
    if quality > 100:
        raise ValueError(f"`quality` must be in 1..100, got {quality}.")
    pil = Image.fromarray(np.ascontiguousarray(image))
    with atomic_path(path) as tmp:
        pil.save(tmp, format=_IMAGE_EXTENSIONS[ext], quality=quality)


def write_audio(path: str | os.PathLike, audio: Any, sample_rate: int, *, subtype: str | None = None) -> None:
    """Save `[C, S]` float audio, atomically: `.wav`/`.flac` through soundfile (`subtype` e.g. "PCM_16", the
    default, "PCM_24" or "FLOAT" for WAV), `.m4a`/`.mp4` as AAC through PyAV."""
    path, ext = _extension(path, {**_SOUNDFILE_EXTENSIONS, **_AV_AUDIO_EXTENSIONS})
    if ext in _SOUNDFILE_EXTENSIONS:
        sf = require_extra("soundfile", "audio")
        audio, sample_rate = _audio_arg(audio, sample_rate, None)
        if subtype is not None and not sf.check_format(_SOUNDFILE_EXTENSIONS[ext], subtype):
            valid = sorted(sf.available_subtypes(_SOUNDFILE_EXTENSIONS[ext]))
            raise ValueError(f"`subtype`={subtype!r} is not valid for {ext}; valid: {valid}.")
        with atomic_path(path) as tmp:
            sf.write(tmp, audio.T, sample_rate, format=_SOUNDFILE_EXTENSIONS[ext], subtype=subtype)
        return
    if subtype is not None:
        raise ValueError(f"`subtype` applies to .wav/.flac only, got {subtype!r} for {ext}.")
    audio, sample_rate = _audio_arg(audio, sample_rate, max(_LAYOUTS))
    av = require_extra("av", "video")
    with atomic_path(path) as tmp, av.open(tmp, mode="w", format=_AV_AUDIO_EXTENSIONS[ext]) as container:
        stream = _add_audio_stream(container, "aac", audio.shape[0], sample_rate)
        _mux_audio(container, stream, audio, 0, audio.shape[1])
        container.mux(stream.encode(None))


if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        sys.exit("cosmos3/io.py is a library; `--worker` runs the decoder process its readers start.")
    _worker_main()


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IP literal) is this machine only: the servers' default-safe bind check."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
