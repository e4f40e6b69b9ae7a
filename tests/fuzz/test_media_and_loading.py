"""Media readers and checkpoint loaders under corrupt files: a clear error (or a valid result), never a crash."""

import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosmos3 import io as cio

from .conftest import outcome

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
CLEAR_MEDIA = (cio.MediaDecodeError,)


@SETTINGS
@given(data=st.binary(max_size=2048), ext=st.sampled_from([".mp4", ".png", ".jpg", ".wav", ".webm", ".bin"]),
       reader=st.sampled_from(["read_video", "read_image", "read_audio", "probe_video"]))
def test_readers_on_random_bytes(tmp_path_factory, data, ext, reader):
    path = tmp_path_factory.mktemp("media") / f"x{ext}"
    path.write_bytes(data)
    outcome(lambda: getattr(cio, reader)(path))  # MediaDecodeError is a ValueError: a clear error


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    from cosmos3.pipelines import Cosmos3TextToVideoPipeline
    from cosmos3.testing import save_tiny_pipeline

    folder = tmp_path_factory.mktemp("ckpt") / "pipe"
    return save_tiny_pipeline(folder, tiny_tokenizer, pipeline_class=Cosmos3TextToVideoPipeline)


JSON_FILES = ["model_index.json", "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json"]


@SETTINGS
@given(file=st.sampled_from(JSON_FILES), key=st.sampled_from(["z_dim", "num_train_timesteps", "hidden_size",
                                                              "num_hidden_layers", "base_dim", "_class_name",
                                                              "flow_shift", "new_key"]),
       value=st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=4), st.lists(st.integers(), max_size=2),
                       st.floats(allow_nan=True)))
def test_loading_folders_with_broken_configs(tmp_path_factory, saved, file, key, value):
    from cosmos3.pipelines import Cosmos3TextToVideoPipeline

    folder = tmp_path_factory.mktemp("broken") / "pipe"
    shutil.copytree(saved, folder)
    path = os.path.join(folder, file)
    with open(path) as f:
        config = json.load(f)
    if key not in config and key != "new_key":
        return
    config[key] = value
    with open(path, "w") as f:
        json.dump(config, f)
    outcome(lambda: Cosmos3TextToVideoPipeline.from_pretrained(str(folder)))


@SETTINGS
@given(damage=st.sampled_from(["truncate", "garbage", "delete", "empty"]),
       file=st.sampled_from(["transformer/diffusion_pytorch_model.safetensors",
                             "vae/diffusion_pytorch_model.safetensors",
                             "model_index.json", "transformer/config.json"]))
def test_loading_damaged_files(tmp_path_factory, saved, damage, file):
    from cosmos3.pipelines import Cosmos3TextToVideoPipeline

    folder = tmp_path_factory.mktemp("damaged") / "pipe"
    shutil.copytree(saved, folder)
    path = os.path.join(folder, file)
    if damage == "delete":
        os.remove(path)
    else:
        size = os.path.getsize(path)
        with open(path, "r+b" if damage != "empty" else "wb") as f:
            if damage == "truncate":
                f.truncate(size // 2)
            elif damage == "garbage":
                f.write(b"\x00\xff" * 64)
    outcome(lambda: Cosmos3TextToVideoPipeline.from_pretrained(str(folder)))
