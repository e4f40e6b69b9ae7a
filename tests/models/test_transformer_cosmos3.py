"""Cosmos3Transformer against the reference (diffusers.Cosmos3OmniTransformer), and against itself.

Parity: the same random weights and inputs through both models, float32 within 1e-5 and float64 within 1e-10
(the latter shows the two compute the same function, not merely similar ones).
Self-consistency: batched == one sample at a time, text K/V cache == recompute, backends agree.
"""

import logging

import pytest
import torch

from cosmos3 import Cosmos3Sample, Cosmos3Transformer
from cosmos3.models import attention as attention_module
from cosmos3.testing import randomize_, reference_inputs, reference_transformer

logging.getLogger("diffusers").setLevel(logging.ERROR)

TINY = dict(
    hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=12, vocab_size=300, rope_axes_dim=[2, 2, 2], latent_channel=6, patch_latent_dim=24, rope_theta=10000.0,
)
CONFIGS = {
    "gqa2": dict(TINY),
    "mha": dict(TINY, num_key_value_heads=4),
    "gqa4_3layers": dict(TINY, num_key_value_heads=1, num_hidden_layers=3),
    "sound_action": dict(TINY, sound_gen=True, sound_dim=5, action_gen=True, action_dim=7, num_embodiment_domains=32),
    "edge": dict(
        TINY, hidden_act="relu2", qk_norm_for_text=False, use_und_k_norm_for_gen=True, rms_norm_eps=1e-5,
        rope_theta=1e8, action_gen=True, action_dim=7,
    ),
    "no_fps_modulation": dict(TINY, enable_fps_modulation=False, unified_3d_mrope_reset_spatial_ids=False),
    "nano_like_rope": dict(TINY, head_dim=16, rope_axes_dim=[4, 2, 2], rope_theta=5e6, attention_bias=True),
}


def make_model(name: str, seed: int = 0, dtype=torch.float32) -> Cosmos3Transformer:
    torch.manual_seed(seed)
    model = Cosmos3Transformer(**CONFIGS[name])
    return randomize_(model, seed=seed, std=0.15).eval().to(dtype)


def make_wide_model() -> Cosmos3Transformer:
    """`sound_action` at head dim 64 and widths divisible by 16: sizes the fused attention kernels and FP8 GEMMs
    accept (tests/test_gpu.py), and long enough rotary tables to show bf16 rounding."""
    config = dict(CONFIGS["sound_action"], hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, rope_axes_dim=[8, 12, 12])
    torch.manual_seed(0)
    return randomize_(Cosmos3Transformer(**config), seed=0, std=0.05).eval()


def make_sample(config, *, text_len=7, vision_shape=(3, 3, 5), cond=(), fps=16.0, sound=0, action=0,
                action_cond=(), domain=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (text_len,), generator=g).tolist()
    return Cosmos3Sample(
        text_ids=ids, vision_shape=vision_shape, vision_condition_frames=cond, fps=fps, sound_length=sound,
        action_length=action, action_condition_frames=action_cond, action_domain_id=domain,
    )


def make_inputs(config, sample, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + 100)
    vision = torch.randn(config.latent_channel, *sample.vision_shape, generator=g).to(dtype)
    sound = torch.randn(config.sound_dim, sample.sound_length, generator=g).to(dtype) if sample.sound_length else None
    action = None
    if sample.action_length:
        action = torch.randn(sample.action_length, config.action_dim, generator=g).to(dtype)
    return vision, sound, action


def run_ours(model, samples, inputs, timesteps, **kw):
    layout = model.build_layout(samples)
    vision = [x[0] for x in inputs]
    sound = [x[1] for x in inputs] if any(s.sound_length for s in samples) else None
    action = [x[2] for x in inputs] if any(s.action_length for s in samples) else None
    with torch.no_grad():
        return model(layout, vision, torch.tensor(timesteps), sound=sound, action=action, **kw)


