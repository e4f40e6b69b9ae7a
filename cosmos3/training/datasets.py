"""Training data: LeRobotDataset v3 (write and read), captioned media folders, and a loader that skips bad samples.

    with LeRobotDatasetWriter("out", fps=10, features=features, robot_type="franka") as writer:
        writer.add_episode({"observation.images.front": frames}, actions=actions, state=state, task="pick the cube")
    data = LeRobotDataset("out", clip_frames=17)          # data[i]: one clip, never crossing an episode boundary
    loader = DataLoaderWithSkips(data, batches, num_workers=2, transform=encode)
    for samples in loader: ...                            # [] when every sample of the batch failed to decode

Notable choices:

* **LeRobotDataset v3 layout** without depending on `lerobot`: `meta/info.json` (schema, path templates),
  `meta/stats.json`, `meta/tasks.parquet` (the task text as the pandas index, as LeRobot writes and reads it; a
  plain `task` column reads too), `meta/episodes/chunk-XXX/file-XXX.parquet` (one row per episode), data
  parquet files and one mp4 per camera that each hold *several episodes back to back*. An episode's rows are
  `dataset_from_index..dataset_to_index` and its frames sit in `[from_timestamp, to_timestamp)` of its camera's
  mp4; new files start once `data_files_size_in_mb` / `video_files_size_in_mb` would be exceeded, and a new
  `chunk-XXX` directory every `chunks_size` files.
* **Video concatenation without re-encoding**: each episode is encoded once by `cosmos3.io.write_video` into a
  staging file; closing a video file remuxes (copies the packets of) its episodes into one mp4, shifting their
  timestamps so episode k starts exactly at its `from_timestamp`. Memory holds one episode's frames, not a file's.
* **Atomic writes**: every file goes to a temporary name and is `os.replace`d; `meta/info.json` is written last,
  so a writer interrupted at any point never leaves a half file under a final name, nor an info.json that
  promises data which is not there.
* **Clips follow the Cosmos 3 world-action convention** (`cosmos3.tokenizers.action`): a clip of T frames comes
  with the T - 1 actions between them (`action[k]` is the one recorded at frame k, which leads to frame k + 1), or
  with T actions when `include_last_action=True` (the last one leads past the clip). Consecutive clips share their
  boundary frame by default (`stride = clip_frames - 1`), as `chunk_trajectory` chunks do.
* **Decoding by timestamp**: `decode="seek"` seeks the concatenated mp4 to the keyframe before the clip and
  decodes only from there to the clip's end, in this process, checking every frame's timestamp against the
  parquet's (trusted data: that is what one trains on). `decode="isolated"` decodes in `cosmos3.io`'s sandboxed
  child process instead, which counts frames from the start of the file (safe for untrusted files, but the cost
  grows with the clip's position in the file). Both raise `MediaDecodeError` for corrupt or truncated videos.
* **Bad samples are data, not crashes**: `DataLoaderWithSkips` runs the dataset (and the caller's `transform`) in
  worker processes; a sample that raises one of the `catch` errors becomes a `BadSample` marker, the collate
  function drops it, and `BadSampleReport` counts and records it. The batch order is exactly the one given, so a
  trainer resumes by passing the batches from its step on.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from .. import io as media
from ..io import DEFAULT_LIMITS, MediaDecodeError, MediaLimits

logger = logging.getLogger(__name__)

CODEBASE_VERSION = "v3.0"
DEFAULT_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DEFAULT_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
INFO_PATH, STATS_PATH, TASKS_PATH = "meta/info.json", "meta/stats.json", "meta/tasks.parquet"
# Per-frame bookkeeping columns every LeRobot dataset has (LeRobot's DEFAULT_FEATURES).
DEFAULT_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
# pandas' column name for an unnamed index, and the pandas version whose `to_parquet` metadata tasks.parquet copies
# (pandas 2.x, for an object index of strings; pandas 2 and 3 both read it, and pyarrow records but never consults
# the version).
PANDAS_INDEX, PANDAS_LAYOUT_VERSION = "__index_level_0__", "2.2.3"
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
NUMERIC_DTYPES = ("float32", "float64", "int64", "int32", "bool")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv")
METADATA_FILES = ("metadata.jsonl", "captions.jsonl")
CAPTION_KEYS = ("caption", "text")
_STAGING = ".staging"


class LeRobotFormatError(ValueError):
    """A LeRobot dataset is missing a file or a key, or holds a value of the wrong kind or version. The message
    names the file (and key) so the dataset can be fixed rather than debugged."""


def _pyarrow() -> tuple[Any, Any, Any]:
    """pyarrow, pyarrow.compute and pyarrow.parquet: an optional dependency (the `train` extra)."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("LeRobot datasets need `pyarrow`: pip install 'cosmos3[train]'.") from e
    return pa, pc, pq


def _arrow_type(dtype: str) -> Any:
    pa = _pyarrow()[0]
    return {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(), "int32": pa.int32(),
            "bool": pa.bool_()}[dtype]


def _arrow_column(values: np.ndarray, dtype: str) -> Any:
    """`[N]` -> a scalar column, `[N, n]` -> `list<dtype>` (how LeRobot stores vectors), without Python lists."""
    pa = _pyarrow()[0]
    if values.ndim == 1:
        return pa.array(values, type=_arrow_type(dtype))
    n, width = values.shape
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=_arrow_type(dtype)))


def _column_numpy(table: Any, name: str, where: str) -> np.ndarray:
    """A column as numpy: scalars `[N]`, list columns (list, large_list or fixed_size_list) `[N, n]`."""
    pa, pc, _ = _pyarrow()
    if name not in table.column_names:
        raise LeRobotFormatError(f"{where}: column {name!r} is missing (columns: {table.column_names}).")
    column = table.column(name).combine_chunks()
    if column.null_count:
        raise LeRobotFormatError(f"{where}: column {name!r} has {column.null_count} null values.")
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if len(lengths) else 0
        if len(lengths) and (lengths != width).any():
            raise LeRobotFormatError(f"{where}: column {name!r} has rows of different lengths {sorted(set(lengths))}.")
        values = column.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(column), width)
    return column.to_numpy(zero_copy_only=False)


def _tasks_table(tasks: Mapping[str, int]) -> Any:
    """meta/tasks.parquet as LeRobot writes it (`pd.DataFrame({"task_index": ...}, index=texts).to_parquet()`),
    without pandas: LeRobot reads it back with `pd.read_parquet` and takes `item["task"]` from the *index*, so the
    text goes in pandas' unnamed-index column and the `pandas` schema metadata declares it the index. Rows are in
    task_index order because LeRobot looks tasks up by position (`tasks.iloc[task_index]`)."""
    pa = _pyarrow()[0]
    ordered = sorted(tasks.items(), key=lambda item: item[1])
    metadata = {
        "index_columns": [PANDAS_INDEX],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                     "metadata": None},
                    {"name": None, "field_name": PANDAS_INDEX, "pandas_type": "unicode", "numpy_type": "object",
                     "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": PANDAS_LAYOUT_VERSION,
    }
    table = pa.table({"task_index": pa.array([i for _, i in ordered], type=pa.int64()),
                      PANDAS_INDEX: pa.array([t for t, _ in ordered], type=pa.string())})
    return table.replace_schema_metadata({"pandas": json.dumps(metadata)})


