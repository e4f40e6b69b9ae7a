"""ExampleEncoder: examples carry exactly what the pipelines feed the transformer for the same request (prompt ids,
layout, clean latents, actions), they load through DataLoaderWithSkips workers, and the trainer steps on them."""

import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cosmos3 import Cosmos3Transformer
from cosmos3.conditioning import tile_cameras
from cosmos3.io import write_image, write_video
from cosmos3.pipelines import (
    ActionRequest,
    Cosmos3ImageToVideoPipeline,
    Cosmos3TextToImagePipeline,
    Cosmos3TextToVideoPipeline,
    Cosmos3TransferPipeline,
    Cosmos3WorldActionPipeline,
)
from cosmos3.testing import make_tiny_vae, randomize_, tiny_parts
from cosmos3.tokenizers.action import ActionNormalizer
from cosmos3.tokenizers.control import blur_map, edge_map
from cosmos3.tokenizers.vision import Cosmos3VisionTokenizer, preprocess_image, preprocess_video
from cosmos3.training import TrainConfig, Trainer
from cosmos3.training.datasets import DataLoaderWithSkips, FolderDataset, LeRobotDataset, LeRobotDatasetWriter
from cosmos3.training.encode import ExampleEncoder, UnusableSampleError, normalizer_from_stats

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader forks after the tokenizer was used

EMBODIMENT = "bridge_orig_lerobot"  # 10 raw action channels
FRONT, WRIST = "observation.images.front", "observation.images.wrist"
LENGTHS = (9, 13, 17)
FAST = {"preset": "ultrafast", "crf": "10"}


def smooth_frames(seed, length, height, width):
    """Gradients that drift frame to frame: survive video coding, differ per frame and per seed."""
    y, x = np.mgrid[0:height, 0:width]
    out = []
    for t in range(length):
        channels = [(x * (2 + c) + y * (3 - c) + 7 * t + 40 * seed + 30 * c) % 220 for c in range(3)]
        out.append(np.stack(channels, -1))
    return np.asarray(out, np.uint8)


@pytest.fixture(scope="module")
def lerobot_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode") / "lerobot"
    features = {FRONT: {"dtype": "video", "shape": [32, 48, 3]}, WRIST: {"dtype": "video", "shape": [32, 32, 3]},
                "observation.state": {"dtype": "float32", "shape": [4]}, "action": {"dtype": "float32", "shape": [10]}}
    with LeRobotDatasetWriter(root, 10, features, video_options=FAST) as writer:
        for e, length in enumerate(LENGTHS):
            rng = np.random.default_rng(e)
            cams = {"front": smooth_frames(e, length, 32, 48), "wrist": smooth_frames(e + 5, length, 32, 32)}
            writer.add_episode(cams, actions=rng.normal(size=(length, 10)).astype(np.float32) * 3,
                               state=rng.normal(size=(length, 4)).astype(np.float32), task=f"pick block {e}")
    return str(root)


@pytest.fixture(scope="module")
def lerobot(lerobot_root):
    return LeRobotDataset(lerobot_root, clip_frames=9)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode") / "folder"
    root.mkdir()
    write_image(root / "a.png", smooth_frames(1, 1, 40, 56)[0])
    write_video(root / "b.mp4", smooth_frames(2, 11, 40, 56), 8.0, options=FAST)
    write_video(root / "c.mp4", smooth_frames(3, 9, 48, 40), 8.0, options=FAST)
    for name, caption in (("a", "a red cube"), ("b", "waves on the shore"), ("c", "a cat jumps")):
        (root / f"{name}.txt").write_text(caption)
    return str(root)


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae()


@pytest.fixture
def parts(tiny_tokenizer, vae):
    return tiny_parts(tiny_tokenizer, vae=vae)


@pytest.fixture(scope="module")
def normalizer(lerobot):
    return normalizer_from_stats(lerobot.stats, embodiment=EMBODIMENT)


class Captured(Exception):
    pass


def capture(pipeline_class, parts, *args, **kwargs):
    """Run a pipeline up to its first transformer call and return what that call got (layout, inputs)."""
    pipe = pipeline_class(**parts)
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def forward(layout, vision, timestep, sound=None, action=None, text_kv_cache=None, return_dict=True):
        # transfer passes one tensor per branch (control clips before the target), the others one batch
        vision = [v.float() for v in vision] if isinstance(vision, list) else vision.float()
        seen.update(layout=layout, vision=vision, action=None if action is None else action.float())
        raise Captured

    pipe.transformer.forward = forward
    with pytest.raises(Captured):
        pipe(*args, **{"num_inference_steps": 2, "output_type": "latent", **kwargs})
    return seen