def run_reference(reference, config, sample, inputs, timestep):
    vision, sound, action = inputs
    kwargs = reference_inputs(config, sample, vision, timestep, sound=sound, action=action)
    with torch.no_grad():
        v, s, a = reference(**kwargs, return_dict=False)
    return v[0][0], (s[0] if s else None), (a[0] if a else None)


def max_diff(a, b):
    return (a - b).abs().max().item()


# Samples exercising: text-to-image (T=1), video, image-to-video conditioning, odd latent sizes, sound, actions.
SAMPLE_CASES = {
    "t2i": dict(vision_shape=(1, 4, 4), fps=None),
    "t2v_odd": dict(vision_shape=(3, 3, 5)),
    "i2v": dict(vision_shape=(4, 2, 4), cond=(0,), fps=24.0),
    "v2v_long_text": dict(text_len=23, vision_shape=(4, 5, 3), cond=(0, 1), fps=10.0),
}


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_matches_reference_float32(config_name, case):
    model = make_model(config_name)
    reference = reference_transformer(model)
    cfg = model.config
    extra = {}
    if cfg.sound_gen:
        extra["sound"] = 5
    if cfg.action_gen:
        extra.update(action=4, action_cond=(0,) if case == "i2v" else ())
    sample = make_sample(cfg, **SAMPLE_CASES[case], **extra)
    inputs = make_inputs(cfg, sample)
    out = run_ours(model, [sample], [inputs], [637.0])
    ref_v, ref_s, ref_a = run_reference(reference, cfg, sample, inputs, 637.0)
    assert ref_v.abs().max() > 0.1  # the comparison is not between zeros
    assert max_diff(out.sample[0], ref_v) <= 1e-5
    if cfg.sound_gen:
        assert max_diff(out.sound[0], ref_s) <= 1e-5
    if cfg.action_gen:
        assert max_diff(out.action[0], ref_a) <= 1e-5
        for frame in sample.action_condition_frames:
            assert torch.all(out.action[0][frame] == 0)
    for frame in sample.vision_condition_frames:
        assert torch.all(out.sample[0][:, frame] == 0)


@pytest.mark.parametrize("config_name", ["sound_action", "edge"])
def test_matches_reference_float64_exactly(config_name):
    model = make_model(config_name, dtype=torch.float64)
    reference = reference_transformer(model)
    cfg = model.config
    sample = make_sample(cfg, vision_shape=(3, 3, 5), cond=(0,), sound=4 if cfg.sound_gen else 0, action=5,
                         action_cond=(0, 1))
    inputs = make_inputs(cfg, sample, dtype=torch.float64)
    out = run_ours(model, [sample], [inputs], [250.0])
    ref_v, ref_s, ref_a = run_reference(reference, cfg, sample, inputs, 250.0)
    assert max_diff(out.sample[0], ref_v) <= 1e-10
    assert max_diff(out.action[0], ref_a) <= 1e-10
    if cfg.sound_gen:
        assert max_diff(out.sound[0], ref_s) <= 1e-10


def test_position_ids_match_reference_bitwise():
    model = make_model("sound_action")
    cfg = model.config
    for fps in (None, 10.0, 16.0, 24.0, 30.0):
        sample = make_sample(cfg, text_len=11, vision_shape=(5, 3, 4), fps=fps, sound=9, action=6)
        layout = model.build_layout([sample])
        vision, sound, action = make_inputs(cfg, sample)
        ref = reference_inputs(cfg, sample, vision, 1.0, sound=sound, action=action)["position_ids"].float()
        ours = torch.cat([layout.und_position_ids, layout.gen_position_ids], dim=1)
        assert torch.equal(ours, ref)


# ---------------------------------------------------------------------------------------------------------------
# Batching, cache, guidance, backends
# ---------------------------------------------------------------------------------------------------------------


