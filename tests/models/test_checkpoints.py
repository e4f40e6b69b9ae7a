"""Checkpoint compatibility with the reference in both directions, and clear errors for bad folders/inputs."""

import json
import logging

import pytest
import torch
from diffusers import Cosmos3OmniTransformer
from safetensors.torch import load_file, save_file

from cosmos3 import Cosmos3Sample, Cosmos3Transformer
from cosmos3.testing import reference_inputs

logging.getLogger("diffusers").setLevel(logging.ERROR)

# Keys a published transformer/config.json carries beyond the constructor arguments (nvidia/Cosmos3-Nano layout).
PUBLISHED_EXTRAS = {
    "dtype": "bfloat16", "freeze_und": False, "initializer_range": 0.02, "joint_attn_implementation": "two_way",
    "max_action_dim": 16, "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
    "position_embedding_type": "unified_3d_mrope", "qk_norm": False, "qk_norm_for_diffusion": True,
    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
    "temporal_compression_factor_sound": 1, "use_cache": True, "use_moe": True, "video_temporal_causal": False,
}


def one_step(model, sample, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vision = torch.randn(cfg.latent_channel, *sample.vision_shape, generator=g)
    sound = torch.randn(cfg.sound_dim, sample.sound_length, generator=g)
    action = torch.randn(sample.action_length, cfg.action_dim, generator=g)
    return vision, sound, action


@pytest.fixture
def sample():
    return Cosmos3Sample(text_ids=[3, 1, 4, 1, 5, 9], vision_shape=(2, 4, 4), vision_condition_frames=(0,), fps=24.0,
                         sound_length=3, action_length=4, action_domain_id=8)


def test_ours_saved_loads_strictly_into_reference(tiny_model, sample, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    reference, info = Cosmos3OmniTransformer.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    vision, sound, action = one_step(tiny_model, sample)
    with torch.no_grad():
        ours = tiny_model(tiny_model.build_layout([sample]), [vision], 321.0, sound=[sound], action=[action])
        v, s, a = reference.eval()(**reference_inputs(tiny_model.config, sample, vision, 321.0, sound=sound,
                                                      action=action), return_dict=False)
    assert (ours.sample[0] - v[0][0]).abs().max() <= 1e-5
    assert (ours.sound[0] - s[0]).abs().max() <= 1e-5
    assert (ours.action[0] - a[0]).abs().max() <= 1e-5


def test_reference_saved_loads_into_ours(tiny_model, tmp_path):
    init = {k: v for k, v in tiny_model.config.items() if not k.startswith("_")}
    reference = Cosmos3OmniTransformer(**init)
    reference.load_state_dict(tiny_model.state_dict())
    reference.save_pretrained(tmp_path, max_shard_size="200KB")  # sharded: exercises the index file
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    loaded = Cosmos3Transformer.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.config.rope_axes_dim == [4, 2, 2]


def test_published_config_with_metadata_keys_loads(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(PUBLISHED_EXTRAS, _class_name="Cosmos3OmniTransformer", _diffusers_version="0.37.1")
    del config["rope_axes_dim"]  # published configs carry it inside rope_scaling
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = Cosmos3Transformer.from_pretrained(tmp_path)
    assert loaded.config.rope_axes_dim == [4, 2, 2]
    assert torch.equal(loaded.proj_in.weight, tiny_model.proj_in.weight)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("hidden_sise", 64, r"Unknown Cosmos3Transformer config keys \['hidden_sise'\]"),
        ("joint_attn_implementation", "three_way", "joint_attn_implementation.*three_way"),
        ("video_temporal_causal", True, "video_temporal_causal"),
    ],
)
def test_bad_config_keys_are_errors(tiny_model, tmp_path, key, value, match):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        Cosmos3Transformer.from_pretrained(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_are_named(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors["layers.1.mlp_moe_gen.down_proj.weight"]
    tensors["layers.0.extra.weight"] = torch.zeros(2)
    tensors["proj_in.bias"] = torch.zeros(65)
    save_file(tensors, path)
    with pytest.raises(ValueError) as err:
        Cosmos3Transformer.from_pretrained(tmp_path)
    message = str(err.value)
    assert "layers.1.mlp_moe_gen.down_proj.weight" in message
    assert "layers.0.extra.weight" in message
    assert "proj_in.bias: checkpoint (65,) vs model (64,)" in message


def test_pickle_checkpoints_are_refused(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").rename(tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        Cosmos3Transformer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="safetensors only"):
        Cosmos3Transformer.from_pretrained(tmp_path, use_safetensors=False)


def test_bfloat16_load_keeps_time_embedder_fp32(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    loaded = Cosmos3Transformer.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.proj_in.weight.dtype == torch.bfloat16
    assert loaded.time_embedder.linear_1.weight.dtype == torch.float32
    sample = Cosmos3Sample(text_ids=[1, 2, 3], vision_shape=(1, 4, 4))
    with torch.no_grad():
        out = loaded(loaded.build_layout([sample]), torch.randn(1, 8, 1, 4, 4), 500.0)
    assert out.sample.dtype == torch.bfloat16 and torch.isfinite(out.sample.float()).all()


def test_invalid_constructor_arguments():
    with pytest.raises(TypeError, match="hidden_sise"):
        Cosmos3Transformer(hidden_sise=3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Cosmos3Transformer.from_preset("tiny", num_key_value_heads=3)
    with pytest.raises(ValueError, match="rope_axes_dim"):
        Cosmos3Transformer.from_preset("tiny", rope_axes_dim=[4, 4, 4])
    with pytest.raises(ValueError, match="hidden_act"):
        Cosmos3Transformer.from_preset("tiny", hidden_act="gelu")
    with pytest.raises(ValueError, match="action_dim"):
        Cosmos3Transformer.from_preset("tiny", action_dim=None)
    with pytest.raises(ValueError, match="patch_latent_dim"):
        Cosmos3Transformer.from_preset("tiny", patch_latent_dim=30)


def _fake_hub_cache(root, model):
    """A Hugging Face cache holding `fake/cosmos3` with a transformer/ subfolder, as an offline download leaves it."""
    snapshot = root / "models--fake--cosmos3" / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot / "transformer")
    (root / "models--fake--cosmos3" / "refs").mkdir(parents=True)
    (root / "models--fake--cosmos3" / "refs" / "main").write_text("0" * 40)
    return snapshot / "transformer" / "diffusion_pytorch_model.safetensors"


def test_hub_cache_loads_and_is_checked_strictly(tiny_model, tmp_path):
    weights = _fake_hub_cache(tmp_path, tiny_model)
    loaded = Cosmos3Transformer.from_pretrained("fake/cosmos3", subfolder="transformer", cache_dir=tmp_path)
    assert torch.equal(loaded.proj_out.weight, tiny_model.proj_out.weight)
    tensors = load_file(weights)
    del tensors["proj_out.weight"]
    tensors["bogus.weight"] = torch.zeros(1)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="proj_out.weight"):
        Cosmos3Transformer.from_pretrained("fake/cosmos3", subfolder="transformer", cache_dir=tmp_path)


def test_variant_folders_load(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, variant="bf16")
    loaded = Cosmos3Transformer.from_pretrained(tmp_path, variant="bf16")
    assert torch.equal(loaded.proj_in.weight, tiny_model.proj_in.weight)


@pytest.mark.parametrize(
    "rope_scaling,match",
    [
        ({"rope_type": "yarn", "factor": 4.0}, "rope_type"),
        ({"mrope_section": [2, 4, 2]}, "contradicts `rope_axes_dim`"),
        ({"mrope_interleaved": False}, "mrope_interleaved"),
    ],
)
def test_unsupported_rope_settings_are_errors(tiny_model, tmp_path, rope_scaling, match):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"] = rope_scaling
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        Cosmos3Transformer.from_pretrained(tmp_path)