def trainer_layout(model, example):
    """The layout the trainer builds for `example` (as `Trainer.loss` does)."""
    return model.build_layout([example.to_sample()])


def assert_same_conditioning(example, seen, model):
    """Same prompt ids, layout (positions, noisy frames and tokens, domain ids) and clean inputs as the pipeline."""
    pipe_layout, ours = seen["layout"], trainer_layout(model, example)
    sample, expected = pipe_layout.samples[0], example.to_sample()
    assert list(example.text_ids) == list(sample.text_ids)
    # without control clips the vision segment is the example's own latents; with them `[controls | target]`
    assert tuple(expected.vision_shape) == tuple(sample.vision_shape)
    assert tuple(expected.vision_shape[1:]) == tuple(example.vision.shape[2:])
    assert expected.vision_condition_frames == tuple(sample.vision_condition_frames)
    assert expected.vision_items == sample.vision_items
    for name in ("text_ids", "und_position_ids", "gen_position_ids", "vision_noisy_index", "action_index",
                 "action_noisy_index", "action_domain_ids"):
        assert torch.equal(getattr(ours, name), getattr(pipe_layout, name)), name
    assert ours.vision_grids == pipe_layout.vision_grids
    clean = list(example.vision_condition_frames)
    offset = 0
    if example.control is not None:  # every control frame is given clean, first, in the pipeline's hint order
        offset = example.control.shape[0] * example.vision.shape[1]
        torch.testing.assert_close(torch.cat(list(example.control), dim=1), seen["vision"][0][:, :offset], rtol=0,
                                   atol=1e-6)
    if clean:
        given = [offset + f for f in clean]
        torch.testing.assert_close(example.vision[:, clean], seen["vision"][0][:, given], rtol=0, atol=1e-6)
    if example.action is not None:
        assert sample.action_length == example.action.shape[0]
        assert example.action_condition_frames == tuple(sample.action_condition_frames)
        assert example.action_domain_id == sample.action_domain_id
        raw = example.raw_action_dim
        assert seen["action"][0][:, raw:].abs().max() == 0 and example.action[:, raw:].abs().max() == 0
        given = list(example.action_condition_frames)
        if given:
            torch.testing.assert_close(example.action[given], seen["action"][0][given], rtol=0, atol=1e-6)


def encode_pixels(vae, frames, height, width):
    pixels = torch.cat([preprocess_image(f, height, width) for f in frames]).permute(1, 0, 2, 3)[None]
    return Cosmos3VisionTokenizer(vae).encode(pixels)[0]


# ------------------------------------------------------------------------------------------ text and image tasks


def test_t2i_t2v_i2v_match_the_pipelines(parts, tiny_tokenizer, vae, folder_root):
    data = FolderDataset(folder_root, isolated=False)
    image, video = data[0], data[1]
    size = dict(height=32, width=48)

    t2i = ExampleEncoder(vae, tiny_tokenizer, task="t2i", **size)(image)
    seen = capture(Cosmos3TextToImagePipeline, parts, image["caption"], guidance_scale=1.0, **size)
    assert_same_conditioning(t2i, seen, parts["transformer"])
    assert t2i.vision.shape == (8, 1, 2, 3) and t2i.fps is None  # one frame: fps has no effect on the layout
    torch.testing.assert_close(t2i.vision, encode_pixels(vae, image["frames"], **size), rtol=0, atol=0)

    clip = dict(num_frames=9, fps=video["fps"], guidance_scale=1.0, **size)
    t2v = ExampleEncoder(vae, tiny_tokenizer, task="t2v", num_frames=9, **size)(video)
    assert t2v.fps == 8.0 and t2v.vision_condition_frames == ()
    seen = capture(Cosmos3TextToVideoPipeline, parts, video["caption"], **clip)
    assert_same_conditioning(t2v, seen, parts["transformer"])
    torch.testing.assert_close(t2v.vision, encode_pixels(vae, video["frames"][:9], **size), rtol=0, atol=0)

    i2v = ExampleEncoder(vae, tiny_tokenizer, task="i2v", num_frames=9, **size)(video)
    seen = capture(Cosmos3ImageToVideoPipeline, parts, video["frames"][0], video["caption"], **clip)
    assert i2v.vision_condition_frames == (0,)
    assert_same_conditioning(i2v, seen, parts["transformer"])  # includes latent frame 0 == the pipeline's image
    torch.testing.assert_close(i2v.vision, t2v.vision, rtol=0, atol=0)