def mixed_batch(cfg):
    """Three samples with different text lengths, latent shapes, conditioning, modalities and timesteps."""
    samples = [
        make_sample(cfg, text_len=5, vision_shape=(1, 4, 4), fps=None, seed=1),
        make_sample(cfg, text_len=19, vision_shape=(3, 3, 5), cond=(0,), sound=4 if cfg.sound_gen else 0, action=3,
                    action_cond=(0,),
                    seed=2, domain=5),
        make_sample(cfg, text_len=9, vision_shape=(2, 2, 2), fps=30.0, action=6, seed=3, domain=20),
    ]
    inputs = [make_inputs(cfg, s, seed=i) for i, s in enumerate(samples)]
    return samples, inputs, [900.0, 400.0, 37.5]


def assert_batched_equals_single(model, tol):
    samples, inputs, timesteps = mixed_batch(model.config)
    batched = run_ours(model, samples, inputs, timesteps)
    for b, (sample, x, t) in enumerate(zip(samples, inputs, timesteps)):
        single = run_ours(model, [sample], [x], [t])
        assert max_diff(batched.sample[b], single.sample[0]) <= tol
        if sample.sound_length:
            assert max_diff(batched.sound[b], single.sound[0]) <= tol
        else:
            assert batched.sound[b] is None
        if sample.action_length:
            assert max_diff(batched.action[b], single.action[0]) <= tol
        else:
            assert batched.action[b] is None


def eager_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """A per-segment SDPA stand-in for the CUDA varlen kernel, so the varlen bookkeeping is tested on CPU."""
    out = []
    for i in range(len(cu_q) - 1):
        qs, ks, vs = (x[int(c[i]) : int(c[i + 1])].transpose(0, 1) for x, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        out.append(attention_module._sdpa(qs[None], ks[None], vs[None], causal=causal)[0].transpose(0, 1))
    return torch.cat(out)


@pytest.fixture
def cpu_varlen(monkeypatch):
    monkeypatch.setattr(attention_module, "_varlen_kernel", eager_varlen)
    monkeypatch.setattr(attention_module, "_check_varlen_inputs", lambda q: None)
    monkeypatch.setattr(attention_module, "flash_varlen_available", lambda: True)


@pytest.mark.parametrize("backend", ["native", "flex", "flash_varlen", "tiled"])
def test_batched_equals_single(backend, cpu_varlen):
    model = make_model("sound_action")
    model.set_attention_backend(backend)
    assert_batched_equals_single(model, tol=5e-6)


def test_batched_tensor_input_returns_tensors():
    model = make_model("sound_action")
    cfg = model.config
    samples = [make_sample(cfg, text_len=n, vision_shape=(2, 2, 4), sound=3, action=2, seed=n) for n in (4, 9)]
    layout = model.build_layout(samples)
    vision = torch.randn(2, cfg.latent_channel, 2, 2, 4)
    sound = torch.randn(2, cfg.sound_dim, 3)
    action = torch.randn(2, 2, cfg.action_dim)
    with torch.no_grad():
        out = model(layout, vision, 500.0, sound=sound, action=action)
        single = model(model.build_layout(samples[1:]), vision[1:], 500.0, sound=sound[1:], action=action[1:])
    assert out.sample.shape == vision.shape and out.sound.shape == sound.shape and out.action.shape == action.shape
    assert max_diff(out.sample[1], single.sample[0]) <= 5e-6


@pytest.mark.parametrize("backend", ["flex", "flash_varlen", "tiled"])
def test_backends_agree_with_native(backend, cpu_varlen):
    model = make_model("edge")
    samples, inputs, timesteps = mixed_batch(model.config)
    native = run_ours(model, samples, inputs, timesteps)
    model.set_attention_backend(backend)
    other = run_ours(model, samples, inputs, timesteps)
    for a, b in zip(native.sample, other.sample):
        assert max_diff(a, b) <= 5e-6
    for a, b in zip(native.action, other.action):
        if a is not None:
            assert max_diff(a, b) <= 5e-6


def _varlen_newest(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert enable_gqa == (key.shape[1] != query.shape[1])
    return eager_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=tuple(window_size) == (-1, 0))


def _varlen_window(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1), k_cache=None, v_cache=None, page_table=None):
    assert key.shape[1] == query.shape[1], "this release takes no enable_gqa"
    return eager_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=tuple(window_size) == (-1, 0))


