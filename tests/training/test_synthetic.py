"""Synthetic captioned scenes: deterministic bytes, captions that parse back, a scorer that is right on clean renders
and rejects wrong captions, a folder FolderDataset reads, held-out compositions that training never shows."""

import json
import os

import numpy as np
import pytest

from cosmos3.training import synthetic
from cosmos3.training.datasets import FolderDataset


def scenes(n, video=False, seed=7):
    return [synthetic.sample_scene(np.random.default_rng((seed, int(video), i)), video=video) for i in range(n)]


def folder_bytes(root):
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_seed_same_bytes(tmp_path):
    a = synthetic.write_folder_dataset(tmp_path / "a", 5, 2, size=32, frames=5, seed=3, n_heldout=4)
    b = synthetic.write_folder_dataset(tmp_path / "b", 5, 2, size=32, frames=5, seed=3, n_heldout=4)
    c = synthetic.write_folder_dataset(tmp_path / "c", 5, 2, size=32, frames=5, seed=4, n_heldout=4)
    assert folder_bytes(a) == folder_bytes(b)
    assert folder_bytes(a)["metadata.jsonl"] != folder_bytes(c)["metadata.jsonl"]
    # Sample i does not depend on how many are written.
    d = synthetic.write_folder_dataset(tmp_path / "d", 3, 1, size=32, frames=5, seed=3, n_heldout=4)
    assert folder_bytes(d)["images/000002.png"] == folder_bytes(a)["images/000002.png"]


def test_captions_parse_back_to_their_attributes():
    for video in (False, True):
        templates = synthetic.VIDEO_TEMPLATES if video else synthetic.IMAGE_TEMPLATES
        for scene in scenes(150, video):
            for t in range(len(templates)):
                text = synthetic.caption(scene["attributes"], t)
                assert synthetic.parse_caption(text) == scene["attributes"], text
    assert synthetic.parse_caption("a large red circle on the left of a blue background") == {
        "background": "blue", "motion": None,
        "objects": [{"shape": "circle", "color": "red", "size": "large", "position": "left"}]}
    with pytest.raises(ValueError):
        synthetic.parse_caption("a cat on a sofa")


def test_scorer_is_right_on_clean_renders():
    images = [(synthetic.render_scene(s), s["attributes"]) for s in scenes(150)]
    clips = [(synthetic.render_scene(s, 64, 9), s["attributes"]) for s in scenes(20, video=True)]
    assert any(len(a["objects"]) == 2 for _, a in images)
    assert synthetic.accuracy(images) >= 0.95
    assert synthetic.accuracy(clips) >= 0.95


def _swap(attributes, key, rng):
    """The same attributes with one of them changed to another valid value."""
    wrong = json.loads(json.dumps(attributes))
    if key == "background":
        used = {o["color"] for o in attributes["objects"]}
        wrong["background"] = rng.choice([c for c in synthetic.BACKGROUND_COLORS
                                          if c != attributes["background"] and c not in used])
        return wrong
    if key == "motion":
        wrong["motion"] = rng.choice([d for d in synthetic.DIRECTIONS if d != attributes["motion"]])
        return wrong
    obj = wrong["objects"][0]
    if key == "color":
        taken = {o["color"] for o in attributes["objects"]} | {attributes["background"]}
        obj["color"] = rng.choice([c for c in synthetic.SHAPE_COLORS if c not in taken])
    else:
        values = {"shape": synthetic.SHAPES, "size": synthetic.SIZES, "position": synthetic.POSITIONS}[key]
        obj[key] = rng.choice([v for v in values if v != obj[key]])
    return wrong


def test_scorer_rejects_mismatched_captions():
    rng = np.random.default_rng(0)
    images = [(synthetic.render_scene(s), s["attributes"]) for s in scenes(60)]
    for key in ("color", "shape", "size", "position", "background"):
        rejected = [not synthetic.score_image(x, _swap(a, key, rng))["correct"] for x, a in images
                    if not (key == "position" and len(a["objects"]) == 2)]  # pairs' positions are fixed by layout
        assert np.mean(rejected) >= 0.95, key
    clips = [(synthetic.render_scene(s, 64, 9), s["attributes"]) for s in scenes(10, video=True)]
    for x, a in clips:
        result = synthetic.score_video(x, _swap(a, "motion", rng))
        assert not result["correct"] and not result["objects"][0]["motion"]


def test_folder_loads_with_folder_dataset_and_scores(tmp_path):
    root = synthetic.write_folder_dataset(tmp_path / "data", 8, 3, size=64, frames=9, n_heldout=6)
    data = FolderDataset(root, isolated=False)
    assert len(data) == 11
    lines = synthetic.read_jsonl(os.path.join(root, "metadata.jsonl"))
    by_name = {line["file_name"]: line for line in lines}
    for i in range(len(data)):
        sample = data[i]
        line = by_name[os.path.relpath(sample["path"], root)]
        assert sample["caption"] == line["text"]
        assert synthetic.parse_caption(sample["caption"]) == line["attributes"]
        if line["kind"] == "image":
            assert sample["frames"].shape == (1, 64, 64, 3) and sample["fps"] is None
            assert synthetic.score_image(sample["frames"][0], line["attributes"])["correct"]
        else:
            assert sample["frames"].shape == (9, 64, 64, 3) and sample["fps"] == 8.0
    with open(os.path.join(root, "dataset.json")) as f:
        assert json.load(f)["n_images"] == 8


def test_heldout_captions_never_in_training(tmp_path):
    root = synthetic.write_folder_dataset(tmp_path / "data", 300, 40, size=16, frames=5, n_heldout=40)
    train = synthetic.read_jsonl(os.path.join(root, "metadata.jsonl"))
    heldout = synthetic.read_jsonl(os.path.join(root, "heldout.jsonl"))
    assert len(heldout) == 40 and {h["kind"] for h in heldout} == {"image", "video"}
    train_keys = {synthetic.scene_key(line["attributes"]) for line in train}
    assert not any(synthetic.is_heldout(line["attributes"]) for line in train)
    for line in heldout:
        assert synthetic.is_heldout(line["attributes"])
        assert synthetic.scene_key(line["attributes"]) not in train_keys
        assert synthetic.parse_caption(line["text"]) == line["attributes"]
    # Every word of a held-out caption is seen in training: only the combination is new.
    vocabulary = {w for line in train for w in line["text"].replace(",", " ").split()}
    assert all(w in vocabulary for line in heldout for w in line["text"].replace(",", " ").split())
    # The reference render of a held-out line is the scene it describes.
    line = next(h for h in heldout if h["kind"] == "image")
    assert synthetic.score_image(synthetic.render_heldout(line, 64), line["attributes"])["correct"]


def test_writing_is_atomic(tmp_path, monkeypatch):
    from cosmos3 import io as media

    root = tmp_path / "data"
    synthetic.write_folder_dataset(root, 2, 0, size=16, n_heldout=2)
    with pytest.raises(FileExistsError):
        synthetic.write_folder_dataset(root, 2, 0, size=16)
    before = folder_bytes(root)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(media, "write_video", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.write_folder_dataset(root, 3, 1, size=16, overwrite=True)
    assert folder_bytes(root) == before  # the old folder is intact, and no partial one is left beside it
    assert sorted(os.listdir(tmp_path)) == ["data"]