def _task_text_column(table: Any, path: str) -> str:
    """The column of meta/tasks.parquet that holds the task text: `task` (files of this writer before it followed
    LeRobot, or a pandas index named "task"), else the pandas index LeRobot's writer leaves, i.e. the index column
    the `pandas` schema metadata names, or `__index_level_0__` when the metadata was stripped."""
    if "task" in table.column_names:
        return "task"
    try:
        metadata = table.schema.pandas_metadata
    except ValueError:  # unreadable pandas metadata: fall back to pandas' default index column name
        metadata = None
    index = metadata.get("index_columns") if isinstance(metadata, dict) else None
    # A RangeIndex is recorded as a dict rather than a column, and a `task_index` index is not the text.
    named = [c for c in index if isinstance(c, str) and c != "task_index"] if isinstance(index, list) else []
    candidates = [*named, PANDAS_INDEX]
    for name in candidates:
        if name in table.column_names:
            return name
    raise LeRobotFormatError(f"{path}: no task text: expected a column 'task' or the pandas index LeRobot writes "
                             f"({PANDAS_INDEX!r}, or the index column named in the pandas metadata) "
                             f"(columns: {table.column_names}).")


def _write_json(path: str, data: Any) -> None:
    media.atomic_write_json(path, data, indent=4)


def _write_parquet(path: str, table: Any) -> None:
    pq = _pyarrow()[2]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with media.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _numeric_stats(values: np.ndarray) -> dict[str, Any]:
    """min/max/mean/std (population)/count and quantiles per dimension of `[N, n]` values, as JSON lists."""
    x = values.astype(np.float64)
    stats = {"min": x.min(axis=0), "max": x.max(axis=0), "mean": x.mean(axis=0), "std": x.std(axis=0)}
    stats.update({name: np.quantile(x, q, axis=0) for name, q in QUANTILES.items()})
    out: dict[str, Any] = {name: value.tolist() for name, value in stats.items()}
    out["count"] = [int(values.shape[0])]
    return out


class _PixelStats:
    """Per-channel statistics of uint8 video frames, accumulated exactly in integers, reported in [0, 1] with
    LeRobot's image-stat shape `[3, 1, 1]` (`count` is the number of frames)."""

    def __init__(self) -> None:
        self.sum = np.zeros(3, np.int64)
        self.sumsq = np.zeros(3, np.int64)
        self.min = np.full(3, 255, np.int64)
        self.max = np.zeros(3, np.int64)
        self.frames = self.pixels = 0

    def update(self, frames: np.ndarray) -> None:
        for start in range(0, len(frames), 64):  # bounded temporaries: squares of 64 frames at a time
            pixels = frames[start : start + 64].reshape(-1, 3)
            self.sum += pixels.sum(axis=0, dtype=np.int64)
            self.sumsq += np.square(pixels, dtype=np.uint32).sum(axis=0, dtype=np.int64)
            self.min = np.minimum(self.min, pixels.min(axis=0))
            self.max = np.maximum(self.max, pixels.max(axis=0))
            self.pixels += len(pixels)
        self.frames += len(frames)

    def to_json(self) -> dict[str, Any]:
        mean = self.sum / self.pixels
        std = np.sqrt(np.maximum(self.sumsq / self.pixels - mean**2, 0.0))

        def shaped(v: np.ndarray) -> list:
            return (np.asarray(v, np.float64) / 255.0).reshape(3, 1, 1).tolist()

        return {"min": shaped(self.min), "max": shaped(self.max), "mean": shaped(mean), "std": shaped(std),
                "count": [self.frames]}


def _concat_videos(parts: Sequence[tuple[str, int]], path: str, fps: float) -> str:
    """Remux the episode videos `parts` (path, frames) into one mp4 at `path`, atomically; returns the codec name.

    Packets are copied, not re-encoded; part k's timestamps are shifted by the duration of the parts before it, so
    it plays from `sum(frames before) / fps`, which is the `from_timestamp` recorded for its episode. Every part
    starts with a keyframe (it was encoded alone), so the joined stream decodes from any episode's start.
    """
    av = media.require_extra("av", "video")
    rate = Fraction(fps).limit_denominator(1_000_000)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    codec, offset = "", Fraction(0)
    with media.atomic_path(path) as tmp, av.open(tmp, mode="w", format="mp4") as out:
        target, time_base = None, None
        for part, frames in parts:
            with av.open(part) as source:
                stream = source.streams.video[0]
                if target is None:
                    target, time_base = out.add_stream_from_template(stream), stream.time_base
                    codec = stream.codec_context.name
                elif stream.time_base != time_base:  # parts come from one encoder setting; this is a bug guard
                    raise RuntimeError(f"{part}: time base {stream.time_base} differs from {time_base}.")
                shift = round(offset / time_base)
                for packet in source.demux(stream):
                    if packet.dts is None:  # the demuxer's end-of-stream marker
                        continue
                    packet.dts += shift
                    if packet.pts is not None:
                        packet.pts += shift
                    packet.stream = target
                    out.mux(packet)
            offset += Fraction(frames) / rate
    return codec


# ---------------------------------------------------------------------------------------------------------- writer


@dataclass
class _OpenFile:
    """The file (data parquet or one camera's mp4) episodes are currently appended to."""

    chunk: int = 0
    file: int = 0
    parts: list = field(default_factory=list)  # data: arrow tables; video: (staged mp4, frames)
    size: int = 0  # bytes: arrow bytes of the buffered rows, or of the staged mp4s
    frames: int = 0

    def advance(self, chunks_size: int) -> None:
        self.file += 1
        if self.file >= chunks_size:
            self.chunk, self.file = self.chunk + 1, 0
        self.parts, self.size, self.frames = [], 0, 0