def _varlen_oldest(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert key.shape[1] == query.shape[1], "this release takes no enable_gqa"
    return eager_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=is_causal)


@pytest.mark.parametrize("release", [_varlen_newest, _varlen_window, _varlen_oldest])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_call_fits_each_pytorch_signature(release, causal, monkeypatch):
    """PyTorch's `varlen_attn` changed its keywords between releases (the GPU image has 2.11, CI 2.13)."""
    import importlib.util

    from torch.nn.attention import varlen

    monkeypatch.setattr(varlen, "varlen_attn", release)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else
                        find_spec(name, *a))
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 12])
    q = torch.randn(12, 4, 8, generator=g)
    k, v = torch.randn(2, 12, 2, 8, generator=g)
    got = attention_module._varlen_kernel(q, k, v, cu, cu, 7, 7, causal)
    assert max_diff(got, eager_varlen(q, k, v, cu, cu, 7, 7, causal)) <= 1e-6


def test_text_cache_equals_recompute():
    model = make_model("sound_action")
    samples, inputs, timesteps = mixed_batch(model.config)
    layout = model.build_layout(samples)
    with torch.no_grad():
        cache = model.encode_text(layout)
        for step, t in enumerate([999.0, 500.0, 10.0]):
            vision = [x[0] * (step + 1) for x in inputs]
            action = [x[2] for x in inputs]
            sound = [x[1] for x in inputs]
            cached = model(layout, vision, t, sound=sound, action=action, text_kv_cache=cache)
            fresh = model(layout, vision, t, sound=sound, action=action)
            for a, b in zip(cached.sample, fresh.sample):
                assert torch.equal(a, b)


def test_text_cache_is_checked_against_layout():
    model = make_model("gqa2")
    cfg = model.config
    a, b = make_sample(cfg, text_len=5), make_sample(cfg, text_len=6)
    cache = model.encode_text(model.build_layout([a]))
    layout = model.build_layout([b])
    with pytest.raises(ValueError, match="text_kv_cache"):
        model(layout, [torch.randn(cfg.latent_channel, *b.vision_shape)], 1.0, text_kv_cache=cache)


def test_guidance_batched_in_one_forward_equals_two_passes():
    model = make_model("gqa2")
    cfg = model.config
    cond = make_sample(cfg, text_len=21, vision_shape=(3, 4, 4), cond=(0,), seed=1)
    uncond = make_sample(cfg, text_len=8, vision_shape=(3, 4, 4), cond=(0,), seed=2)
    latents = torch.randn(cfg.latent_channel, 3, 4, 4)
    layout = model.build_layout([cond, uncond])
    with torch.no_grad():
        both = model(layout, [latents, latents], 700.0, text_kv_cache=model.encode_text(layout))
        v_cond = model(model.build_layout([cond]), [latents], 700.0).sample[0]
        v_uncond = model(model.build_layout([uncond]), [latents], 700.0).sample[0]
    assert max_diff(both.sample[0], v_cond) <= 5e-6
    assert max_diff(both.sample[1], v_uncond) <= 5e-6


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model("sound_action").train()
    samples, inputs, timesteps = mixed_batch(model.config)
    layout = model.build_layout(samples)

    def grads():
        model.zero_grad()
        out = model(layout, [x[0] for x in inputs], torch.tensor(timesteps), sound=[x[1] for x in inputs],
                    action=[x[2] for x in inputs])
        loss = sum(v.square().mean() for v in out.sample) + sum(a.square().mean() for a in out.action if a is not None)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    assert "layers.0.self_attn.to_q.weight" in plain and "layers.0.mlp_moe_gen.up_proj.weight" in plain
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Presets, capabilities, switches
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset,low,high", [("edge", 3.0e9, 4.5e9), ("nano", 14.5e9, 17e9), ("super", 60e9, 70e9)]
)
def test_presets_have_published_sizes_on_meta(preset, low, high):
    with torch.device("meta"):
        model = Cosmos3Transformer.from_preset(preset)
    n = sum(p.numel() for p in model.parameters())
    assert low <= n <= high
    assert next(model.parameters()).device.type == "meta"


