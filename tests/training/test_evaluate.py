"""Quality measurements: the scorer path reads generated images the way it reads renders, and the
forward-dynamics PSNR compares frames on the same canvas as its baselines."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cosmos3.testing import make_tiny_vae
from cosmos3.training import evaluate, synthetic


@pytest.fixture(scope="module")
def heldout_lines(tmp_path_factory):
    root = synthetic.write_folder_dataset(tmp_path_factory.mktemp("shapes") / "d", 2, 0, size=64, n_heldout=24)
    return synthetic.read_jsonl(f"{root}/heldout.jsonl")


class RenderingPipe:
    """Stands in for a text-to-image pipeline: draws each caption's clean render (or a flat image)."""

    def __init__(self, lines, flat=False):
        self.by_text = {line["text"]: line for line in lines}
        self.flat = flat
        self.calls = []

    def __call__(self, prompts, height, width, generator, output_type, **options):
        self.calls.append(options)
        images = [np.full((height, width, 3), 128, np.uint8) if self.flat else
                  synthetic.render_heldout(self.by_text[p], height, 1) for p in prompts]
        return SimpleNamespace(images=np.stack(images).astype(np.float32) / 255)


def test_prompt_faithfulness_scores_renders_high_and_flat_images_low(heldout_lines):
    perfect = evaluate.prompt_faithfulness(RenderingPipe(heldout_lines), heldout_lines, batch_size=5,
                                           num_inference_steps=4, guidance_scale=1.0)
    images = [line for line in heldout_lines if line["kind"] == "image"]
    assert perfect["n"] == len(images) > 0 and len(perfect["images"]) == len(images)
    assert perfect["accuracy"] >= 0.95 and perfect["render_accuracy"] == perfect["accuracy"]
    flat = evaluate.prompt_faithfulness(RenderingPipe(heldout_lines, flat=True), heldout_lines)
    assert flat["accuracy"] < 0.5 and flat["correct"] == 0.0
    assert set(perfect["per_attribute"]) == {"background", "color", "shape", "size", "position"}
    assert min(perfect["per_attribute"].values()) >= 0.9 and flat["per_attribute"]["color"] < 0.5
    with pytest.raises(ValueError, match="no held-out captions"):
        evaluate.prompt_faithfulness(RenderingPipe(heldout_lines), heldout_lines, kinds=("audio",))


class HoldPipe:
    """Stands in for the world-action pipeline: predicts that nothing moves (the first frame, held)."""

    def __init__(self):
        self.vae = make_tiny_vae().eval()

    def __call__(self, prompts, requests, fps, num_inference_steps, guidance_scale, output_type, generator):
        from cosmos3.conditioning import action_canvas

        frames = []
        for request in requests:
            assert request.mode == "forward_dynamics" and request.actions.shape == (request.chunk_size, 4)
            assert request.actions.abs().max() <= 1  # normalized
            canvas = action_canvas([request.image], request.resolution_tier, request.chunk_size + 1)[0][0]
            frames.append(((canvas.permute(1, 2, 3, 0) + 1) / 2).numpy())
        return SimpleNamespace(frames=np.stack(frames))


def test_forward_dynamics_psnr_compares_on_the_canvas(tmp_path):
    pytest.importorskip("metaworld")
    from cosmos3.tokenizers.action import ActionNormalizer
    from cosmos3.training.collect import collect

    root = tmp_path / "episodes"
    collect("metaworld:reach-v3", 2, root, image_size=128, progress=False, env_options={"render_quality": "fast"})
    normalizer = ActionNormalizer(mode="minmax").fit(torch.tensor([[-1.0] * 4, [1.0] * 4]))
    result = evaluate.forward_dynamics_psnr(HoldPipe(), normalizer, root, num_frames=5, batch_size=1)
    assert result["clips"] == 2 and set(result["per_task_psnr"]) == {"reach the goal position"}
    # a model that holds the first frame scores exactly the hold baseline: same frames, same canvas, same crop
    assert result["psnr"] == pytest.approx(result["hold_first_frame_psnr"], abs=0.05)
    assert 10 < result["hold_first_frame_psnr"] < 60 and np.isfinite(result["vae_round_trip_psnr"])


# ------------------------------------------------------------------------------------------------ edge agreement


def test_edge_f1_matches_within_one_pixel_only():
    square = np.zeros((2, 16, 16, 3), np.uint8)
    square[:, 4:12, 4] = square[:, 4:12, 11] = square[:, 4, 4:12] = square[:, 11, 4:12] = 255
    assert evaluate.edge_f1(square, square) == {"f1": 1.0, "precision": 1.0, "recall": 1.0}
    shifted = np.roll(square, 1, axis=2)
    assert evaluate.edge_f1(shifted, square)["f1"] == 1.0  # within the 3x3 tolerance
    assert evaluate.edge_f1(shifted, square, tolerance=0)["f1"] < 0.6
    assert evaluate.edge_f1(np.roll(square, 3, axis=2), square)["f1"] < 0.6
    empty = np.zeros_like(square)
    assert evaluate.edge_f1(empty, empty)["f1"] == 1.0
    assert evaluate.edge_f1(empty, square)["f1"] == evaluate.edge_f1(square, empty)["f1"] == 0.0
    with pytest.raises(ValueError, match="different shapes"):
        evaluate.edge_f1(square[:1], square)


