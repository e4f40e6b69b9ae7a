"""`apply_fused_kernels`: a model with the fused modules computes what the eager model computes."""

import logging

import pytest
import torch

from cosmos3 import Cosmos3Sample, Cosmos3Transformer
from cosmos3.kernels import apply_fused_kernels, glu, modules, norm_rope, remove_fused_kernels, timestep
from cosmos3.kernels.modules import (
    FusedCosmos3Attention,
    FusedCosmos3MLP,
    FusedCosmos3NemotronRMSNorm,
    FusedCosmos3RMSNorm,
    FusedCosmos3TimestepEmbedding,
)
from cosmos3.models.transformer_cosmos3 import (
    Cosmos3Attention,
    Cosmos3MLP,
    Cosmos3NemotronRMSNorm,
    Cosmos3RMSNorm,
    Cosmos3TimestepEmbedding,
)
from cosmos3.testing import randomize_

logging.getLogger("diffusers").setLevel(logging.ERROR)  # "keep time_embedder in fp32" on .to(dtype)

EDGE = dict(hidden_act="relu2", qk_norm_for_text=False, use_und_k_norm_for_gen=True, rms_norm_eps=1e-5)
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make_model(variant: str, dtype=torch.float32, device="cpu") -> Cosmos3Transformer:
    torch.manual_seed(0)
    model = Cosmos3Transformer.from_preset("tiny", **(EDGE if variant == "edge" else {}))
    return randomize_(model, seed=0, std=0.15).eval().to(device, dtype)