def test_prompt_options_and_caption_dropout_follow_the_pipeline(parts, tiny_tokenizer, vae, folder_root):
    data = FolderDataset(folder_root, isolated=False)
    video = data[1]
    size = dict(height=32, width=48, num_frames=5)
    enc = ExampleEncoder(vae, tiny_tokenizer, task="t2v", use_system_prompt=False, add_duration_template=False,
                         fps=12.0, caption_dropout=0.5, **size)
    seen = capture(Cosmos3TextToVideoPipeline, parts, video["caption"], guidance_scale=2.0, fps=12.0,
                   use_system_prompt=False, add_duration_template=False, **size)
    cond, uncond = (list(s.text_ids) for s in seen["layout"].samples)
    samples = [{**video, "path": f"clip{i}.mp4"} for i in range(40)]
    ids = [list(enc(s).text_ids) for s in samples[:12]]
    assert all(i in (cond, uncond) for i in ids) and cond in ids and uncond in ids
    assert ids == [list(enc(s).text_ids) for s in samples[:12]]  # keyed by the sample: the same every time


# ------------------------------------------------------------------------------------------ transfer


def transfer_capture(parts, caption, frames, hints, **kwargs):
    """What the transfer pipeline feeds its transformer for `frames` with `hints` computed as the user would (the
    maps of `cosmos3.tokenizers.control`, uint8, given as `control_videos`), without guidance passes."""
    maps = {"edge": edge_map, "blur": blur_map}
    controls = {name: maps[name](frames) for name in hints}
    return capture(Cosmos3TransferPipeline, parts, caption, control_videos=controls, guidance_scale=1.0,
                   output_type="pt", **kwargs)


def test_transfer_matches_the_pipeline(parts, tiny_tokenizer, vae, folder_root, lerobot):
    data = FolderDataset(folder_root, isolated=False)
    video, size = data[1], dict(height=32, width=48)
    # given blur first: both lay the hints out in the pipeline's order (edge, blur)
    enc = ExampleEncoder(vae, tiny_tokenizer, task="transfer", hints=("blur", "edge"), num_frames=9, **size)
    example = enc(video)
    assert enc.hints == ("edge", "blur")
    assert example.control.shape == (2, 8, 3, 2, 3) and example.vision.shape == (8, 3, 2, 3)
    assert example.fps == 8.0 and example.vision_condition_frames == ()  # the target: nothing clean
    seen = transfer_capture(parts, video["caption"], video["frames"][:9], ("blur", "edge"), num_frames=9, fps=8.0,
                            **size)
    assert_same_conditioning(example, seen, parts["transformer"])
    assert example.to_sample().vision_condition_frames == tuple(range(6))  # both controls clean, target noisy
    # the target takes the hints' resize (the pipeline's `video` path), so each pixel sits under its own edges
    target = preprocess_video(video["frames"][:9], height=32, width=48)
    torch.testing.assert_close(example.vision, Cosmos3VisionTokenizer(vae).encode(target)[0], rtol=0, atol=0)
    t2v = ExampleEncoder(vae, tiny_tokenizer, task="t2v", num_frames=9, **size)(video)
    assert example.text_ids != t2v.text_ids  # the transfer system prompt, no metadata sentences

    # a LeRobot clip (cameras tiled), and a single frame (an image: no frame rate, the pipeline's 24)
    robot = ExampleEncoder(vae, tiny_tokenizer, task="transfer", num_frames=5, height=32, width=80)(lerobot[1])
    seen = transfer_capture(parts, lerobot[1]["task"], tile_cameras(lerobot[1]["frames"])[:5], ("edge",),
                            num_frames=5, fps=10.0, height=32, width=80)
    assert_same_conditioning(robot, seen, parts["transformer"])
    assert robot.control.shape == (1, 8, 2, 2, 5)
    image = data[0]
    one = ExampleEncoder(vae, tiny_tokenizer, task="transfer", hints="edge", num_frames=1, **size)(image)
    seen = transfer_capture(parts, image["caption"], image["frames"], ("edge",), **size)
    assert_same_conditioning(one, seen, parts["transformer"])
    assert one.fps == 24.0 and one.control.shape == (1, 8, 1, 2, 3)


