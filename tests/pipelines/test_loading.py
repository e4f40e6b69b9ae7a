"""`from_pretrained` resolves the dtype keyword (`dtype`, deprecated `torch_dtype`, per-component dicts) for our
transformer exactly as diffusers resolves it for the components it loads itself."""

import shutil

import pytest
import torch
from diffusers import Cosmos3OmniPipeline

from cosmos3 import Cosmos3Transformer
from cosmos3.pipelines import Cosmos3TextToVideoPipeline
from cosmos3.testing import save_tiny_pipeline

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_tokenizer):
    """A tiny random pipeline folder in the reference layout, saved in float32."""
    folder = tmp_path_factory.mktemp("loading") / "pipeline"
    save_tiny_pipeline(folder, tiny_tokenizer, pipeline_class=Cosmos3TextToVideoPipeline, sound=True)
    return folder


DTYPE_FORMS = {
    "none": ({}, FP32),
    "torch_dtype": ({"torch_dtype": BF16}, BF16),
    "dtype": ({"dtype": BF16}, BF16),
    "dict_transformer_key": ({"dtype": {"transformer": BF16, "default": FP32}}, BF16),
    "dict_default_only": ({"dtype": {"default": BF16}}, BF16),
    "dict_other_component": ({"dtype": {"vae": BF16}}, FP32),
    "dict_per_component": ({"dtype": {"vae": BF16, "transformer": torch.float16}}, torch.float16),
    "torch_dtype_dict": ({"torch_dtype": {"transformer": BF16, "default": FP32}}, BF16),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # `torch_dtype` is deprecated in diffusers
@pytest.mark.parametrize("form", list(DTYPE_FORMS))
def test_transformer_loads_in_the_requested_dtype_as_diffusers_resolves_it(tiny_folder, form):
    kwargs, expected = DTYPE_FORMS[form]
    pipe = Cosmos3TextToVideoPipeline.from_pretrained(str(tiny_folder), **kwargs)
    reference = Cosmos3OmniPipeline.from_pretrained(str(tiny_folder), enable_safety_checker=False, **kwargs)
    assert isinstance(pipe.transformer, Cosmos3Transformer)
    assert pipe.transformer.dtype == expected, f"{form}: transformer is {pipe.transformer.dtype}, asked {expected}"
    assert pipe.transformer.dtype == reference.transformer.dtype
    # the keyword reaches diffusers: the components it loads get what diffusers gives them
    assert pipe.vae.dtype == reference.vae.dtype
    assert pipe.sound_tokenizer.dtype == reference.sound_tokenizer.dtype


def test_policy_loads_a_bfloat16_transformer(tiny_folder, tmp_path):
    from cosmos3.robotics.policy import Cosmos3Policy, PolicyConfig

    folder = tmp_path / "policy"
    shutil.copytree(tiny_folder, folder)
    PolicyConfig(embodiment="pusht", chunk_size=4, n_action_steps=2, num_inference_steps=2).save(str(folder))
    policy = Cosmos3Policy.from_pretrained(str(folder), device="cpu", dtype=BF16)
    assert policy.pipeline.transformer.dtype == BF16
    assert policy.pipeline.vae.dtype == BF16


@pytest.mark.parametrize("form", ["dtype", "dict_transformer_key", "dict_default_only", "torch_dtype"])
def test_text_generation_reads_the_dtype_keyword_too(tiny_folder, form):
    from cosmos3.pipelines import Cosmos3TextGenerationPipeline

    kwargs, expected = DTYPE_FORMS[form]
    assert Cosmos3TextGenerationPipeline.from_pretrained(str(tiny_folder), **kwargs).transformer.dtype == expected


@pytest.mark.parametrize("part,file,edit,match", [
    ("vae", "config.json", {"base_dim": "eight", "made_up_key": 1}, r"vae/config.json: `base_dim` must be a int"),
    ("vae", "config.json", {"z_dim": 0}, r"vae/config.json: `z_dim` must be > 0, got 0"),
    ("scheduler", "scheduler_config.json", {"num_train_timesteps": -5},
     r"scheduler/scheduler_config.json: `num_train_timesteps` must be > 0, got -5"),
    ("scheduler", "scheduler_config.json", {"use_flow_sigmas": "yes"}, r"`use_flow_sigmas` must be a bool"),
])
def test_broken_component_configs_are_refused_at_load_time(tiny_folder, tmp_path, part, file, edit, match):
    import json

    folder = tmp_path / "broken"
    shutil.copytree(tiny_folder, folder)
    path = folder / part / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ValueError, match=match):
        Cosmos3TextToVideoPipeline.from_pretrained(str(folder))
