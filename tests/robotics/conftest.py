import pytest
from diffusers import UniPCMultistepScheduler

from cosmos3 import Cosmos3Transformer
from cosmos3.testing import make_tiny_vae, randomize_


@pytest.fixture(scope="session")
def tiny_policy_folder(tmp_path_factory, tiny_tokenizer):
    """A tiny random world-action checkpoint with a pusht policy config and normalizer."""
    import torch

    from cosmos3.pipelines import Cosmos3WorldActionPipeline
    from cosmos3.robotics.policy import PolicyConfig
    from cosmos3.tokenizers.action import ActionNormalizer

    folder = tmp_path_factory.mktemp("policy") / "checkpoint"
    model = randomize_(Cosmos3Transformer.from_preset("tiny", vocab_size=len(tiny_tokenizer)), seed=3, std=0.1)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    Cosmos3WorldActionPipeline(transformer=model, text_tokenizer=tiny_tokenizer, vae=make_tiny_vae(),
                               scheduler=scheduler).save_pretrained(str(folder))
    PolicyConfig(embodiment="pusht", chunk_size=4, n_action_steps=2, num_inference_steps=2, resolution_tier=256,
                 fps=10.0).save(str(folder))
    normalizer = ActionNormalizer(mode="minmax", domain_name="pusht").fit(torch.tensor([[0.0, 0.0], [512.0, 512.0]]))
    normalizer.save(str(folder / "action_normalizer.json"))
    return folder