def test_nano_preset_matches_published_config():
    cfg = Cosmos3Transformer.from_preset("tiny").config  # building the full preset would allocate 16B params
    assert cfg.hidden_size == 64
    with torch.device("meta"):
        nano = Cosmos3Transformer.from_preset("nano").config
    published = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_axes_dim=[24, 20, 20],
                     action_dim=64, sound_dim=64, rms_norm_eps=1e-6, rope_theta=5e6)
    for key, value in published.items():
        assert nano[key] == value, key


def test_unknown_preset_and_backend_errors():
    with pytest.raises(ValueError, match="Unknown preset 'mega'"):
        Cosmos3Transformer.from_preset("mega")
    model = make_model("gqa2")
    with pytest.raises(ValueError, match="Unknown attention backend 'xformers'"):
        model.set_attention_backend("xformers")
    model.set_attention_backend("sdpa")
    assert model.attention_backend == "native"


def test_capability_attributes():
    assert Cosmos3Transformer._no_split_modules == ["Cosmos3DecoderLayer"]
    assert Cosmos3Transformer._repeated_blocks == ["Cosmos3DecoderLayer"]
    assert Cosmos3Transformer._keep_in_fp32_modules == ["time_embedder"]
    assert Cosmos3Transformer._supports_gradient_checkpointing


def test_state_dict_names_equal_reference():
    from diffusers import Cosmos3OmniTransformer

    for name, config in CONFIGS.items():
        ours = Cosmos3Transformer(**config).state_dict()
        theirs = Cosmos3OmniTransformer(**config).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, name