def test_control_dropout_drops_the_hints_per_sample(parts, tiny_tokenizer, vae, folder_root):
    video = FolderDataset(folder_root, isolated=False)[1]
    size = dict(task="transfer", height=32, width=48, num_frames=5)
    samples = [{**video, "path": f"clip{i}.mp4"} for i in range(12)]
    keep = ExampleEncoder(vae, tiny_tokenizer, **size)
    drop = ExampleEncoder(vae, tiny_tokenizer, control_dropout=0.5, caption_dropout=0.5, **size)
    full, examples = [keep(s) for s in samples], [drop(s) for s in samples]
    dropped = [ex.control is None for ex in examples]
    assert any(dropped) and not all(dropped)
    assert dropped == [drop(s).control is None for s in samples]  # keyed by the sample: the same every time
    assert dropped == [pickle.loads(pickle.dumps(drop))(s).control is None for s in samples]
    uncond = [ex.text_ids != f.text_ids for ex, f in zip(examples, full)]
    assert any(uncond) and uncond != dropped  # caption dropout draws from its own stream
    for ex, f, gone in zip(examples, full, dropped):
        assert torch.equal(ex.vision, f.vision)
        if gone:  # what the pipeline's "no control" pass feeds: the target alone, same prompt
            a, b = ex.to_sample(), f.to_sample(controls=False)
            assert (a.vision_shape, a.vision_condition_frames, a.vision_items) == (
                b.vision_shape, b.vision_condition_frames, b.vision_items)
        else:
            assert torch.equal(ex.control, f.control)
    assert dropped != [ExampleEncoder(vae, tiny_tokenizer, control_dropout=0.5, seed=1, **size)(s).control is None
                       for s in samples]


# ------------------------------------------------------------------------------------------ world-action tasks

# World-action clips are encoded on the 256 tier's canvas (at least 192 x 320 pixels): each encode costs about a
# second on CPU, so examples are computed once per (mode, clip) and shared by the tests below.
CHUNK = 4


@pytest.fixture(scope="module")
def world(tiny_tokenizer, vae, lerobot, normalizer):
    """`world.kw`: the encoder options; `world.encoder(task)`, `world.example(mode, i)` (cached)."""

    class World:
        kw = dict(num_frames=CHUNK + 1, embodiment=EMBODIMENT, action_normalizer=normalizer, action_dim=16,
                  resolution_tier=256)
        cache: dict = {}

        def encoder(self, task, **kw):
            return ExampleEncoder(vae, tiny_tokenizer, task=task, **{**self.kw, **kw})

        def example(self, mode, i):
            if (mode, i) not in self.cache:
                self.cache[mode, i] = self.encoder(mode)(lerobot[i])
            return self.cache[mode, i]

    return World()


@pytest.mark.parametrize("mode", ["policy", "forward_dynamics", "inverse_dynamics"])
def test_world_action_modes_match_the_pipeline(parts, world, lerobot, normalizer, mode):
    sample = lerobot[1]
    example = world.example(mode, 1)
    # The same request at inference: the tiled frames as PIL images, normalized actions, the dataset's fps.
    frames = [Image.fromarray(f) for f in tile_cameras(sample["frames"])[: CHUNK + 1]]
    actions = normalizer.normalize(torch.from_numpy(sample["action"][:CHUNK]))
    request = ActionRequest(
        mode=mode, chunk_size=CHUNK, domain_name=EMBODIMENT, resolution_tier=256, view_point="concat_view",
        image=frames[0] if mode != "inverse_dynamics" else None,
        video=frames if mode == "inverse_dynamics" else None,
        actions=actions if mode == "forward_dynamics" else None,
    )
    seen = capture(Cosmos3WorldActionPipeline, parts, sample["task"], request, fps=sample["fps"])
    assert_same_conditioning(example, seen, parts["transformer"])
    assert example.fps == 10.0 and example.raw_action_dim == 10 and example.action.shape == (CHUNK, 16)
    assert example.action_domain_id == 7
    torch.testing.assert_close(example.action[:, :10], actions, rtol=0, atol=0)
    assert example.vision_condition_frames == ((0, 1) if mode == "inverse_dynamics" else (0,))
    assert example.action_condition_frames == (tuple(range(CHUNK)) if mode == "forward_dynamics" else ())


