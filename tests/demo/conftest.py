import pytest
from diffusers import UniPCMultistepScheduler

from cosmos3 import Cosmos3Transformer
from cosmos3.testing import make_tiny_vae, randomize_


def _save_tiny_pipeline(folder, tokenizer, zero_text_head: bool = False, **overrides) -> None:
    import torch

    from cosmos3.pipelines import Cosmos3WorldActionPipeline

    model = randomize_(Cosmos3Transformer.from_preset("tiny", vocab_size=len(tokenizer), **overrides), seed=3, std=0.1)
    if zero_text_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    Cosmos3WorldActionPipeline(transformer=model, text_tokenizer=tokenizer, vae=make_tiny_vae(),
                               scheduler=scheduler).save_pretrained(str(folder))


@pytest.fixture(scope="session")
def demo_model_folder(tmp_path_factory, tiny_tokenizer):
    """A tiny random checkpoint that can do every tab: action heads, a chat template, a pusht policy config and
    an action normalizer (so the world-action tab reports actions in pusht's pixel units)."""
    import torch

    from cosmos3.robotics.policy import PolicyConfig
    from cosmos3.tokenizers.action import ActionNormalizer

    folder = tmp_path_factory.mktemp("demo") / "cosmos3-tiny"
    _save_tiny_pipeline(folder, tiny_tokenizer)
    PolicyConfig(embodiment="pusht", chunk_size=4, n_action_steps=2, num_inference_steps=2, resolution_tier=256,
                 fps=10.0).save(str(folder))
    normalizer = ActionNormalizer(mode="minmax", domain_name="pusht").fit(torch.tensor([[0.0, 0.0], [512.0, 512.0]]))
    normalizer.save(str(folder / "action_normalizer.json"))
    return folder


@pytest.fixture(scope="session")
def plain_model_folder(tmp_path_factory, tiny_tokenizer):
    """A generation-only checkpoint: no action heads and a zeroed text head. Two tabs must say so."""
    folder = tmp_path_factory.mktemp("demo-plain") / "no-actions"
    _save_tiny_pipeline(folder, tiny_tokenizer, zero_text_head=True, action_gen=False, action_dim=None,
                        sound_gen=False, sound_dim=None)
    return folder


@pytest.fixture(scope="session")
def demo_app(demo_model_folder):
    from cosmos3.demo import DemoApp

    return DemoApp(str(demo_model_folder), device="cpu")