class LeRobotDatasetWriter:
    """Write a LeRobotDataset v3 at `root` (a new or empty directory), episode by episode.

    Args:
        root: Output directory.
        fps: Frame rate of every stream (LeRobot datasets have one).
        features: LeRobot feature specs of what each frame holds, without the default bookkeeping features, e.g.
            `{"observation.images.front": {"dtype": "video", "shape": [H, W, 3]},
            "observation.state": {"dtype": "float32", "shape": [8], "names": [...]},
            "action": {"dtype": "float32", "shape": [7]}}`. Videos are `[H, W, 3]` with even H and W (yuv420p);
            numeric features are float32/float64/int64/int32/bool vectors.
        robot_type: Recorded in info.json (LeRobot uses it to pick embodiment settings).
        chunks_size: Files per `chunk-XXX` directory.
        data_files_size_in_mb / video_files_size_in_mb: A file takes no more episodes once the next one would
            make it bigger than this (data sizes are measured before parquet compression, so files stay below).
        video_codec / video_options: Passed to `cosmos3.io.write_video` (default H.264, crf 18).

    Frame by frame as in LeRobot (`add_frame(frame, task=...)` then `save_episode()`), or a whole episode at once
    (`add_episode`). `finalize()` (or leaving the `with` block) closes the last files and writes the metadata; until
    then the directory is not a dataset. Timestamps are `frame_index / fps`: video frames are encoded at a
    constant rate, so any other timestamps would not match the mp4. Appending to an existing dataset is not
    supported.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        fps: float,
        features: Mapping[str, Mapping[str, Any]],
        robot_type: str | None = None,
        *,
        chunks_size: int = 1000,
        data_files_size_in_mb: float = 100.0,
        video_files_size_in_mb: float = 200.0,
        video_codec: str | None = None,
        video_options: dict[str, str] | None = None,
    ) -> None:
        if isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps < math.inf:
            raise ValueError(f"`fps` must be a positive number, got {fps!r}.")
        if isinstance(chunks_size, bool) or not isinstance(chunks_size, int) or chunks_size < 1:
            raise ValueError(f"`chunks_size` must be an int >= 1, got {chunks_size!r}.")
        for name, value in (("data_files_size_in_mb", data_files_size_in_mb),
                            ("video_files_size_in_mb", video_files_size_in_mb)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        self.features = self._check_features(features)
        self.root = os.fspath(root)
        if os.path.isdir(self.root) and os.listdir(self.root):
            raise FileExistsError(f"{self.root!r} is not empty; a LeRobotDatasetWriter creates a new dataset.")
        os.makedirs(self.root, exist_ok=True)
        self.fps = int(fps) if float(fps).is_integer() else float(fps)
        self.robot_type = robot_type
        self.chunks_size = chunks_size
        self.data_files_size_in_mb, self.video_files_size_in_mb = data_files_size_in_mb, video_files_size_in_mb
        self.video_codec, self.video_options = video_codec, video_options
        self.camera_keys = [k for k, v in self.features.items() if v["dtype"] == "video"]
        self.numeric_keys = [k for k, v in self.features.items() if v["dtype"] != "video"]
        self.tasks: dict[str, int] = {}
        self.num_episodes = self.num_frames = 0
        self._episodes: list[dict[str, Any]] = []
        self._data = _OpenFile()
        self._videos = {key: _OpenFile() for key in self.camera_keys}
        self._codecs: dict[str, str] = {}
        self._pixel_stats = {key: _PixelStats() for key in self.camera_keys}
        self._buffer: list[tuple[dict[str, np.ndarray], str | None]] = []
        self._finalized = False

    @staticmethod
    def _check_features(features: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        if not isinstance(features, Mapping) or not features:
            raise ValueError("`features` must be a non-empty mapping of feature name -> {'dtype', 'shape', ...}.")
        out = {}
        for key, spec in features.items():
            if key in DEFAULT_FEATURES or key == "task":
                raise ValueError(f"Feature {key!r} is written by the writer itself; leave it out of `features`.")
            if not isinstance(spec, Mapping) or "dtype" not in spec or "shape" not in spec:
                raise ValueError(f"Feature {key!r} needs 'dtype' and 'shape', got {spec!r}.")
            dtype, shape = spec["dtype"], [int(n) for n in spec["shape"]]
            names = spec.get("names")
            if dtype == "video":
                if len(shape) != 3 or shape[2] != 3:
                    raise ValueError(f"Video feature {key!r} must have shape [height, width, 3], got {shape}.")
                if shape[0] % 2 or shape[1] % 2 or min(shape) < 2:
                    raise ValueError(f"Video feature {key!r} needs an even height and width (yuv420p), got {shape}.")
                names = names or ["height", "width", "channels"]
            elif dtype in NUMERIC_DTYPES:
                if len(shape) != 1 or shape[0] < 1:
                    raise ValueError(f"Numeric feature {key!r} must be a vector, shape [n], got {shape}.")
                if names is not None and len(names) != shape[0]:
                    raise ValueError(f"Feature {key!r} has {len(names)} names for shape {shape}.")
            else:
                valid = ["video", *NUMERIC_DTYPES]
                raise ValueError(f"Feature {key!r} has dtype {dtype!r}; this writer takes {valid}.")
            out[key] = {"dtype": dtype, "shape": shape, "names": None if names is None else list(names)}
        return out

    # ------------------------------------------------------------------------------------------------ input

    def _check_open(self) -> None:
        if self._finalized:
            raise RuntimeError(f"The writer of {self.root!r} is finalized; start a new dataset to add episodes.")

    def _feature_array(self, key: str, value: Any, length: int | None) -> np.ndarray:
        """`value` as the feature's dtype and shape: `[T, ...]` if `length` is given, else one frame's value."""
        spec = self.features[key]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        lead = () if length is None else (length,)
        if spec["dtype"] == "video":
            array = np.asarray(value)
            if array.dtype != np.uint8:
                raise TypeError(f"Feature {key!r} takes uint8 RGB frames, got dtype {array.dtype}.")
            expected = (*lead, *spec["shape"])
        else:
            array = np.asarray(value).astype(spec["dtype"], copy=False)
            expected = (*lead, *spec["shape"])
            if spec["shape"] == [1] and array.shape == lead:  # scalars may come without the trailing 1
                array = array.reshape(expected)
        if array.shape != expected:
            raise ValueError(f"Feature {key!r} must have shape {list(expected)}, got {list(array.shape)}.")
        return array

    def add_frame(self, frame: Mapping[str, Any], task: str | None = None) -> None:
        """Buffer one frame: a value for every feature (a frame's `task` may also be given as `frame["task"]`).
        Frames are held in memory until `save_episode`, which encodes and writes them."""
        self._check_open()
        frame = dict(frame)
        task = frame.pop("task", task)
        if task is not None and not isinstance(task, str):
            raise TypeError(f"`task` must be a str, got {type(task).__name__}.")
        self._check_keys(frame)
        self._buffer.append(({key: self._feature_array(key, frame[key], None) for key in self.features}, task))

    def _check_keys(self, values: Mapping[str, Any]) -> None:
        missing = [k for k in self.features if k not in values]
        extra = [k for k in values if k not in self.features]
        if missing or extra:
            raise ValueError(f"Frame values do not match `features`: missing {missing}, unknown {extra}.")

    def clear_episode_buffer(self) -> None:
        """Drop the frames added since the last `save_episode` (e.g. a failed take)."""
        self._buffer = []

    def save_episode(self, task: str | None = None) -> int:
        """Write the buffered frames as one episode; `task` applies to frames added without one. Returns its index."""
        self._check_open()
        if not self._buffer:
            raise ValueError("No frames were added since the last episode; nothing to save.")
        tasks = [frame_task if frame_task is not None else task for _, frame_task in self._buffer]
        if any(t is None for t in tasks):
            raise ValueError("Every frame needs a task: pass `task` to save_episode() or add_frame().")
        arrays = {key: np.stack([values[key] for values, _ in self._buffer]) for key in self.features}
        index = self._write_episode(arrays, tasks)
        self._buffer = []
        return index

    def add_episode(
        self,
        frames: Mapping[str, Any] | None = None,
        actions: Any = None,
        state: Any = None,
        task: str | Sequence[str] = "",
        extra: Mapping[str, Any] | None = None,
        *,
        action_key: str = "action",
        state_key: str = "observation.state",
    ) -> int:
        """Write one whole episode; returns its index.

        Args:
            frames: camera -> uint8 `[T, H, W, 3]`; keys are video feature names, or their last part
                (`"front"` for `"observation.images.front"`).
            actions: `[T, D]` for `action_key`; `action[t]` is the command recorded at frame t.
            state: `[T, S]` for `state_key`.
            task: The episode's task, or one per frame.
            extra: Any other features, `[T, ...]` each.
        """
        self._check_open()
        if self._buffer:
            raise RuntimeError("Frames added with add_frame() are waiting: save_episode() or clear_episode_buffer().")
        values: dict[str, Any] = dict(extra or {})
        for camera, video in (frames or {}).items():
            matches = [k for k in self.camera_keys if k == camera or k.rsplit(".", 1)[-1] == camera]
            if len(matches) != 1:
                raise ValueError(f"Camera {camera!r} names {len(matches)} of the video features {self.camera_keys}.")
            values[matches[0]] = video
        for key, value in ((action_key, actions), (state_key, state)):
            if value is not None:
                values[key] = value
        self._check_keys(values)
        lengths = {key: len(value) for key, value in values.items()}
        length = next(iter(lengths.values()))
        if length < 1 or any(n != length for n in lengths.values()):
            raise ValueError(f"Every feature needs the same number (>= 1) of frames, got {lengths}.")
        arrays = {key: self._feature_array(key, values[key], length) for key in self.features}
        tasks = [task] * length if isinstance(task, str) else list(task)
        if len(tasks) != length or not all(isinstance(t, str) for t in tasks):
            raise ValueError(f"`task` must be a str or {length} str (one per frame), got {task!r}.")
        return self._write_episode(arrays, tasks)

    # ------------------------------------------------------------------------------------------------ output

    def _path(self, template: str, chunk: int, file: int, video_key: str | None = None) -> str:
        relative = template.format(chunk_index=chunk, file_index=file, video_key=video_key)
        return os.path.join(self.root, relative)

    def _write_episode(self, arrays: dict[str, np.ndarray], tasks: list[str]) -> int:
        """Encode and append one validated episode. Everything that can fail on the input (encoding) happens
        before any bookkeeping changes, so a failed episode leaves the writer as it was."""
        pa = _pyarrow()[0]
        episode, length, start = self.num_episodes, len(tasks), self.num_frames
        staged: dict[str, str] = {}
        try:
            for key in self.camera_keys:
                path = os.path.join(self.root, _STAGING, key, f"episode_{episode:06d}.mp4")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                media.write_video(path, arrays[key], self.fps, codec=self.video_codec, options=self.video_options)
                staged[key] = path
        except BaseException:
            for path in staged.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        task_indices = np.array([self.tasks.setdefault(t, len(self.tasks)) for t in tasks], np.int64)
        frame_index = np.arange(length, dtype=np.int64)
        columns = {
            "index": pa.array(start + frame_index), "episode_index": pa.array(np.full(length, episode, np.int64)),
            "frame_index": pa.array(frame_index), "timestamp": pa.array((frame_index / self.fps).astype(np.float32)),
            "task_index": pa.array(task_indices),
        }
        for key in self.numeric_keys:
            values = arrays[key]
            columns[key] = _arrow_column(values[:, 0] if self.features[key]["shape"] == [1] else values,
                                         self.features[key]["dtype"])
        table = pa.table(columns)
        limit = self.data_files_size_in_mb * 1e6
        if self._data.parts and self._data.size + table.nbytes > limit:
            self._close_data()
        self._data.parts.append(table)
        self._data.size += table.nbytes
        row: dict[str, Any] = {
            "episode_index": episode, "tasks": list(dict.fromkeys(tasks)), "length": length,
            "dataset_from_index": start, "dataset_to_index": start + length,
            "data/chunk_index": self._data.chunk, "data/file_index": self._data.file,
        }
        for key in self.camera_keys:
            video, size = self._videos[key], os.path.getsize(staged[key])
            if video.parts and video.size + size > self.video_files_size_in_mb * 1e6:
                self._close_video(key)
            row[f"videos/{key}/chunk_index"], row[f"videos/{key}/file_index"] = video.chunk, video.file
            row[f"videos/{key}/from_timestamp"] = video.frames / self.fps
            row[f"videos/{key}/to_timestamp"] = (video.frames + length) / self.fps
            video.parts.append((staged[key], length))
            video.size, video.frames = video.size + size, video.frames + length
            self._pixel_stats[key].update(arrays[key])
        row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
        self._episodes.append(row)
        self.num_episodes, self.num_frames = episode + 1, start + length
        return episode

    def _close_data(self) -> None:
        if self._data.parts:
            pa = _pyarrow()[0]
            path = self._path(DEFAULT_DATA_PATH, self._data.chunk, self._data.file)
            _write_parquet(path, pa.concat_tables(self._data.parts))
            self._data.advance(self.chunks_size)

    def _close_video(self, key: str) -> None:
        video = self._videos[key]
        if video.parts:
            path = self._path(DEFAULT_VIDEO_PATH, video.chunk, video.file, key)
            self._codecs[key] = _concat_videos(video.parts, path, self.fps)
            for part, _ in video.parts:
                os.unlink(part)
            video.advance(self.chunks_size)

    def _episodes_table(self) -> Any:
        pa = _pyarrow()[0]
        columns: dict[str, Any] = {}
        for name in self._episodes[0]:
            values = [row[name] for row in self._episodes]
            if name == "tasks":
                columns[name] = pa.array(values, type=pa.list_(pa.string()))
            elif name.endswith("_timestamp"):
                columns[name] = pa.array(values, type=pa.float64())
            else:
                columns[name] = pa.array(values, type=pa.int64())
        return pa.table(columns)

    def _stats(self) -> dict[str, Any]:
        """Statistics of every numeric feature over the written data files (what a reader will see), and of the
        video pixels accumulated while encoding."""
        pq = _pyarrow()[2]
        keys = [*DEFAULT_FEATURES, *self.numeric_keys]
        paths = sorted({self._path(DEFAULT_DATA_PATH, r["data/chunk_index"], r["data/file_index"])
                        for r in self._episodes})
        tables = [pq.read_table(path, columns=keys) for path in paths]
        stats: dict[str, Any] = {}
        for key in keys:
            values = np.concatenate([_column_numpy(t, key, path) for t, path in zip(tables, paths)])
            stats[key] = _numeric_stats(values.reshape(len(values), -1))
        for key in self.camera_keys:
            stats[key] = self._pixel_stats[key].to_json()
        return stats

    def _info(self) -> dict[str, Any]:
        features = {key: dict(spec) for key, spec in DEFAULT_FEATURES.items()}
        for key, spec in self.features.items():
            features[key] = dict(spec)
            if spec["dtype"] == "video":
                height, width, channels = spec["shape"]
                features[key]["info"] = {
                    "video.height": height, "video.width": width, "video.codec": self._codecs.get(key, "h264"),
                    "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": self.fps,
                    "video.channels": channels, "has_audio": False,
                }
        return {
            "codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type,
            "total_episodes": self.num_episodes, "total_frames": self.num_frames, "total_tasks": len(self.tasks),
            "chunks_size": self.chunks_size, "data_files_size_in_mb": self.data_files_size_in_mb,
            "video_files_size_in_mb": self.video_files_size_in_mb, "fps": self.fps,
            "splits": {"train": f"0:{self.num_episodes}"}, "data_path": DEFAULT_DATA_PATH,
            "video_path": DEFAULT_VIDEO_PATH if self.camera_keys else None, "features": features,
        }

    def finalize(self) -> None:
        """Close the open data and video files and write the metadata, info.json last. Idempotent."""
        if self._finalized:
            return
        if self._buffer:
            raise RuntimeError(f"{len(self._buffer)} frames were added but not saved: save_episode() or "
                               "clear_episode_buffer() before finalize().")
        if not self._episodes:
            raise ValueError("No episode was saved; an empty dataset is not written.")
        self._close_data()
        for key in self.camera_keys:
            self._close_video(key)
        _write_parquet(os.path.join(self.root, EPISODES_PATH.format(chunk_index=0, file_index=0)),
                       self._episodes_table())
        _write_parquet(os.path.join(self.root, TASKS_PATH), _tasks_table(self.tasks))
        _write_json(os.path.join(self.root, STATS_PATH), self._stats())
        _write_json(os.path.join(self.root, INFO_PATH), self._info())
        shutil.rmtree(os.path.join(self.root, _STAGING), ignore_errors=True)
        self._finalized = True

    def __enter__(self) -> LeRobotDatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """A clean exit finalizes. After an error the saved episodes are finalized too (a crash in episode 100
        should not cost the 99 before it); unsaved frames are dropped."""
        if exc_type is None:
            self.finalize()
            return
        self._buffer = []
        if self._episodes and not self._finalized:
            try:
                self.finalize()
            except Exception:
                logger.exception("Could not finalize %s after an error; the directory is not a dataset.", self.root)


# ---------------------------------------------------------------------------------------------------------- reader


def _read_info(root: str) -> dict[str, Any]:
    path = os.path.join(root, INFO_PATH)
    if not os.path.isfile(path):
        raise LeRobotFormatError(f"{path} is missing: {root!r} is not a LeRobot dataset (or it was not finalized).")
    try:
        with open(path) as f:
            info = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise LeRobotFormatError(f"{path} is not valid JSON: {e}.") from None
    if not isinstance(info, dict):
        raise LeRobotFormatError(f"{path} must hold a JSON object, got {type(info).__name__}.")
    version = info.get("codebase_version")
    if not isinstance(version, str) or not version.startswith("v3."):
        raise LeRobotFormatError(f"{path}: 'codebase_version' is {version!r}; this reader takes LeRobotDataset v3.x "
                                 "(convert older datasets with lerobot's convert_dataset_v21_to_v30).")
    expected = {"fps": (int, float), "features": dict, "data_path": str, "total_episodes": int, "total_frames": int}
    for key, kind in expected.items():
        if key not in info:
            raise LeRobotFormatError(f"{path}: key {key!r} is missing.")
        if isinstance(info[key], bool) or not isinstance(info[key], kind):
            raise LeRobotFormatError(f"{path}: key {key!r} is {info[key]!r}, which is not a {kind}.")
    if not 0 < info["fps"] < math.inf:
        raise LeRobotFormatError(f"{path}: 'fps' must be positive, got {info['fps']!r}.")
    for key, spec in info["features"].items():
        if not isinstance(spec, dict) or "dtype" not in spec or "shape" not in spec:
            raise LeRobotFormatError(f"{path}: features[{key!r}] needs 'dtype' and 'shape', got {spec!r}.")
    if any(spec["dtype"] == "video" for spec in info["features"].values()) and not isinstance(
        info.get("video_path"), str
    ):
        raise LeRobotFormatError(f"{path}: key 'video_path' is missing, but there are video features.")
    return info


class LeRobotDataset(torch.utils.data.Dataset):
    """A LeRobotDataset v3 on disk as a map-style dataset of clips.

    Args:
        root: The dataset directory (with `meta/info.json`).
        clip_frames: T, the video frames per sample (e.g. 1 + 4k for a 4x temporal VAE).
        stride: Frames between the starts of consecutive clips of an episode; default `clip_frames - 1`, so
            neighbouring clips share their boundary frame. Clips never cross an episode boundary.
        drop_last: Without it, an episode's tail shorter than a stride gets one more clip aligned to its end.
        cameras: Video features to decode (default: all).
        episodes: Episode indices to use (default: all).
        action_key / state_key: Columns returned as "action" / "state" (None: not returned).
        include_last_action: T actions per clip instead of the T - 1 transitions between its frames.
        decode: "seek" (in-process, decodes from the keyframe before the clip) or "isolated" (cosmos3.io's child
            process, decodes from the start of the file); see the module docstring.
        limits: `MediaLimits` for decoding.

    Sample `i` is a dict: `frames` {camera: uint8 `[T, H, W, 3]`}, `action` float `[T - 1, D]` (`[T, D]` with
    `include_last_action`) where `action[k]` is the action recorded at frame k of the clip (the transition to
    frame k + 1), `state` `[T, S]` (one per frame), `task` (of the clip's first frame), `task_index`, `fps`,
    `episode_index`, `frame_index` (the first frame's index in its episode), `index` (its dataset-wide index) and
    `timestamp` (its time in the episode). Frames are `MediaDecodeError`-checked: a corrupt video raises it.
    Cameras are the `video` features; `image` features (PNG bytes inside the parquet) are not decoded.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        clip_frames: int = 17,
        stride: int | None = None,
        drop_last: bool = True,
        cameras: Sequence[str] | None = None,
        episodes: Sequence[int] | None = None,
        action_key: str | None = "action",
        state_key: str | None = "observation.state",
        include_last_action: bool = False,
        decode: str = "seek",
        limits: MediaLimits = DEFAULT_LIMITS,
    ) -> None:
        self.root = os.fspath(root)
        if isinstance(clip_frames, bool) or not isinstance(clip_frames, int) or clip_frames < 1:
            raise ValueError(f"`clip_frames` must be an int >= 1, got {clip_frames!r}.")
        stride = max(clip_frames - 1, 1) if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"`stride` must be an int >= 1, got {stride!r}.")
        if decode not in ("seek", "isolated"):
            raise ValueError(f"`decode` must be 'seek' or 'isolated', got {decode!r}.")
        if not isinstance(limits, MediaLimits):
            raise TypeError(f"`limits` must be a MediaLimits, got {type(limits).__name__}.")
        self.clip_frames, self.stride, self.drop_last = clip_frames, stride, drop_last
        self.include_last_action, self.decode, self.limits = include_last_action, decode, limits
        self.info = _read_info(self.root)
        self.features: dict[str, dict[str, Any]] = self.info["features"]
        self.fps = float(self.info["fps"])
        self.robot_type: str | None = self.info.get("robot_type")
        videos = [k for k, v in self.features.items() if v["dtype"] == "video"]
        if cameras is not None:
            unknown = [c for c in cameras if c not in videos]
            if unknown:
                raise ValueError(f"`cameras` {unknown} are not video features of {self.root!r} ({videos}).")
        self.camera_keys = list(videos if cameras is None else cameras)
        for name, key in (("action_key", action_key), ("state_key", state_key)):
            if key is not None and (key not in self.features or self.features[key]["dtype"] == "video"):
                numeric = [k for k, v in self.features.items() if v["dtype"] != "video"]
                raise ValueError(f"`{name}`={key!r} is not a numeric feature of {self.root!r} ({numeric}); "
                                 f"pass {name}=None to go without.")
        self.action_key, self.state_key = action_key, state_key
        self.tasks = self._read_tasks()
        self.stats = self._read_stats()
        self._episodes = self._read_episodes(episodes)
        self._load_data()
        self._index_clips()

    # ------------------------------------------------------------------------------------------------ metadata

    def _meta(self, relative: str) -> str:
        path = os.path.join(self.root, relative)
        if not os.path.isfile(path):
            raise LeRobotFormatError(f"{path} is missing.")
        return path

    def _read_tasks(self) -> dict[int, str]:
        pa, _, pq = _pyarrow()
        path = self._meta(TASKS_PATH)
        table = pq.read_table(path)
        indices, name = _column_numpy(table, "task_index", path), _task_text_column(table, path)
        kind = table.schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise LeRobotFormatError(f"{path}: column {name!r} holds {kind}, not task text (strings).")
        tasks: dict[int, str] = {}
        for i, text in zip(indices.tolist(), _column_numpy(table, name, path).tolist()):
            if i in tasks:
                raise LeRobotFormatError(f"{path}: task_index {i} is listed twice ({tasks[i]!r}, {text!r}).")
            tasks[i] = text
        return tasks

    def _read_stats(self) -> dict[str, dict[str, np.ndarray]]:
        """stats.json as arrays, or {} if the dataset has none (it is only needed for normalization)."""
        path = os.path.join(self.root, STATS_PATH)
        if not os.path.isfile(path):
            return {}
        try:
            with open(path) as f:
                stats = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise LeRobotFormatError(f"{path} is not valid JSON: {e}.") from None
        if not isinstance(stats, dict) or not all(isinstance(v, dict) for v in stats.values()):
            raise LeRobotFormatError(f"{path} must map feature -> {{statistic: values}}.")
        return {key: {name: np.asarray(v) for name, v in values.items()} for key, values in stats.items()}

    def _read_episodes(self, selected: Sequence[int] | None) -> list[dict[str, Any]]:
        pq = _pyarrow()[2]
        files = sorted(glob.glob(os.path.join(self.root, "meta", "episodes", "chunk-*", "file-*.parquet")))
        if not files:
            raise LeRobotFormatError(f"{os.path.join(self.root, 'meta', 'episodes')} holds no chunk-*/file-*.parquet.")
        required = ["episode_index", "length", "dataset_from_index", "dataset_to_index", "data/chunk_index",
                    "data/file_index"]
        video_columns = ["chunk_index", "file_index", "from_timestamp"]
        required += [f"videos/{key}/{name}" for key in self.camera_keys for name in video_columns]
        rows: dict[int, dict[str, Any]] = {}
        for path in files:
            table = pq.read_table(path)
            columns = {name: _column_numpy(table, name, path) for name in required}
            tasks = table.column("tasks").to_pylist() if "tasks" in table.column_names else [[]] * table.num_rows
            for r in range(table.num_rows):
                row = {name: values[r].item() for name, values in columns.items()}
                row["tasks"], row["meta_file"] = list(tasks[r]), path
                if row["episode_index"] in rows:
                    raise LeRobotFormatError(f"{path}: episode {row['episode_index']} is listed twice.")
                rows[row["episode_index"]] = row
        total = self.info["total_episodes"]
        if sorted(rows) != list(range(total)):
            raise LeRobotFormatError(f"{self.root}: meta/episodes lists episodes {sorted(rows)[:10]}..., but "
                                     f"{INFO_PATH} says total_episodes={total}.")
        selected = list(range(total)) if selected is None else list(selected)
        unknown = [e for e in selected if e not in rows]
        if unknown:
            raise ValueError(f"`episodes` {unknown[:10]} are not in {self.root!r} (0..{total - 1}).")
        return [rows[e] for e in selected]

    def _file(self, template: str, chunk: int, file: int, video_key: str | None = None) -> str:
        try:
            relative = template.format(chunk_index=chunk, file_index=file, video_key=video_key)
        except (KeyError, IndexError, ValueError) as e:
            where = os.path.join(self.root, INFO_PATH)
            raise LeRobotFormatError(f"{where}: cannot fill the path template {template!r}: {e}.") from None
        path = os.path.join(self.root, relative)
        if not os.path.isfile(path):
            raise LeRobotFormatError(f"{path} is missing (an episode of {self.root!r} points to it).")
        return path

    # ------------------------------------------------------------------------------------------------ data

    def _load_data(self) -> None:
        """Read the tabular data of the selected episodes into flat arrays (one row per frame, episode after
        episode), checking that every episode's rows are there and in order. Video paths are resolved (and
        checked to exist) here too, so a broken dataset fails at construction rather than mid-training."""
        pq = _pyarrow()[2]
        numeric = [k for k in (self.action_key, self.state_key) if k is not None]
        by_file: dict[str, list[dict[str, Any]]] = {}
        for episode in self._episodes:
            path = self._file(self.info["data_path"], episode["data/chunk_index"], episode["data/file_index"])
            episode["data_file"] = path
            by_file.setdefault(path, []).append(episode)
            episode["videos"] = {}
            for key in self.camera_keys:
                video = self._file(self.info["video_path"], episode[f"videos/{key}/chunk_index"],
                                   episode[f"videos/{key}/file_index"], key)
                episode["videos"][key] = video
        parts: dict[int, dict[str, np.ndarray]] = {}
        for path, episodes in by_file.items():
            columns = ["episode_index", "frame_index", "index", "timestamp", "task_index", *numeric]
            table = pq.read_table(path, columns=[c for c in columns if c in pq.read_schema(path).names])
            data = {name: _column_numpy(table, name, path) for name in columns}
            order = np.lexsort((data["frame_index"], data["episode_index"]))
            data = {name: values[order] for name, values in data.items()}
            for episode in episodes:
                e, length = episode["episode_index"], episode["length"]
                lo, hi = np.searchsorted(data["episode_index"], [e, e + 1])
                where = f"{path} (episode {e})"
                if hi - lo != length:
                    raise LeRobotFormatError(f"{where}: {hi - lo} rows, but meta/episodes says length={length}.")
                if (data["frame_index"][lo:hi] != np.arange(length)).any():
                    raise LeRobotFormatError(f"{where}: frame_index is not 0..{length - 1}.")
                parts[e] = {name: values[lo:hi] for name, values in data.items()}
        self._offsets = np.cumsum([0] + [e["length"] for e in self._episodes])
        self._columns = {name: np.concatenate([parts[e["episode_index"]][name] for e in self._episodes])
                         for name in ["index", "timestamp", "task_index", *numeric]}
        for key in numeric:
            values = self._columns[key]
            self._columns[key] = values.reshape(len(values), -1).astype(np.float32, copy=False)
        unknown = sorted(set(np.unique(self._columns["task_index"]).tolist()) - set(self.tasks))
        if unknown:
            raise LeRobotFormatError(f"{os.path.join(self.root, TASKS_PATH)} has no task_index {unknown[:10]}.")

    def _index_clips(self) -> None:
        episodes, starts = [], []
        for position, episode in enumerate(self._episodes):
            last = episode["length"] - self.clip_frames
            if last < 0:
                continue
            begin = list(range(0, last + 1, self.stride))
            if not self.drop_last and begin[-1] != last:
                begin.append(last)
            episodes += [position] * len(begin)
            starts += begin
        if not starts:
            longest = max((e["length"] for e in self._episodes), default=0)
            raise ValueError(f"No episode of {self.root!r} has `clip_frames`={self.clip_frames} frames "
                             f"(the longest has {longest}).")
        self._clip_episode, self._clip_start = np.asarray(episodes), np.asarray(starts)

    # ------------------------------------------------------------------------------------------------ access

    @property
    def num_episodes(self) -> int:
        """Episodes in use (all, or the `episodes` selected)."""
        return len(self._episodes)

    @property
    def num_frames(self) -> int:
        """Frames of the episodes in use (LeRobot's meaning; the clip length is `clip_frames`)."""
        return int(self._offsets[-1])

    def episode(self, i: int) -> dict[str, Any]:
        """Metadata of the `i`-th episode in use: index, length, tasks, global rows, data file, and per camera
        the mp4 and the span `[from_timestamp, to_timestamp)` the episode occupies in it."""
        e = self._episodes[i]
        videos = {key: {"path": e["videos"][key], "from_timestamp": e[f"videos/{key}/from_timestamp"],
                        "to_timestamp": e.get(f"videos/{key}/to_timestamp",
                                              e[f"videos/{key}/from_timestamp"] + e["length"] / self.fps)}
                  for key in self.camera_keys}
        return {"episode_index": e["episode_index"], "length": e["length"], "tasks": list(e["tasks"]),
                "dataset_from_index": e["dataset_from_index"], "dataset_to_index": e["dataset_to_index"],
                "data_path": e["data_file"], "videos": videos}

    def __len__(self) -> int:
        return len(self._clip_start)

    def clip(self, i: int) -> tuple[int, int]:
        """(episode_index, first frame_index) of clip `i`."""
        return self._episodes[self._clip_episode[i]]["episode_index"], int(self._clip_start[i])

    def sample_path(self, i: int) -> str:
        """The file a failure of sample `i` is most likely about: its first camera's mp4, else its data file."""
        episode = self._episodes[self._clip_episode[i]]
        return next(iter(episode["videos"].values()), episode["data_file"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise TypeError(f"Index must be an int, got {type(i).__name__}.")
        if not -len(self) <= i < len(self):
            raise IndexError(f"Clip {i} is out of range for {len(self)} clips.")
        i = int(i) % len(self)
        position, start = int(self._clip_episode[i]), int(self._clip_start[i])
        episode = self._episodes[position]
        row = int(self._offsets[position]) + start
        rows = slice(row, row + self.clip_frames)
        timestamps = self._columns["timestamp"][rows].astype(np.float64)
        frames = {}
        for key in self.camera_keys:
            times = episode[f"videos/{key}/from_timestamp"] + timestamps
            frames[key] = self._read_frames(episode["videos"][key], key, times)
        actions = self.clip_frames if self.include_last_action else self.clip_frames - 1
        task_index = int(self._columns["task_index"][row])
        return {
            "frames": frames,
            "action": None if self.action_key is None else self._columns[self.action_key][row : row + actions].copy(),
            "state": None if self.state_key is None else self._columns[self.state_key][rows].copy(),
            "task": self.tasks[task_index], "task_index": task_index, "fps": self.fps,
            "episode_index": int(episode["episode_index"]), "frame_index": start,
            "index": int(self._columns["index"][row]), "timestamp": float(timestamps[0]),
        }

    def _read_frames(self, path: str, key: str, times: np.ndarray) -> np.ndarray:
        fps = float(self.features[key].get("info", {}).get("video.fps", self.fps))
        if self.decode == "isolated":
            first = round(float(times[0]) * fps)
            clip = media.read_video(path, start_frame=first, end_frame=first + len(times), limits=self.limits)
            if len(clip.frames) != len(times):
                raise MediaDecodeError(f"{path!r}: {len(clip.frames)} frames from frame {first}, expected "
                                       f"{len(times)} (the video is shorter than meta/episodes says).")
            return clip.frames
        return decode_frames_at(path, times, fps, limits=self.limits)


def decode_frames_at(
    path: str | os.PathLike, times: Sequence[float] | np.ndarray, fps: float, *, limits: MediaLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Decode the frames shown at `times` (seconds, increasing, consecutive frames) of a video into uint8
    `[len(times), H, W, 3]`, in this process.

    Seeks to the keyframe at or before `times[0]` and decodes from there, so the cost is one GOP plus the clip, not
    the file up to it. Each returned frame's timestamp must lie within 0.4 / `fps` of the one asked for, else
    `MediaDecodeError` (metadata and video disagree). Uses `cosmos3.io`'s checked opening and packet-level
    corruption checks; for untrusted files use `cosmos3.io.read_video`, which decodes in a sandboxed process.
    """
    path = media.check_input_path(path, limits)
    times = np.asarray(times, np.float64)
    if times.ndim != 1 or not len(times) or (np.diff(times) <= 0).any():
        raise ValueError(f"`times` must be a non-empty increasing 1-D sequence, got {times!r}.")
    tolerance = 0.4 / fps
    deadline = time.monotonic() + limits.timeout_s
    for seek in (True, False):  # a seek that lands past the target (broken index): retry from the start
        container, stream, info = media.open_video(path, limits)
        with container:
            out = np.empty((len(times), info.height, info.width, 3), np.uint8)
            if seek and times[0] > tolerance:
                container.seek(round(Fraction(float(times[0])) / stream.time_base), stream=stream, backward=True)
            count, overshot = 0, False
            try:
                for frame in media.decode_frames(container, stream, path):
                    media.check_deadline(path, deadline, limits)
                    if frame.time is None:
                        raise MediaDecodeError(f"{path!r}: frames carry no timestamps; cannot locate {times[0]:.4f} s.")
                    if frame.time < times[count] - tolerance:
                        continue  # before the clip (decoded from the keyframe)
                    if abs(frame.time - times[count]) > tolerance:
                        if count == 0 and seek:
                            overshot = True
                            break
                        raise MediaDecodeError(f"{path!r}: expected a frame at {times[count]:.4f} s, the next one is "
                                               f"at {frame.time:.4f} s (meta/episodes and the video disagree).")
                    if (frame.width, frame.height) != (info.width, info.height):
                        raise MediaDecodeError(f"{path!r}: a frame is {frame.width}x{frame.height}, the header says "
                                               f"{info.width}x{info.height}.")
                    out[count] = frame.to_ndarray(format="rgb24")
                    count += 1
                    if count == len(times):
                        return out
            except MediaDecodeError:
                raise
            except Exception as e:
                raise media.decode_error(path, f"decoding failed near {times[count]:.4f} s", e) from None
        if not overshot:
            raise MediaDecodeError(f"{path!r}: the video ends after {count} of the {len(times)} frames from "
                                   f"{times[0]:.4f} s (it is shorter than the metadata says, or truncated).")
    raise MediaDecodeError(f"{path!r}: no frame at {times[0]:.4f} s.")


# ---------------------------------------------------------------------------------------------------------- folder


def _caption(entry: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    for key in keys:
        value = entry.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


class FolderDataset(torch.utils.data.Dataset):
    """Captioned images and videos in a directory tree, as a map-style dataset.

    Media: images (.png, .jpg, .jpeg, .webp) and videos (.mp4, .webm, .mov, .mkv), found recursively in sorted
    order (hidden files and directories are ignored). Captions come from a `metadata.jsonl` or `captions.jsonl` in
    any directory (the diffusers / Hugging Face imagefolder convention: one JSON object per line with "file_name",
    relative to that file's directory, and "caption" or "text"), else from a sidecar `name.txt` next to the file
    (`clip.mp4` -> `clip.txt`). A JSONL entry wins over a sidecar. Files without a (non-blank) caption are an
    error at construction listing them, unless `skip_uncaptioned=True` (then they are left out and listed in
    `skipped`).

    Sample `i`: `frames` uint8 `[T, H, W, 3]` (T = 1 for images), `caption`, `fps` (None for images), `path`.
    `max_frames` caps T and `fps` subsamples videos (see `cosmos3.io.read_video`). `media="images"` / `"videos"`
    keeps only one kind (e.g. a text-to-image and a text-to-video source over one folder). Decoding is isolated in
    `cosmos3.io`'s child process by default (`isolated=False` for trusted data saves its ~0.2 s start).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        max_frames: int | None = None,
        fps: float | None = None,
        skip_uncaptioned: bool = False,
        caption_keys: Sequence[str] = CAPTION_KEYS,
        isolated: bool = True,
        limits: MediaLimits = DEFAULT_LIMITS,
        media: str = "all",
    ) -> None:
        self.root = os.path.normpath(os.fspath(root))  # so paths from os.walk and from metadata lines compare
        kinds = {"all": IMAGE_EXTENSIONS + VIDEO_EXTENSIONS, "images": IMAGE_EXTENSIONS, "videos": VIDEO_EXTENSIONS}
        if media not in kinds:
            raise ValueError(f"`media` must be one of {list(kinds)}, got {media!r}.")
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"{self.root!r} is not a directory.")
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < 1):
            raise ValueError(f"`max_frames` must be an int >= 1 or None, got {max_frames!r}.")
        self.max_frames, self.fps, self.isolated, self.limits = max_frames, fps, isolated, limits
        media_files, metadata = [], []
        for directory, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                if name in METADATA_FILES:
                    metadata.append(os.path.join(directory, name))
                elif name.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS):
                    media_files.append(os.path.join(directory, name))
        if not media_files:
            raise ValueError(f"{self.root!r} holds no images {IMAGE_EXTENSIONS} or videos {VIDEO_EXTENSIONS}.")
        captions = self._read_metadata(metadata, set(media_files), caption_keys)
        media_files = [path for path in media_files if path.lower().endswith(kinds[media])]
        if not media_files:
            raise ValueError(f"{self.root!r} holds no {media} ({', '.join(kinds[media])}).")
        self.paths: list[str] = []
        self.captions: list[str] = []
        self.skipped: list[str] = []
        for path in media_files:
            caption = captions.get(path)
            if caption is None:
                sidecar = os.path.splitext(path)[0] + ".txt"
                if os.path.isfile(sidecar):
                    with open(sidecar, encoding="utf-8") as f:
                        caption = f.read().strip() or None
            if caption is None:
                self.skipped.append(path)
                continue
            self.paths.append(path)
            self.captions.append(caption)
        if self.skipped and not skip_uncaptioned:
            shown = ", ".join(os.path.relpath(p, self.root) for p in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            raise ValueError(
                f"{len(self.skipped)} files in {self.root!r} have no caption: {shown}{more}. Add a sidecar "
                f"name.txt or a metadata.jsonl line {{\"file_name\": ..., \"caption\": ...}}, or pass "
                "skip_uncaptioned=True."
            )
        if not self.paths:
            raise ValueError(f"No file in {self.root!r} has a caption.")

    @staticmethod
    def _read_metadata(files: list[str], media_files: set[str], keys: Sequence[str]) -> dict[str, str]:
        captions: dict[str, str] = {}
        dangling = []
        for metadata in files:
            directory = os.path.dirname(metadata)
            with open(metadata, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{metadata}:{number}"
                    try:
                        entry = json.loads(line)
                    except ValueError as e:
                        raise ValueError(f"{where}: not a JSON object ({e}).") from None
                    if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                        raise ValueError(f"{where}: each line needs a \"file_name\" string.")
                    path = os.path.normpath(os.path.join(directory, entry["file_name"]))
                    if path not in media_files:
                        dangling.append(where)
                        continue
                    caption = _caption(entry, keys)
                    if caption is None:
                        raise ValueError(f"{where}: no caption under any of {list(keys)}.")
                    captions[path] = caption
        if dangling:
            raise ValueError(f"{len(dangling)} metadata lines name no media file of the dataset: {dangling[:5]}.")
        return captions

    def __len__(self) -> int:
        return len(self.paths)

    def sample_path(self, i: int) -> str:
        return self.paths[i]

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        if path.lower().endswith(IMAGE_EXTENSIONS):
            image = media.read_image(path, limits=self.limits, isolated=self.isolated)
            return {"frames": image[None], "caption": self.captions[i], "fps": None, "path": path}
        clip = media.read_video(path, max_frames=self.max_frames, fps=self.fps, limits=self.limits,
                                isolated=self.isolated)
        return {"frames": clip.frames, "caption": self.captions[i], "fps": float(clip.fps), "path": path}


# ---------------------------------------------------------------------------------------------------------- loading


DEFAULT_CATCH: tuple[type[BaseException], ...] = (MediaDecodeError, OSError)


@dataclass(frozen=True)
class BadSample:
    """A sample that failed in a worker: its dataset index, the file it is about (if the dataset says, via
    `sample_path(index)`), and why (`ExceptionType: message`). Also the marker that replaces it in a batch."""

    index: int
    path: str | None
    reason: str


@dataclass
class BadSampleReport:
    """What `DataLoaderWithSkips` has dropped so far: counts, and the first `max_examples` bad samples."""

    count: int = 0
    empty_batches: int = 0
    batches: int = 0
    examples: list[BadSample] = field(default_factory=list)
    max_examples: int = 10

    def add(self, bad: BadSample) -> None:
        self.count += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(bad)

    def __str__(self) -> str:
        lines = [f"{self.count} bad samples skipped in {self.batches} batches ({self.empty_batches} left empty)"]
        lines += [f"  [{b.index}] {b.path}: {b.reason}" for b in self.examples]
        return "\n".join(lines)


def _sample_path(dataset: Any, index: int) -> str | None:
    describe = getattr(dataset, "sample_path", None)
    if describe is None:
        return None
    with contextlib.suppress(Exception):
        return str(describe(index))
    return None


class SkipBadSamples(torch.utils.data.Dataset):
    """`dataset[i]`, then `transform` (both in the worker), with the errors in `catch` turned into `BadSample`
    markers instead of exceptions that would end the whole loader. Other errors (bugs) still propagate."""

    def __init__(self, dataset: Any, transform: Callable[[Any], Any] | None = None,
                 catch: tuple[type[BaseException], ...] = DEFAULT_CATCH) -> None:
        self.dataset, self.transform, self.catch = dataset, transform, catch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            sample = self.dataset[index]
            return sample if self.transform is None else self.transform(sample)
        except self.catch as e:
            return BadSample(int(index), _sample_path(self.dataset, index), f"{type(e).__name__}: {e}")


def collate_skipping(samples: list[Any]) -> tuple[list[Any], list[BadSample]]:
    """The batch's good samples in order, and its bad-sample markers (runs in the worker)."""
    good = [s for s in samples if not isinstance(s, BadSample)]
    return good, [s for s in samples if isinstance(s, BadSample)]


class DataLoaderWithSkips:
    """Load the given index batches, in exactly the given order, through a `torch.utils.data.DataLoader`.

    Args:
        dataset: Any map-style dataset; `dataset.sample_path(i)`, if it exists, names the file in reports.
        batches: The index batches, one per step (a list, or a generator that starts at the step to resume
            from). Iterating the loader consumes it once; pass a list to iterate several times.
        num_workers: Worker processes (0: in this process). Linux's default start method (fork) shares the
            dataset's arrays copy-on-write; with spawn/forkserver the dataset and `transform` must be picklable.
        transform: Applied to each sample in the worker (tokenization, encoding); its errors in `catch` skip the
            sample like decoding errors do.
        catch: Exception types that mark a sample bad (default: `MediaDecodeError` and `OSError`).
        log: Called with a message for each bad sample and each batch left empty (default: this module's logger).
        max_examples: Bad samples kept in `report.examples`.
        **loader_kwargs: More `DataLoader` arguments (`prefetch_factor`, `pin_memory`, `timeout`,
            `multiprocessing_context`, `worker_init_fn`, `persistent_workers`).

    Iterating yields, per batch, the list of its good samples (in batch order; not collated, so samples of
    different sizes are fine). A batch whose samples all failed yields `[]`: the caller skips that step.
    `report` (a `BadSampleReport`) accumulates over the loader's life.
    """

    def __init__(
        self,
        dataset: Any,
        batches: Iterable[Sequence[int]],
        *,
        num_workers: int = 0,
        transform: Callable[[Any], Any] | None = None,
        catch: tuple[type[BaseException], ...] = DEFAULT_CATCH,
        log: Callable[[str], None] | None = None,
        max_examples: int = 10,
        **loader_kwargs: Any,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be an int >= 0, got {num_workers!r}.")
        for key in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last", "collate_fn"):
            if key in loader_kwargs:
                raise ValueError(f"`{key}` is decided by DataLoaderWithSkips (the batches are given as they are).")
        self.dataset, self.batches, self.num_workers = dataset, batches, num_workers
        self.report = BadSampleReport(max_examples=max_examples)
        self.log = log if log is not None else logger.warning
        self._loader = torch.utils.data.DataLoader(
            SkipBadSamples(dataset, transform, catch), batch_sampler=batches, num_workers=num_workers,
            collate_fn=collate_skipping, in_order=True, **loader_kwargs,
        )

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[Any]]:
        for number, (good, bad) in enumerate(self._loader):
            self.report.batches += 1
            for sample in bad:
                self.report.add(sample)
                self.log(f"Skipped bad sample {sample.index} ({sample.path}) in batch {number}: {sample.reason}")
            if bad and not good:
                self.report.empty_batches += 1
                self.log(f"Batch {number}: all {len(bad)} samples failed; it is empty (skip the step).")
            yield good


def load_batches(
    dataset: Any,
    batches: Iterable[Sequence[int]],
    num_workers: int = 0,
    transform: Callable[[Any], Any] | None = None,
    **kwargs: Any,
) -> DataLoaderWithSkips:
    """`DataLoaderWithSkips(dataset, batches, num_workers=..., transform=..., **kwargs)`: iterate it for the
    batches (lists of good samples), then read its `report`."""
    return DataLoaderWithSkips(dataset, batches, num_workers=num_workers, transform=transform, **kwargs)


__all__ = [
    "CODEBASE_VERSION", "DEFAULT_CATCH", "BadSample", "BadSampleReport", "DataLoaderWithSkips", "FolderDataset",
    "LeRobotDataset", "LeRobotDatasetWriter", "LeRobotFormatError", "SkipBadSamples", "collate_skipping",
    "decode_frames_at", "load_batches",
]
