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