@pytest.fixture(scope="module")
def shape_clips(tmp_path_factory):
    root = synthetic.write_folder_dataset(tmp_path_factory.mktemp("clips") / "d", 0, 1, size=64, frames=5,
                                          n_heldout=12)
    return root, *evaluate.heldout_clips(root, 4, size=64, frames=5)


class SourcePipe:
    """Stands in for the transfer pipeline: returns the clip its prompt was rendered from (`shift`: the clip of the
    prompt `shift` places further on), as floats in [0, 1]; checks each call got the clip's own edge map."""

    def __init__(self, clips, prompts, shift=0):
        from cosmos3.tokenizers.control import edge_map

        self.clips, self.prompts, self.shift = clips, list(prompts), shift
        self.edges = {p: edge_map(c) for c, p in zip(clips, prompts)}

    def __call__(self, prompts, control_videos, generator, height, width, num_inference_steps, guidance_scale,
                 control_guidance, fps, output_type):
        assert len(generator) == len(prompts) == len(control_videos) and output_type == "np"
        frames = []
        for prompt, hints in zip(prompts, control_videos):
            assert set(hints) == {"edge"} and np.array_equal(hints["edge"], self.edges[prompt])
            i = (self.prompts.index(prompt) + self.shift) % len(self.prompts)
            frames.append(self.clips[i].astype(np.float32) / 255)
        return SimpleNamespace(frames=np.stack(frames))


def test_position_agreement_finds_the_object_and_its_offset():
    clip = np.full((3, 64, 64, 3), 90, np.uint8)  # a flat grey background
    clip[:, 10:20, 30:40] = (250, 20, 20)  # a 10x10 red square
    assert evaluate.foreground(clip).sum() == 3 * 100
    assert evaluate.position_agreement(clip, clip) == {"iou": 1.0, "centroid_px": 0.0}
    moved = np.roll(clip, (3, 4), axis=(1, 2))
    score = evaluate.position_agreement(moved, clip)
    assert score["centroid_px"] == pytest.approx(5.0)  # a 3-4-5 shift
    assert score["iou"] == pytest.approx(42 / 158)  # 7x6 overlap of two 10x10 squares
    empty = np.full_like(clip, 90)
    assert evaluate.position_agreement(empty, clip) == {"iou": 0.0, "centroid_px": 32.0}
    with pytest.raises(ValueError, match="different shapes"):
        evaluate.position_agreement(clip[:2], clip)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        evaluate.foreground(clip[..., 0])


def test_edge_agreement_is_one_for_the_source_and_lower_for_other_clips(shape_clips):
    _, clips, prompts = shape_clips
    assert len(clips) == 4 and clips[0].shape == (5, 64, 64, 3) and clips[0].dtype == np.uint8
    same = evaluate.edge_agreement(SourcePipe(clips, prompts), clips, prompts, batch_size=3, round_trip=False)
    assert same["n"] == 4 and same["f1"] == 1.0 and same["per_clip_f1"] == [1.0] * 4
    assert all(np.array_equal(g, c) for g, c in zip(same["frames"], clips))
    other = evaluate.edge_agreement(SourcePipe(clips, prompts, shift=1), clips, prompts, round_trip=False)
    assert other["f1"] < 0.8 * same["f1"]
    # the shuffled baseline is exactly what a pipeline drawing the next clip gets
    assert other["f1"] == pytest.approx(same["shuffled"]["f1"])
    assert same["position"] == {"iou": 1.0, "centroid_px": 0.0}
    assert other["position"] == pytest.approx(same["position_shuffled"])
    with pytest.raises(ValueError, match="one prompt per clip"):
        evaluate.edge_agreement(SourcePipe(clips, prompts), clips, prompts[:2])


def test_edge_agreement_runs_a_tiny_random_model(shape_clips, tiny_tokenizer, tmp_path):
    from cosmos3.pipelines import Cosmos3TextToVideoPipeline, Cosmos3TransferPipeline
    from cosmos3.testing import save_tiny_pipeline, tiny_parts

    root, clips, prompts = shape_clips
    parts = tiny_parts(tiny_tokenizer)
    for cls, hint in ((Cosmos3TransferPipeline, True), (Cosmos3TextToVideoPipeline, False)):
        pipe = cls(**parts)
        pipe.set_progress_bar_config(disable=True)
        result = evaluate.edge_agreement(pipe, clips[:2], prompts[:2], hint=hint, num_inference_steps=2,
                                         guidance_scale=2.0)
        assert result["n"] == 2 and result["frames"][0].shape == clips[0].shape
        for figure in (result, result["shuffled"], result["vae_round_trip"]):
            assert all(0 <= figure[k] <= 1 for k in ("f1", "precision", "recall"))

    folder = save_tiny_pipeline(tmp_path / "tiny", tiny_tokenizer)
    cli = evaluate.main(["transfer", "--model", folder, "--data", root, "--n", "2", "--frames", "5", "--steps", "2",
                         "--save", str(tmp_path / "grid.png")])
    assert cli["n"] == 2 and 0 <= cli["f1"] <= 1 and "frames" not in cli
    assert (tmp_path / "grid.png").is_file()