def test_world_action_latents_are_the_whole_clip_on_the_pipeline_canvas(world):
    """Policy examples train the future frames: the clip's own frames (as inverse dynamics is given them), not the
    first frame held, which is what inference starts from."""
    assert torch.equal(world.example("inverse_dynamics", 1).vision, world.example("policy", 1).vision)
    assert world.example("policy", 1).vision.shape == (8, 2, 2, 5)  # 32 x 80 tiled content, canvas cropped off


def test_mixed_modes_are_seeded_per_sample(world, lerobot):
    enc = world.encoder("mixed")
    keys = [{"frames": {}, "episode_index": e, "frame_index": f} for e in range(10) for f in range(0, 40, 8)]
    modes = [enc.mode_of(k) for k in keys]
    assert set(modes) == {"policy", "forward_dynamics", "inverse_dynamics"}
    assert modes == [pickle.loads(pickle.dumps(enc)).mode_of(k) for k in keys]
    assert modes != [world.encoder("mixed", seed=1).mode_of(k) for k in keys]
    only = world.encoder("mixed", mode_weights={"forward_dynamics": 1})
    assert {only.mode_of(k) for k in keys} == {"forward_dynamics"}
    example, single = enc(lerobot[1]), world.example(enc.mode_of(lerobot[1]), 1)
    assert example.text_ids == single.text_ids and torch.equal(example.vision, single.vision)
    assert example.vision_condition_frames == single.vision_condition_frames
    assert example.action_condition_frames == single.action_condition_frames
    assert torch.equal(example.action, single.action)