def make_batch(model, dtype):
    """Image-to-video with sound and actions (clean frames and tokens), and a text-to-image sample."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    samples = [
        Cosmos3Sample(text_ids=torch.randint(0, cfg.vocab_size, (9,), generator=g).tolist(), vision_shape=(3, 4, 6),
                      vision_condition_frames=(0,), fps=24.0, sound_length=5, action_length=4,
                      action_condition_frames=(0,), action_domain_id=3),
        Cosmos3Sample(text_ids=[5, 6, 7, 8], vision_shape=(1, 4, 4)),
    ]
    vision = [torch.randn(cfg.latent_channel, *s.vision_shape, generator=g).to(dtype) for s in samples]
    sound = [torch.randn(cfg.sound_dim, 5, generator=g).to(dtype), None]
    action = [torch.randn(4, cfg.action_dim, generator=g).to(dtype), None]
    return model.build_layout(samples), dict(vision=vision, timestep=torch.tensor([700.0, 300.0]), sound=sound,
                                             action=action)


def flat(output):
    return {name: torch.cat([x.flatten() for x in getattr(output, name) if x is not None])
            for name in ("sample", "sound", "action")}


@pytest.fixture
def count_calls(monkeypatch):
    """Count the fused modules' kernel calls, and make any eager fallback inside a wrapper an error."""
    calls = {"rms_norm": 0, "rms_norm_rope": 0, "silu_glu": 0, "add_timestep_embedding": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    def fail(*args, **kwargs):
        raise AssertionError("a kernel wrapper fell back to eager")

    for name in calls:
        monkeypatch.setattr(modules, name, counted(name, getattr(modules, name)))
    monkeypatch.setattr(norm_rope, "rms_norm_reference", fail)
    monkeypatch.setattr(norm_rope, "rms_norm_rope_reference", fail)
    monkeypatch.setattr(glu, "silu_glu_reference", fail)
    monkeypatch.setattr(timestep, "add_timestep_embedding_reference", fail)
    return calls


@pytest.mark.parametrize("variant", ["qwen", "edge"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_model_matches_eager(variant, dtype, count_calls, device, kernels_launch):
    model = make_model(variant, dtype, device)
    layout, inputs = make_batch(model, dtype)
    with torch.no_grad():
        eager = flat(model(layout, **inputs))
        apply_fused_kernels(model)
        fused = flat(model(layout, **inputs))
    # Per layer and tower: 2 hidden norms + q and k (+ Edge's text keys for the gen tower), and the final norm.
    layers, towers = model.config.num_hidden_layers, 2
    assert count_calls["rms_norm"] == layers * towers * 2 + 1
    assert count_calls["rms_norm_rope"] == layers * (towers * 2 + (variant == "edge"))
    assert count_calls["silu_glu"] == (0 if variant == "edge" else layers * towers)
    noisy = [layout.vision_noisy_index, layout.sound_noisy_index, layout.action_noisy_index]
    assert count_calls["add_timestep_embedding"] == sum(index.numel() > 0 for index in noisy) >= 2
    for name, expected in eager.items():
        assert expected.abs().max() > 0.5  # not a comparison of zeros
        torch.testing.assert_close(fused[name], expected, atol=TOL[dtype], rtol=TOL[dtype])


def test_fused_text_paths_match_eager(count_calls, device, kernels_launch):
    """The text K/V cache (`encode_text`) and autoregressive text decoding (`text_logits`) go through `_text_qkv`."""
    model = make_model("edge", device=device)
    layout, inputs = make_batch(model, torch.float32)
    ids = torch.tensor([3, 1, 4, 1, 5])
    with torch.no_grad():
        cache = model.encode_text(layout)
        logits, past = model.text_logits(ids[:3])
        step, _ = model.text_logits(ids[3:], past)
        apply_fused_kernels(model)
        fused_cache = model.encode_text(layout)
        fused_logits, fused_past = model.text_logits(ids[:3])
        fused_step, _ = model.text_logits(ids[3:], fused_past)
        with_cache = flat(model(layout, **inputs, text_kv_cache=fused_cache))
        without = flat(model(layout, **inputs))
    assert count_calls["rms_norm_rope"] > 0
    for ours, theirs in zip(fused_cache.keys + fused_cache.values, cache.keys + cache.values):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(fused_logits, logits, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(fused_step, step, atol=2e-5, rtol=2e-5)
    for name in with_cache:
        torch.testing.assert_close(with_cache[name], without[name], atol=2e-5, rtol=2e-5)


def test_hooked_norms_run_as_modules(device, kernels_launch):
    """A q/k norm with a forward hook (offloading, casting, adapters) is called as a module, so its hook still runs."""
    model = make_model("qwen", device=device)
    layout, inputs = make_batch(model, torch.float32)
    model.layers[0].self_attn.norm_added_q.register_forward_hook(lambda module, args, out: out * 2)
    with torch.no_grad():
        eager = flat(model(layout, **inputs))
        apply_fused_kernels(model)
        fused = flat(model(layout, **inputs))
        remove_fused_kernels(model)
        model.layers[0].self_attn.norm_added_q._forward_hooks.clear()
        unhooked = flat(model(layout, **inputs))
    assert not torch.allclose(unhooked["sample"], eager["sample"], atol=1e-3)  # the hook matters
    for name in eager:
        torch.testing.assert_close(fused[name], eager[name], atol=2e-5, rtol=2e-5)


def test_training_and_float64_run_eager(count_calls):
    """Kernels are forward-only: with autograd, or in float64, the fused modules run (and match) the eager code."""
    model = make_model("qwen").double()
    layout, inputs = make_batch(model, torch.float64)
    inputs = {k: [x.double() if x is not None else None for x in v] if isinstance(v, list) else v
              for k, v in inputs.items()}
    with torch.no_grad():
        eager = flat(model(layout, **inputs))
        apply_fused_kernels(model)
        fused = flat(model(layout, **inputs))
    assert all(torch.equal(fused[k], eager[k]) for k in eager)
    assert sum(count_calls.values()) == 0

    model = make_model("qwen")
    layout, inputs = make_batch(model, torch.float32)
    apply_fused_kernels(model).train()
    flat(model(layout, **inputs))["sample"].square().mean().backward()
    assert sum(count_calls.values()) == 0
    assert model.layers[0].self_attn.norm_added_q.weight.grad.abs().sum() > 0


def test_apply_and_remove_swap_classes_in_place():
    model = make_model("qwen")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    counts = {cls: sum(type(m) is cls for m in model.modules())
              for cls in (Cosmos3RMSNorm, Cosmos3MLP, Cosmos3Attention, Cosmos3TimestepEmbedding)}
    assert apply_fused_kernels(model) is model
    apply_fused_kernels(model)  # idempotent
    fused = {cls: sum(type(m) is cls for m in model.modules())
             for cls in (FusedCosmos3RMSNorm, FusedCosmos3MLP, FusedCosmos3Attention, FusedCosmos3TimestepEmbedding)}
    assert list(fused.values()) == list(counts.values())
    assert not any(type(m) in counts for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert remove_fused_kernels(model) is model
    assert {cls: sum(type(m) is cls for m in model.modules()) for cls in counts} == counts
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    edge = apply_fused_kernels(make_model("edge"))
    assert any(type(m) is FusedCosmos3NemotronRMSNorm for m in edge.modules())
    assert not any(type(m) is Cosmos3NemotronRMSNorm for m in edge.modules())


def test_apply_rejects_other_models():
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module .* got str"):
        apply_fused_kernels("tiny")
    with pytest.raises(ValueError, match=r"`apply_fused_kernels` found no Cosmos 3 modules .* in the Linear"):
        apply_fused_kernels(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"`remove_fused_kernels` found no Cosmos 3 modules"):
        remove_fused_kernels(torch.nn.Sequential())