def test_compile_repeated_blocks_survives_new_prompt_lengths():
    """Regional compilation (diffusers `compile_repeated_blocks`) matches eager, and a new request (other prompt
    lengths, batch size, video shape) reuses the compiled layers instead of recompiling them: the attention dispatch,
    which reads the layout's Python metadata, is kept out of the graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = make_model("sound_action")
    cfg = model.config

    def run(lengths, vision_shape):
        samples = [make_sample(cfg, text_len=n, vision_shape=vision_shape, seed=n) for n in lengths]
        layout = model.build_layout(samples)
        latents = torch.randn(len(lengths), cfg.latent_channel, *vision_shape)
        cache = model.encode_text(layout)
        return model(layout, latents, 300.0, text_kv_cache=cache).sample

    # the first three vary every size (prompt lengths, batch, video shape), which makes them dynamic
    requests = [((4, 9), (2, 2, 4)), ((5, 7, 6), (3, 2, 4)), ((6, 3), (2, 4, 2)), ((11, 2), (2, 2, 6)),
                ((3, 8, 5), (1, 2, 4)), ((7, 7, 2, 9), (2, 4, 4))]
    with torch.no_grad():
        torch.manual_seed(0)
        eager = [run(*r) for r in requests]
        model.compile_repeated_blocks()
        torch.manual_seed(0)
        compiled = [run(*r) for r in requests[:3]]
        graphs = counters["stats"]["unique_graphs"]
        compiled += [run(*r) for r in requests[3:]]
    for a, b in zip(eager, compiled):
        assert max_diff(a, b) <= 1e-5
    # the first requests settle which sizes are dynamic; later ones compile nothing new (sizes of 1 would:
    # torch.compile specializes them)
    assert counters["stats"]["unique_graphs"] == graphs


def test_layout_used_under_inference_mode_still_trains():
    model = make_model("sound_action")
    samples, inputs, timesteps = mixed_batch(model.config)
    layout = model.build_layout(samples)
    kwargs = dict(sound=[x[1] for x in inputs], action=[x[2] for x in inputs])
    with torch.inference_mode():
        model(layout, [x[0] for x in inputs], torch.tensor(timesteps), **kwargs)
    out = model(layout, [x[0] for x in inputs], torch.tensor(timesteps), **kwargs)
    sum(v.sum() for v in out.sample).backward()
    assert model.proj_in.weight.grad is not None


def test_autocast_over_float32_weights():
    model = make_model("sound_action")
    samples, inputs, timesteps = mixed_batch(model.config)
    full = run_ours(model, samples, inputs, timesteps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run_ours(model, samples, inputs, timesteps)
    for a, b in zip(full.sample, mixed.sample):
        assert b.dtype == torch.bfloat16
        assert max_diff(a, b.float()) <= 0.05 * a.abs().max()


def test_rotary_frequencies_survive_a_cast_to_bfloat16():
    """`model.to(torch.bfloat16)` rounds buffers as well as weights; the rotary tables must still come from float32
    frequencies. (The reference keeps its rounded buffer: cast the same way, its output on the model below moves
    27-32% from float32. With float32 frequencies, as `from_pretrained(torch_dtype=...)` leaves them, its bf16
    output is ours.)"""
    model = make_model("sound_action")
    positions = torch.arange(0, 3000, 7)[None].expand(3, -1)
    expected = model.rotary_emb(positions, torch.bfloat16)
    model.to(torch.bfloat16)
    assert model.rotary_emb.inv_freq.dtype == torch.bfloat16  # the cast did round the buffer
    got = model.rotary_emb(positions, torch.bfloat16)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])

    model = make_wide_model()
    sample = make_sample(model.config, text_len=13, vision_shape=(2, 4, 6), seed=1)
    vision = make_inputs(model.config, sample)[0][None]
    with torch.no_grad():
        full = model(model.build_layout([sample]), vision, 700.0).sample
        model.to(torch.bfloat16)
        half = model(model.build_layout([sample]), vision.bfloat16(), 700.0).sample
    assert ((half.float() - full).norm() / full.norm()).item() < 0.04  # 1.3% measured; 32% with rounded frequencies

    reference = reference_transformer(model)  # float32 frequencies, as loaded from a checkpoint
    theirs = run_reference(reference, model.config, sample, (vision[0].bfloat16(), None, None), 700.0)[0]
    assert ((half[0].float() - theirs.float()).norm() / theirs.float().norm()).item() < 0.005  # 0.0 measured


def test_layerwise_casting_matches_reference():
    """Weights stored in bf16, computed in fp32 (diffusers layerwise casting), action heads included."""
    model = make_model("sound_action")
    reference = reference_transformer(model)
    for m in (model, reference):
        m.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    cfg = model.config
    sample = make_sample(cfg, vision_shape=(3, 3, 5), cond=(0,), sound=4, action=5, action_cond=(0,))
    inputs = make_inputs(cfg, sample)
    out = run_ours(model, [sample], [inputs], [250.0])
    ref_v, ref_s, ref_a = run_reference(reference, cfg, sample, inputs, 250.0)
    assert max_diff(out.sample[0], ref_v) <= 1e-5
    assert max_diff(out.action[0], ref_a) <= 1e-5


def test_text_cache_from_other_prompts_of_the_same_lengths_is_refused():
    model = make_model("gqa2")
    cfg = model.config
    a, b = make_sample(cfg, text_len=6, seed=1), make_sample(cfg, text_len=6, seed=2)
    cache = model.encode_text(model.build_layout([a, b]))
    swapped = model.build_layout([b, a])
    with pytest.raises(ValueError, match="text_kv_cache"):
        model(swapped, [torch.randn(cfg.latent_channel, *a.vision_shape)] * 2, 1.0, text_kv_cache=cache)


def test_all_action_tokens_clean_gives_zero_action_velocity():
    """Forward dynamics: every action token is given, none is predicted."""
    model = make_model("sound_action")
    sample = make_sample(model.config, action=4, action_cond=(0, 1, 2, 3))
    inputs = make_inputs(model.config, sample)
    out = run_ours(model, [sample], [inputs], [500.0])
    assert torch.equal(out.action[0], torch.zeros_like(out.action[0]))
    reference = run_reference(reference_transformer(model), model.config, sample, inputs, 500.0)
    assert max_diff(out.sample[0], reference[0]) <= 1e-5