def test_normalizer_from_stats_equals_fitting_the_actions(lerobot_root, normalizer):
    # one-frame clips with their own action: every recorded action once, which is what meta/stats.json covers
    data = LeRobotDataset(lerobot_root, clip_frames=1, include_last_action=True, cameras=[])
    actions = torch.from_numpy(np.stack([data[i]["action"] for i in range(len(data))]))
    fitted = ActionNormalizer("quantile", domain_name=EMBODIMENT).fit(actions.reshape(-1, 10))
    for name in ("low", "high"):
        torch.testing.assert_close(normalizer.stats[name], fitted.stats[name], rtol=1e-6, atol=1e-6)
    meanstd = normalizer_from_stats(data.stats, mode="meanstd")
    torch.testing.assert_close(meanstd.stats["mean"], actions.double().reshape(-1, 10).mean(0), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ loading and training


def test_loader_workers_yield_examples_the_trainer_steps_on(tmp_path, tiny_tokenizer, vae, world, lerobot,
                                                            folder_root):
    enc = world.encoder("mixed")
    robot = [ex for batch in DataLoaderWithSkips(lerobot, [[0, 1], [2, 3]], num_workers=2, transform=enc)
             for ex in batch]
    assert len(robot) == 4
    ex, again = robot[1], world.example(enc.mode_of(lerobot[1]), 1)  # workers computed what this process does
    assert ex.text_ids == again.text_ids and torch.equal(ex.vision, again.vision)
    assert torch.equal(ex.action, again.action) and ex.action_condition_frames == again.action_condition_frames

    folder = FolderDataset(folder_root, isolated=False)
    t2v = ExampleEncoder(vae, tiny_tokenizer, task="t2v", height=32, width=48, num_frames=9)
    loader = DataLoaderWithSkips(folder, [[0, 1, 2]], num_workers=2, transform=t2v, log=lambda message: None)
    (videos,) = list(loader)
    assert len(videos) == 2 and all(v.vision.shape == (8, 3, 2, 3) for v in videos)
    assert loader.report.count == 1 and "UnusableSampleError" in loader.report.examples[0].reason  # the image
    images = [ExampleEncoder(vae, tiny_tokenizer, task="t2i", height=32, width=32)(folder[i]) for i in range(3)]

    model = randomize_(Cosmos3Transformer.from_preset("tiny", vocab_size=len(tiny_tokenizer)), seed=0, std=0.1)
    examples = robot + videos + images
    trainer = Trainer(model, examples, TrainConfig(output_dir=str(tmp_path), batch_size=len(examples), max_steps=1),
                      log=lambda record: None)
    record = trainer.train_step()
    assert math.isfinite(record["loss"]) and "skipped" not in record
    assert {"loss_vision", "loss_action"} <= set(record)


def test_from_pretrained_reads_the_pipeline_folder(tmp_path, parts, tiny_tokenizer, folder_root, normalizer):
    Cosmos3WorldActionPipeline(**parts, default_use_system_prompt=False).save_pretrained(tmp_path / "pipe")
    video = FolderDataset(folder_root, isolated=False)[1]
    kw = dict(task="t2v", num_frames=5, height=32, width=48)
    loaded = ExampleEncoder.from_pretrained(tmp_path / "pipe", **kw)
    assert loaded.use_system_prompt is False
    direct = ExampleEncoder(parts["vae"], tiny_tokenizer, use_system_prompt=False, **kw)
    a, b = loaded(video), direct(video)
    assert a.text_ids == b.text_ids and torch.equal(a.vision, b.vision)
    policy = ExampleEncoder.from_pretrained(tmp_path / "pipe", task="policy", num_frames=5, embodiment=EMBODIMENT,
                                            action_normalizer=normalizer)
    assert policy.action_dim == 16  # the transformer's, from transformer/config.json
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        ExampleEncoder.from_pretrained(tmp_path, **kw)


def test_pickled_encoder_encodes_the_same(world, lerobot):
    copy = pickle.loads(pickle.dumps(world.encoder("forward_dynamics")))
    a, b = world.example("forward_dynamics", 1), copy(lerobot[1])
    assert a.text_ids == b.text_ids and torch.equal(a.vision, b.vision) and torch.equal(a.action, b.action)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(task="t2x", height=32, width=32), ValueError, r"`task` must be one of \['t2i', 't2v', 'i2v'"),
        (dict(task="t2v", height=32, width=32, num_frames=8), ValueError, r"`num_frames` must be 1 \+ 4k, got 8"),
        (dict(task="t2v", height=32, width=32), ValueError, r"`num_frames` must be a positive int, got None"),
        (dict(task="t2i", height=32, width=32, num_frames=5), ValueError, "must be 1 for task 't2i'"),
        (dict(task="i2v", height=32, width=32, num_frames=1), ValueError, "must be > 1 for task 'i2v'"),
        (dict(task="t2v", height=40, width=32, num_frames=5), ValueError,
         r"`height` must be a multiple of 16, got 40 \(nearest: 32, 48\)"),
        (dict(task="t2i", height=32), ValueError, "`width` must be a multiple of 16, got None"),
        (dict(task="policy", num_frames=9), ValueError, "needs `embodiment`"),
        (dict(task="policy", num_frames=9, embodiment="robot9000"), ValueError, "Unknown action `domain_name`"),
        (dict(task="policy", num_frames=9, embodiment="libero"), ValueError, "no fixed action width"),
        (dict(task="policy", num_frames=9, embodiment="hand_pose"), ValueError, "57 wide, over `action_dim`=16"),
        (dict(task="policy", num_frames=9, embodiment=EMBODIMENT), ValueError, "needs `action_normalizer`"),
        (dict(task="policy", num_frames=9, embodiment="pusht", action_normalizer="N"), ValueError,
         "is 10 wide, but `embodiment` 'pusht' actions are 2 wide"),
        (dict(task="policy", num_frames=9, embodiment=EMBODIMENT, action_normalizer="N", height=32, width=32),
         ValueError, "pass `resolution_tier` instead"),
        (dict(task="policy", num_frames=9, embodiment=EMBODIMENT, action_normalizer="N", resolution_tier=300),
         ValueError, r"`resolution_tier` must be one of \[64, 128, 256, 480, 704, 720\]"),
        (dict(task="policy", num_frames=9, embodiment=EMBODIMENT, action_normalizer="N", view_point="top"),
         ValueError, "`view_point` must be one of"),
        (dict(task="policy", num_frames=9, embodiment=EMBODIMENT, action_normalizer="N", mode_weights={"p": 1}),
         ValueError, "only applies to task 'mixed'"),
        (dict(task="mixed", num_frames=9, embodiment=EMBODIMENT, action_normalizer="N", mode_weights={"fly": 1}),
         ValueError, "unknown modes"),
        (dict(task="t2v", height=32, width=32, num_frames=5, embodiment=EMBODIMENT), ValueError,
         "only apply to the world-action tasks"),
        (dict(task="t2v", height=32, width=32, num_frames=5, caption_dropout=1.0), ValueError, "`caption_dropout`"),
        (dict(task="t2v", height=32, width=32, num_frames=5, fps=0), ValueError, "`fps` must be a positive"),
        (dict(task="t2v", height=32, width=32, num_frames=5, cameras=[""]), TypeError, "`cameras` must be"),
        (dict(task="t2v", height=32, width=32, num_frames=5, use_system_prompt=1), TypeError, "`use_system_prompt`"),
        (dict(task="transfer", height=32, width=32, num_frames=5, hints=("edge", "depth")), ValueError,
         r"`hints` has \['depth'\] \(\['depth'\] are not computable from the clip: give them to the pipeline "
         r"instead\); valid \(computable from the clip\): \['edge', 'blur'\]"),
        (dict(task="transfer", height=32, width=32, num_frames=5, hints=("sobel",)), ValueError,
         r"`hints` has \['sobel'\]; valid \(computable from the clip\): \['edge', 'blur'\]"),
        (dict(task="transfer", height=32, width=32, num_frames=5, hints=()), TypeError, "`hints` must be a non-empty"),
        (dict(task="transfer", height=32, width=32, num_frames=5, hints=("edge", "edge")), ValueError, "twice"),
        (dict(task="transfer", height=32, width=32, num_frames=5, control_dropout=1.0), ValueError,
         r"`control_dropout` must be a number in \[0, 1\), got 1.0"),
        (dict(task="transfer", height=32, width=32, num_frames=5, control_dtype=torch.int8), TypeError,
         "`control_dtype` must be a floating torch.dtype"),
        (dict(task="t2v", height=32, width=32, num_frames=5, hints=("edge",), control_dropout=0.1), ValueError,
         r"\['hints', 'control_dropout'\] only apply to task 'transfer', not 't2v'"),
        (dict(task="transfer", num_frames=5), ValueError, "`height` must be a multiple of 16, got None"),
    ],
)
def test_bad_options_are_named(tiny_tokenizer, vae, normalizer, kwargs, error, match):
    if kwargs.get("action_normalizer") == "N":
        kwargs = {**kwargs, "action_normalizer": normalizer}
    with pytest.raises(error, match=match):
        ExampleEncoder(vae, tiny_tokenizer, action_dim=16, **kwargs)


