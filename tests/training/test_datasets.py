"""Training data: LeRobotDataset v3 written and read back exactly, folder datasets, and bad samples skipped by the
loader (in-process and in worker processes) without changing the given batch order."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosmos3.io import MediaDecodeError, write_image, write_video
from cosmos3.training.datasets import (
    DataLoaderWithSkips,
    FolderDataset,
    LeRobotDataset,
    LeRobotDatasetWriter,
    LeRobotFormatError,
    load_batches,
)

FPS = 10
LENGTHS = (9, 13, 17)
TASKS = ("pick the cube", "place the cube", "pick the cube")
FRONT, WRIST = "observation.images.front", "observation.images.wrist"
CAMERAS = (FRONT, WRIST)
FEATURES = {
    FRONT: {"dtype": "video", "shape": [32, 32, 3]},
    WRIST: {"dtype": "video", "shape": [32, 32, 3]},
    "observation.state": {"dtype": "float32", "shape": [8], "names": [f"joint{i}" for i in range(8)]},
    "action": {"dtype": "float32", "shape": [7]},
}
FAST = {"preset": "ultrafast", "crf": "10"}  # tiny test videos: encoder speed matters more than size

try:  # not a dependency: where it is missing, LeRobot's tasks.parquet layout is written and checked with pyarrow
    import pandas as pd
except ImportError:
    pd = None


def frames_of(episode, camera, length):
    """Every frame a flat colour plus a gentle gradient; consecutive frames differ by 9 levels, so a decoded frame
    identifies its index unambiguously even after lossy coding."""
    base = (episode * 70 + camera * 35 + np.arange(length) * 9) % 200
    ramp = np.arange(32, dtype=np.int64)[None, :, None] // 4
    frames = base[:, None, None, None] + ramp[None] + np.array([0, 20, 40])
    return np.broadcast_to(frames, (length, 32, 32, 3)).astype(np.uint8)


def episode_arrays(episode, length):
    rng = np.random.default_rng(100 + episode)
    return rng.standard_normal((length, 7)).astype(np.float32), rng.standard_normal((length, 8)).astype(np.float32)


def write_dataset(root, **kw):
    with LeRobotDatasetWriter(root, FPS, FEATURES, robot_type="tiny_arm", video_options=FAST, **kw) as writer:
        for e, length in enumerate(LENGTHS):
            actions, state = episode_arrays(e, length)
            cams = {"front": frames_of(e, 0, length), WRIST: frames_of(e, 1, length)}  # short and full names
            assert writer.add_episode(cams, actions=actions, state=state, task=TASKS[e]) == e
    return str(root)


@pytest.fixture(scope="module")
def lerobot_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("lerobot") / "ds")


@pytest.fixture(scope="module")
def rolled_root(tmp_path_factory):
    """Every episode in its own data and video file (tiny size limits), two files per chunk directory."""
    root = tmp_path_factory.mktemp("rolled") / "ds"
    return write_dataset(root, chunks_size=2, data_files_size_in_mb=1e-6, video_files_size_in_mb=1e-6)


def write_tasks_as_lerobot(path, texts, index_name=None):
    """meta/tasks.parquet exactly as LeRobot writes it (`write_tasks`: `pd.DataFrame({"task_index": ...},
    index=texts).to_parquet(path)`): the task text is the pandas index, stored as column `__index_level_0__` (or
    under the index's name) and named as the index in the `pandas` schema metadata."""
    if pd is not None:
        tasks = pd.DataFrame({"task_index": range(len(texts))}, index=list(texts))
        tasks.index.name = index_name
        tasks.to_parquet(path)
        return
    field = "__index_level_0__" if index_name is None else index_name
    metadata = {  # what pandas 2 (LeRobot's) writes for an object index of strings
        "index_columns": [field],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                     "metadata": None},
                    {"name": index_name, "field_name": field, "pandas_type": "unicode", "numpy_type": "object",
                     "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3",
    }
    table = pa.table({"task_index": pa.array(range(len(texts)), pa.int64()), field: pa.array(texts, pa.string())})
    pq.write_table(table.replace_schema_metadata({"pandas": json.dumps(metadata)}), path)


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def assert_frames_match(decoded, expected_episode_frames, first):
    """Within codec tolerance, and each decoded frame is closest to the frame it claims to be."""
    for k, frame in enumerate(decoded):
        errors = np.abs(expected_episode_frames.astype(np.int16) - frame.astype(np.int16)).mean(axis=(1, 2, 3))
        assert int(np.argmin(errors)) == first + k, (first + k, errors)
        assert errors[first + k] < 2.0


# ------------------------------------------------------------------------------------------------------ writer


def test_v3_layout_and_metadata(lerobot_root):
    root = lerobot_root
    assert files_under(root) == [
        "data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet", "meta/info.json",
        "meta/stats.json", "meta/tasks.parquet", f"videos/{FRONT}/chunk-000/file-000.mp4",
        f"videos/{WRIST}/chunk-000/file-000.mp4",
    ]  # all episodes concatenated; no staging or temporary files left
    with open(os.path.join(root, "meta/info.json")) as f:
        info = json.load(f)
    assert {k: info[k] for k in ("codebase_version", "fps", "robot_type", "total_episodes", "total_frames",
                                 "total_tasks", "chunks_size", "data_files_size_in_mb", "video_files_size_in_mb")} == {
        "codebase_version": "v3.0", "fps": FPS, "robot_type": "tiny_arm", "total_episodes": 3,
        "total_frames": sum(LENGTHS), "total_tasks": 2, "chunks_size": 1000, "data_files_size_in_mb": 100.0,
        "video_files_size_in_mb": 200.0,
    }
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert info["splits"] == {"train": "0:3"}
    features = info["features"]
    assert set(features) == {"timestamp", "frame_index", "episode_index", "index", "task_index", *FEATURES}
    assert features["index"] == {"dtype": "int64", "shape": [1], "names": None}
    assert features["timestamp"]["dtype"] == "float32"
    assert features["action"] == {"dtype": "float32", "shape": [7], "names": None}
    assert features["observation.state"]["names"] == [f"joint{i}" for i in range(8)]
    video = features[FRONT]
    assert video["dtype"] == "video" and video["shape"] == [32, 32, 3]
    assert video["names"] == ["height", "width", "channels"]
    assert video["info"] == {"video.height": 32, "video.width": 32, "video.codec": "h264", "video.pix_fmt": "yuv420p",
                             "video.is_depth_map": False, "video.fps": FPS, "video.channels": 3, "has_audio": False}

    episodes = pq.read_table(os.path.join(root, "meta/episodes/chunk-000/file-000.parquet"))
    video_columns = [f"videos/{c}/{n}" for c in CAMERAS for n in ("chunk_index", "file_index", "from_timestamp",
                                                                   "to_timestamp")]
    assert set(episodes.column_names) == {
        "episode_index", "tasks", "length", "dataset_from_index", "dataset_to_index", "data/chunk_index",
        "data/file_index", "meta/episodes/chunk_index", "meta/episodes/file_index", *video_columns,
    }
    rows = episodes.to_pydict()
    starts = np.cumsum((0, *LENGTHS))
    assert rows["episode_index"] == [0, 1, 2]
    assert rows["length"] == list(LENGTHS)
    assert rows["tasks"] == [[t] for t in TASKS]
    assert rows["dataset_from_index"] == starts[:-1].tolist() and rows["dataset_to_index"] == starts[1:].tolist()
    assert rows["data/file_index"] == [0, 0, 0]
    for camera in CAMERAS:
        assert rows[f"videos/{camera}/file_index"] == [0, 0, 0]
        np.testing.assert_allclose(rows[f"videos/{camera}/from_timestamp"], starts[:-1] / FPS)
        np.testing.assert_allclose(rows[f"videos/{camera}/to_timestamp"], starts[1:] / FPS)

    data = pq.read_table(os.path.join(root, "data/chunk-000/file-000.parquet"))
    schema = data.schema
    assert schema.field("action").type == pa.list_(pa.float32())
    assert schema.field("observation.state").type == pa.list_(pa.float32())
    assert schema.field("timestamp").type == pa.float32()
    for name in ("index", "episode_index", "frame_index", "task_index"):
        assert schema.field(name).type == pa.int64()
    columns = data.to_pydict()
    assert columns["index"] == list(range(sum(LENGTHS)))
    assert columns["episode_index"] == [e for e, n in enumerate(LENGTHS) for _ in range(n)]
    assert columns["frame_index"] == [i for n in LENGTHS for i in range(n)]
    assert columns["task_index"] == [[0, 1, 0][e] for e, n in enumerate(LENGTHS) for _ in range(n)]
    np.testing.assert_array_equal(columns["timestamp"], np.float32(np.concatenate([np.arange(n) for n in LENGTHS])
                                                                   / FPS))
    actions = np.concatenate([episode_arrays(e, n)[0] for e, n in enumerate(LENGTHS)])
    np.testing.assert_array_equal(np.array(columns["action"], np.float32), actions)


def test_tasks_parquet_reads_as_lerobot_reads_it(lerobot_root):
    """LeRobot's `load_tasks` is `pd.read_parquet` and its `item["task"]` is `tasks.iloc[task_index].name`: the text
    must be the pandas index, as LeRobot's own writer leaves it, not a data column."""
    path = os.path.join(lerobot_root, "meta/tasks.parquet")
    table = pq.read_table(path)
    assert table.to_pydict() == {"task_index": [0, 1], "__index_level_0__": ["pick the cube", "place the cube"]}
    assert table.schema.field("__index_level_0__").type == pa.string()
    metadata = table.schema.pandas_metadata
    assert metadata["index_columns"] == ["__index_level_0__"]
    assert [(c["name"], c["field_name"], c["pandas_type"]) for c in metadata["columns"]] == [
        ("task_index", "task_index", "int64"), (None, "__index_level_0__", "unicode")]
    if pd is not None:
        tasks = pd.read_parquet(path)
        assert list(tasks.columns) == ["task_index"]
        assert [tasks.iloc[i].name for i in range(len(tasks))] == ["pick the cube", "place the cube"]
        assert tasks.loc["place the cube"].task_index == 1  # LeRobot's get_task_index


def test_stats_equal_numpy(lerobot_root):
    with open(os.path.join(lerobot_root, "meta/stats.json")) as f:
        stats = json.load(f)
    arrays = [episode_arrays(e, n) for e, n in enumerate(LENGTHS)]
    for key, values in (("action", np.concatenate([a for a, _ in arrays])),
                        ("observation.state", np.concatenate([s for _, s in arrays]))):
        x = values.astype(np.float64)
        expected = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0),
                    "q01": np.quantile(x, 0.01, axis=0), "q99": np.quantile(x, 0.99, axis=0)}
        for name, value in expected.items():
            np.testing.assert_allclose(stats[key][name], value, rtol=1e-12, atol=0, err_msg=f"{key} {name}")
        assert stats[key]["count"] == [sum(LENGTHS)]
    assert stats["frame_index"]["max"] == [max(LENGTHS) - 1]
    pixels = np.concatenate([frames_of(e, 0, n) for e, n in enumerate(LENGTHS)]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(np.array(stats[FRONT]["mean"]).reshape(3), pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(np.array(stats[FRONT]["std"]).reshape(3), pixels.std(0), rtol=1e-9)
    np.testing.assert_allclose(np.array(stats[FRONT]["max"]).reshape(3), pixels.max(0))
    assert stats[FRONT]["count"] == [sum(LENGTHS)]


def test_file_rolling_and_chunks(rolled_root):
    assert files_under(rolled_root)[:3] == [
        "data/chunk-000/file-000.parquet", "data/chunk-000/file-001.parquet", "data/chunk-001/file-000.parquet",
    ]
    rows = pq.read_table(os.path.join(rolled_root, "meta/episodes/chunk-000/file-000.parquet")).to_pydict()
    assert rows["data/chunk_index"] == [0, 0, 1] and rows["data/file_index"] == [0, 1, 0]
    assert rows[f"videos/{WRIST}/chunk_index"] == [0, 0, 1] and rows[f"videos/{WRIST}/file_index"] == [0, 1, 0]
    assert rows[f"videos/{WRIST}/from_timestamp"] == [0.0, 0.0, 0.0]
    data = LeRobotDataset(rolled_root, clip_frames=5, stride=4)
    sample = data[len(data) - 1]  # the last clip of the last episode, in chunk-001
    assert (sample["episode_index"], sample["frame_index"]) == (2, 12)
    assert_frames_match(sample["frames"][WRIST], frames_of(2, 1, LENGTHS[2]), 12)


def test_add_frame_api_matches_add_episode(tmp_path):
    actions, state = episode_arrays(0, 5)
    features = {"observation.images.cam": {"dtype": "video", "shape": [16, 16, 3]},
                "observation.state": {"dtype": "float32", "shape": [8]}, "action": {"dtype": "float32", "shape": [7]},
                "next.reward": {"dtype": "float32", "shape": [1]}}
    with LeRobotDatasetWriter(tmp_path / "ds", FPS, features, video_options=FAST) as writer:
        writer.add_frame({"observation.images.cam": np.zeros((16, 16, 3), np.uint8), "observation.state": state[0],
                          "action": actions[0], "next.reward": 0.0})
        writer.clear_episode_buffer()  # a failed take
        for t in range(5):
            image = np.full((16, 16, 3), 40 * t, np.uint8)
            frame = {"observation.images.cam": image, "observation.state": state[t], "action": actions[t],
                     "next.reward": np.float32(t)}
            if t >= 3:
                frame["task"] = "second task"
            writer.add_frame(frame)
        assert writer.save_episode(task="first task") == 0
        with pytest.raises(ValueError, match="missing \\['action'\\]"):
            writer.add_frame({"observation.images.cam": image, "observation.state": state[0], "next.reward": 0.0})
        with pytest.raises(ValueError, match="shape \\[7\\]"):
            writer.add_frame({"observation.images.cam": image, "observation.state": state[0], "action": state[0],
                              "next.reward": 0.0})
    data = LeRobotDataset(tmp_path / "ds", clip_frames=2, stride=1)
    assert data.tasks == {0: "first task", 1: "second task"}
    assert [data[i]["task"] for i in range(len(data))] == ["first task"] * 3 + ["second task"]
    np.testing.assert_array_equal(np.concatenate([data[i]["action"] for i in range(len(data))]), actions[:4])
    assert data.episode(0)["tasks"] == ["first task", "second task"]
    table = pq.read_table(os.path.join(tmp_path, "ds/data/chunk-000/file-000.parquet"))
    assert table.schema.field("next.reward").type == pa.float32()
    assert table.column("next.reward").to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even height and width"):
        LeRobotDatasetWriter(tmp_path / "a", FPS, {"cam": {"dtype": "video", "shape": [31, 32, 3]}})
    with pytest.raises(ValueError, match="written by the writer itself"):
        LeRobotDatasetWriter(tmp_path / "b", FPS, {"index": {"dtype": "int64", "shape": [1]}})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        LeRobotDatasetWriter(tmp_path / "c", FPS, FEATURES)
    writer = LeRobotDatasetWriter(tmp_path / "d", FPS, FEATURES, video_options=FAST)
    actions, state = episode_arrays(0, 4)
    with pytest.raises(ValueError, match="same number"):
        writer.add_episode({"front": frames_of(0, 0, 4), "wrist": frames_of(0, 1, 3)}, actions, state, "t")
    with pytest.raises(TypeError, match="uint8"):
        writer.add_episode({"front": frames_of(0, 0, 4).astype(np.float32), "wrist": frames_of(0, 1, 4)}, actions,
                           state, "t")
    with pytest.raises(ValueError, match="No episode"):
        writer.finalize()
    assert writer.num_episodes == 0 and not os.path.exists(tmp_path / "d" / "meta" / "info.json")


def test_interrupted_writer_leaves_no_half_files(tmp_path, monkeypatch):
    writer = LeRobotDatasetWriter(tmp_path / "ds", FPS, FEATURES, video_options=FAST)
    actions, state = episode_arrays(0, 4)
    writer.add_episode({"front": frames_of(0, 0, 4), "wrist": frames_of(0, 1, 4)}, actions, state, "t")

    def dies_halfway(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a parquet file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        writer.finalize()
    assert not [f for f in files_under(tmp_path / "ds") if f.endswith((".parquet", ".json")) or ".tmp" in f]
    with pytest.raises(LeRobotFormatError, match="info.json is missing"):
        LeRobotDataset(tmp_path / "ds")


def test_error_in_with_block_keeps_saved_episodes(tmp_path):
    with pytest.raises(RuntimeError, match="robot fell over"), LeRobotDatasetWriter(
        tmp_path / "ds", FPS, FEATURES, video_options=FAST
    ) as writer:
        for e in range(2):
            actions, state = episode_arrays(e, 4)
            writer.add_episode({"front": frames_of(e, 0, 4), "wrist": frames_of(e, 1, 4)}, actions, state, "t")
        writer.add_frame({FRONT: frames_of(0, 0, 1)[0], WRIST: frames_of(0, 0, 1)[0], "action": actions[0],
                          "observation.state": state[0]}, task="t")
        raise RuntimeError("robot fell over")
    data = LeRobotDataset(tmp_path / "ds", clip_frames=4)
    assert (data.num_episodes, data.num_frames, len(data)) == (2, 8, 2)


# ------------------------------------------------------------------------------------------------------ reader


def test_round_trip_clips(lerobot_root):
    data = LeRobotDataset(lerobot_root, clip_frames=5, stride=4)
    assert (data.fps, data.num_episodes, data.num_frames) == (FPS, 3, sum(LENGTHS))
    assert data.camera_keys == list(CAMERAS) and data.tasks == {0: "pick the cube", 1: "place the cube"}
    assert data.robot_type == "tiny_arm" and data.features["action"]["shape"] == [7]
    np.testing.assert_allclose(data.stats["action"]["mean"], np.concatenate(
        [episode_arrays(e, n)[0] for e, n in enumerate(LENGTHS)]).astype(np.float64).mean(0))
    expected = [(e, s) for e, n in enumerate(LENGTHS) for s in range(0, n - 5 + 1, 4)]
    assert [data.clip(i) for i in range(len(data))] == expected
    for i, (e, start) in enumerate(expected):
        sample = data[i]
        assert start + 5 <= LENGTHS[e]  # never crosses into the next episode
        actions, state = episode_arrays(e, LENGTHS[e])
        assert (sample["episode_index"], sample["frame_index"]) == (e, start)
        assert sample["index"] == sum(LENGTHS[:e]) + start
        assert sample["task"] == TASKS[e] and sample["fps"] == FPS
        assert sample["timestamp"] == pytest.approx(start / FPS)
        assert sample["action"].dtype == np.float32 and sample["action"].shape == (4, 7)
        np.testing.assert_array_equal(sample["action"], actions[start : start + 4])  # N actions <-> N + 1 frames
        np.testing.assert_array_equal(sample["state"], state[start : start + 5])
        for c, camera in enumerate(CAMERAS):
            assert sample["frames"][camera].shape == (5, 32, 32, 3) and sample["frames"][camera].dtype == np.uint8
            assert_frames_match(sample["frames"][camera], frames_of(e, c, LENGTHS[e]), start)
    meta = data.episode(2)
    assert (meta["length"], meta["dataset_from_index"], meta["tasks"]) == (17, 22, ["pick the cube"])
    assert meta["videos"][WRIST]["from_timestamp"] == pytest.approx(2.2)
    assert meta["videos"][WRIST]["path"].endswith(f"videos/{WRIST}/chunk-000/file-000.mp4")


@pytest.mark.parametrize("index_name", [None, "instruction"])
def test_reads_tasks_stored_as_pandas_index(lerobot_root, tmp_path, index_name):
    """A dataset from LeRobot's own writer: tasks.parquet holds the text as the pandas index (unnamed:
    `__index_level_0__`; named: a column of that name, recorded as the index in the pandas metadata)."""
    root = str(tmp_path / "ds")
    shutil.copytree(lerobot_root, root)
    write_tasks_as_lerobot(f"{root}/meta/tasks.parquet", ["pick the cube", "place the cube"], index_name)
    data = LeRobotDataset(root, clip_frames=5, cameras=[])
    assert data.tasks == {0: "pick the cube", 1: "place the cube"}
    assert [data[i]["task"] for i in range(len(data))] == [TASKS[data.clip(i)[0]] for i in range(len(data))]


def test_reads_tasks_stored_as_a_column(lerobot_root, tmp_path):
    """Datasets written before the writer followed LeRobot's layout keep the text in a plain `task` column; rows
    are matched by `task_index`, not by position."""
    root = str(tmp_path / "ds")
    shutil.copytree(lerobot_root, root)
    pq.write_table(pa.table({"task_index": pa.array([1, 0], pa.int64()), "task": ["place the cube", "pick the cube"]}),
                   f"{root}/meta/tasks.parquet")
    data = LeRobotDataset(root, clip_frames=5, cameras=[])
    assert data.tasks == {0: "pick the cube", 1: "place the cube"}
    assert data[0]["task"] == "pick the cube"


def test_isolated_decoding_matches(lerobot_root):
    seek = LeRobotDataset(lerobot_root, clip_frames=5, cameras=[WRIST])
    isolated = LeRobotDataset(lerobot_root, clip_frames=5, cameras=[WRIST], decode="isolated")
    i = len(seek) - 1  # deep inside the concatenated file
    assert seek.clip(i) == (2, 12)
    np.testing.assert_array_equal(isolated[i]["frames"][WRIST], seek[i]["frames"][WRIST])
    assert list(isolated[i]["frames"]) == [WRIST]


def test_clip_options(lerobot_root):
    default = LeRobotDataset(lerobot_root, clip_frames=5)
    assert default.stride == 4  # neighbouring clips share a boundary frame
    last = LeRobotDataset(lerobot_root, clip_frames=5, include_last_action=True)
    actions, _ = episode_arrays(0, LENGTHS[0])
    np.testing.assert_array_equal(last[0]["action"], actions[:5])
    tail = LeRobotDataset(lerobot_root, clip_frames=5, stride=4, drop_last=False, episodes=[1])
    assert [tail.clip(i) for i in range(len(tail))] == [(1, 0), (1, 4), (1, 8)]  # 13 = 1 + 3 * 4: no tail needed
    tail = LeRobotDataset(lerobot_root, clip_frames=6, stride=4, drop_last=False, episodes=[1])
    assert [tail.clip(i) for i in range(len(tail))] == [(1, 0), (1, 4), (1, 7)]
    long = LeRobotDataset(lerobot_root, clip_frames=10, stride=100)
    assert [long.clip(i) for i in range(len(long))] == [(1, 0), (2, 0)]  # episode 0 (9 frames) is too short
    no_state = LeRobotDataset(lerobot_root, clip_frames=3, state_key=None, action_key=None, cameras=[])
    assert no_state[0]["state"] is None and no_state[0]["action"] is None and no_state[0]["frames"] == {}
    with pytest.raises(ValueError, match="longest has 17"):
        LeRobotDataset(lerobot_root, clip_frames=18)
    with pytest.raises(ValueError, match="not a numeric feature"):
        LeRobotDataset(lerobot_root, action_key="actions")
    with pytest.raises(IndexError):
        default[len(default)]


def _edit_json(path, **changes):
    with open(path) as f:
        info = json.load(f)
    for key, value in changes.items():
        if value is None:
            del info[key]
        else:
            info[key] = value
    with open(path, "w") as f:
        json.dump(info, f)


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _drop_column(path, name):
    table = pq.read_table(path)
    pq.write_table(table.drop_columns([name]), path)


BREAKAGES = {
    "no info.json": (lambda r: os.remove(f"{r}/meta/info.json"), "meta/info.json is missing"),
    "broken json": (lambda r: _truncate(f"{r}/meta/info.json", 20), "info.json is not valid JSON"),
    "v2.1": (lambda r: _edit_json(f"{r}/meta/info.json", codebase_version="v2.1"), "'codebase_version' is 'v2.1'"),
    "no fps": (lambda r: _edit_json(f"{r}/meta/info.json", fps=None), "info.json: key 'fps' is missing"),
    "no data file": (lambda r: os.remove(f"{r}/data/chunk-000/file-000.parquet"),
                     "data/chunk-000/file-000.parquet is missing"),
    "no video file": (lambda r: os.remove(f"{r}/videos/{WRIST}/chunk-000/file-000.mp4"),
                      f"videos/{WRIST}/chunk-000/file-000.mp4 is missing"),
    "no tasks": (lambda r: os.remove(f"{r}/meta/tasks.parquet"), "meta/tasks.parquet is missing"),
    "no task text": (lambda r: _drop_column(f"{r}/meta/tasks.parquet", "__index_level_0__"),
                     "meta/tasks.parquet: no task text"),
    "task text not text": (lambda r: pq.write_table(pa.table({"task_index": [0, 1], "task": [3, 4]}),
                                                    f"{r}/meta/tasks.parquet"),
                           "meta/tasks.parquet: column 'task' holds int64, not task text"),
    "task twice": (lambda r: pq.write_table(pa.table({"task_index": [0, 0], "task": ["a", "b"]}),
                                            f"{r}/meta/tasks.parquet"), "meta/tasks.parquet: task_index 0 is listed"),
    "episodes column": (lambda r: _drop_column(f"{r}/meta/episodes/chunk-000/file-000.parquet",
                                               f"videos/{FRONT}/from_timestamp"),
                        f"file-000.parquet: column 'videos/{FRONT}/from_timestamp' is missing"),
    "data column": (lambda r: _drop_column(f"{r}/data/chunk-000/file-000.parquet", "action"),
                    "file-000.parquet: column 'action' is missing"),
    "episode count": (lambda r: _edit_json(f"{r}/meta/info.json", total_episodes=4), "total_episodes=4"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_reader_names_what_is_broken(lerobot_root, tmp_path, breakage):
    root = str(tmp_path / "ds")
    shutil.copytree(lerobot_root, root)
    LeRobotDataset(root)  # the copy is fine
    breaks, message = BREAKAGES[breakage]
    breaks(root)
    with pytest.raises(LeRobotFormatError) as error:
        LeRobotDataset(root)
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)


def test_video_shorter_than_metadata_is_a_decode_error(lerobot_root, tmp_path):
    root = str(tmp_path / "ds")
    shutil.copytree(lerobot_root, root)
    path = f"{root}/meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    column = f"videos/{FRONT}/from_timestamp"
    shifted = pa.array([t + 5.0 for t in table.column(column).to_pylist()], pa.float64())
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, shifted), path)
    data = LeRobotDataset(root, clip_frames=5, cameras=[FRONT])
    with pytest.raises(MediaDecodeError, match="ends after 0 of the 5 frames"):
        data[0]


# ------------------------------------------------------------------------------------------------------ folder


@pytest.fixture
def media_folder(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    write_image(root / "a.png", np.full((16, 24, 3), 200, np.uint8))
    write_image(root / "b.jpg", np.full((16, 16, 3), 90, np.uint8))
    write_video(root / "sub" / "c.mp4", frames_of(0, 0, 8), 8, options=FAST)
    return root


def test_folder_dataset_sidecar_captions(media_folder):
    for name, caption in (("a", "a red square"), ("b", " grey \n"), ("sub/c", "a moving gradient")):
        (media_folder / f"{name}.txt").write_text(caption)
    data = FolderDataset(media_folder, max_frames=5, isolated=False)
    assert len(data) == 3
    samples = [data[i] for i in range(3)]
    assert [os.path.relpath(s["path"], media_folder) for s in samples] == ["a.png", "b.jpg", "sub/c.mp4"]
    assert [s["caption"] for s in samples] == ["a red square", "grey", "a moving gradient"]
    assert samples[0]["frames"].shape == (1, 16, 24, 3) and samples[0]["fps"] is None
    assert samples[2]["frames"].shape == (5, 32, 32, 3) and samples[2]["fps"] == 8.0
    assert_frames_match(samples[2]["frames"], frames_of(0, 0, 8), 0)


def test_folder_dataset_metadata_jsonl(media_folder):
    (media_folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "from metadata"}) + "\n\n"
        + json.dumps({"file_name": "b.jpg", "caption": "b caption", "text": "ignored"}) + "\n"
    )
    (media_folder / "a.txt").write_text("the sidecar loses")
    (media_folder / "sub" / "captions.jsonl").write_text(json.dumps({"file_name": "c.mp4", "caption": "c!"}) + "\n")
    data = FolderDataset(media_folder)
    assert data.captions == ["from metadata", "b caption", "c!"]
    assert data[1]["caption"] == "b caption" and data[1]["frames"].shape == (1, 16, 16, 3)  # isolated decoding


def test_folder_dataset_keeps_one_kind_of_media(media_folder):
    for name in ("a", "b", "sub/c"):
        (media_folder / f"{name}.txt").write_text(f"caption {name}")
    images = FolderDataset(media_folder, media="images", isolated=False)
    videos = FolderDataset(media_folder, media="videos", isolated=False)
    assert [os.path.basename(p) for p in images.paths] == ["a.png", "b.jpg"]
    assert images.captions == ["caption a", "caption b"]
    assert [os.path.basename(p) for p in videos.paths] == ["c.mp4"] and videos[0]["fps"] == 8.0
    with pytest.raises(ValueError, match="`media` must be one of"):
        FolderDataset(media_folder, media="audio")
    (media_folder / "sub" / "c.mp4").unlink()
    with pytest.raises(ValueError, match="holds no videos"):
        FolderDataset(media_folder, media="videos")


def test_folder_dataset_missing_captions(media_folder):
    (media_folder / "a.txt").write_text("only a")
    (media_folder / "b.txt").write_text("   ")  # blank is missing
    with pytest.raises(ValueError, match=r"2 files .* have no caption: b\.jpg, sub/c\.mp4"):
        FolderDataset(media_folder)
    data = FolderDataset(media_folder, skip_uncaptioned=True)
    assert len(data) == 1 and [os.path.basename(p) for p in data.skipped] == ["b.jpg", "c.mp4"]
    (media_folder / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="metadata.jsonl:1"):
        FolderDataset(media_folder, skip_uncaptioned=True)


# ------------------------------------------------------------------------------------------------------ loading


class IndexDataset:
    """Returns its index and the process that produced it (a worker's pid when num_workers > 0)."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        if not 0 <= i < 10:
            raise IndexError(f"no sample {i}")
        return {"index": i, "pid": os.getpid()}


def mark_transformed(sample):
    return {**sample, "transformed_in": os.getpid()}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_keeps_the_given_order(num_workers):
    schedule = [[5, 1], [3], [0, 0, 2], [9, 8, 7, 6, 5, 4], [1], [2, 3]]
    resume_at = 2  # a resumed run passes the batches from its step on, as a one-shot generator
    loader = DataLoaderWithSkips(IndexDataset(), (schedule[s] for s in range(resume_at, len(schedule))),
                                 num_workers=num_workers, transform=mark_transformed)
    batches = list(loader)
    assert [[s["index"] for s in batch] for batch in batches] == schedule[resume_at:]
    pids = {s["transformed_in"] for batch in batches for s in batch}
    assert (pids == {os.getpid()}) == (num_workers == 0)  # the transform runs in the workers
    assert loader.report.count == 0 and loader.report.batches == 4
    with pytest.raises(IndexError, match="no sample 10"):  # a bug is not a bad sample: it is not swallowed
        list(load_batches(IndexDataset(), [[1], [10]], num_workers=num_workers))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_skips_corrupt_media(media_folder, num_workers):
    good = media_folder / "sub" / "c.mp4"
    (media_folder / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    data = good.read_bytes()
    (media_folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    for path in ("a", "b", "sub/c", "noise", "truncated"):
        (media_folder / f"{path}.txt").write_text(f"caption of {path}")
    dataset = FolderDataset(media_folder, isolated=num_workers == 2)  # isolated decoding inside loader workers too
    names = [os.path.basename(p) for p in dataset.paths]
    assert names == ["a.png", "b.jpg", "noise.mp4", "truncated.mp4", "c.mp4"]
    messages = []
    loader = DataLoaderWithSkips(dataset, [[0, 2], [2, 3], [4, 1, 4]], num_workers=num_workers, log=messages.append)
    batches = list(loader)
    assert [[os.path.basename(s["path"]) for s in batch] for batch in batches] == [
        ["a.png"], [], ["c.mp4", "b.jpg", "c.mp4"],
    ]
    report = loader.report
    assert (report.count, report.empty_batches, report.batches) == (3, 1, 3)
    assert [(b.index, os.path.basename(b.path)) for b in report.examples] == [
        (2, "noise.mp4"), (2, "noise.mp4"), (3, "truncated.mp4"),
    ]
    assert all(b.reason.startswith("MediaDecodeError: ") for b in report.examples)
    assert "truncated.mp4" in report.examples[2].reason
    assert len(messages) == 4 and "all 2 samples failed" in messages[3]
    assert "3 bad samples skipped in 3 batches (1 left empty)" in str(report)


def test_loader_skips_clips_of_a_corrupt_lerobot_video(rolled_root, tmp_path):
    root = str(tmp_path / "ds")
    shutil.copytree(rolled_root, root)
    broken = f"{root}/videos/{FRONT}/chunk-000/file-001.mp4"  # episode 1's front camera only
    with open(broken, "r+b") as f:
        f.truncate(os.path.getsize(broken) // 3)
    data = LeRobotDataset(root, clip_frames=5, stride=4)
    episodes = [data.clip(i)[0] for i in range(len(data))]
    loader = load_batches(data, [list(range(len(data)))], num_workers=2, log=lambda message: None)
    (batch,) = list(loader)
    assert [s["episode_index"] for s in batch] == [e for e in episodes if e != 1]
    assert loader.report.count == episodes.count(1) == 3
    assert {b.path for b in loader.report.examples} == {broken}
