import pytest

from cosmos3.testing import save_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_policy_folder(tmp_path_factory, tiny_tokenizer):
    """A tiny random world-action checkpoint with a pusht policy config and normalizer."""
    import torch

    from cosmos3.robotics.policy import PolicyConfig
    from cosmos3.tokenizers.action import ActionNormalizer

    folder = tmp_path_factory.mktemp("policy") / "checkpoint"
    save_tiny_pipeline(folder, tiny_tokenizer, seed=3)
    PolicyConfig(embodiment="pusht", chunk_size=4, n_action_steps=2, num_inference_steps=2, resolution_tier=256,
                 fps=10.0).save(str(folder))
    normalizer = ActionNormalizer(mode="minmax", domain_name="pusht").fit(torch.tensor([[0.0, 0.0], [512.0, 512.0]]))
    normalizer.save(str(folder / "action_normalizer.json"))
    return folder