def test_bad_components_and_samples(tiny_tokenizer, vae, world, lerobot, normalizer):
    with pytest.raises(TypeError, match="`vae` must be"):
        ExampleEncoder(torch.nn.Linear(2, 2), tiny_tokenizer, task="t2i", height=32, width=32)
    with pytest.raises(TypeError, match="`text_tokenizer` must be"):
        ExampleEncoder(vae, object(), task="t2i", height=32, width=32)
    with pytest.raises(TypeError, match="`action_normalizer` must be an ActionNormalizer"):
        ExampleEncoder(vae, tiny_tokenizer, task="policy", num_frames=9, embodiment=EMBODIMENT,
                       action_normalizer={"q01": 0}, action_dim=16)
    with pytest.raises(ValueError, match="not fitted"):
        ExampleEncoder(vae, tiny_tokenizer, task="policy", num_frames=9, embodiment=EMBODIMENT,
                       action_normalizer=ActionNormalizer(), action_dim=16)
    enc = world.encoder("policy")
    sample = lerobot[0]
    with pytest.raises(ValueError, match=r"takes \[T, 10\] actions"):  # a configuration error: not skipped
        enc({**sample, "action": sample["action"][:, :7]})
    with pytest.raises(UnusableSampleError, match="3 actions, fewer than the 4"):
        enc({**sample, "action": sample["action"][:3]})
    with pytest.raises(UnusableSampleError, match="4 frames, fewer than `num_frames`=5"):
        enc({**sample, "frames": {k: v[:4] for k, v in sample["frames"].items()}})
    with pytest.raises(ValueError, match="`cameras` entry 'side' names 0"):
        ExampleEncoder(vae, tiny_tokenizer, task="t2v", height=32, width=32, num_frames=9, cameras=["side"])(sample)
    with pytest.raises(ValueError, match="needs LeRobotDataset samples with `action`"):
        enc({"frames": np.zeros((9, 32, 32, 3), np.uint8), "caption": "x", "fps": 8.0, "path": "x.mp4"})
