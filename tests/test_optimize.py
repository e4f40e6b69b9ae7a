"""cosmos3.optimize: the captured step's plumbing, a forward free of host syncs, text-tower offloading, FP8 selection.

CUDA graph capture and FP8 GEMMs need a GPU; here the same static-buffer path runs eagerly (`capture=False`) and the
forward is checked for the operations that would make capture impossible.
"""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cosmos3.optimize import (
    CUDAGraphStep,
    fp8_linear_names,
    offload_text_tower,
    quantize_fp8,
    text_tower_modules,
)
from cosmos3.pipelines import ActionRequest, Cosmos3TextToVideoPipeline, Cosmos3WorldActionPipeline

from .models.test_transformer_cosmos3 import make_inputs, make_model, make_sample, max_diff
from .pipelines.conftest import components, gen  # noqa: F401  (fixture)


def batch(model):
    cfg = model.config
    samples = [
        make_sample(cfg, text_len=5, vision_shape=(3, 2, 4), cond=(0,), action=4, action_cond=(0,), sound=3,
                    domain=3, seed=1),
        make_sample(cfg, text_len=9, vision_shape=(3, 2, 4), action=4, sound=3, domain=20, seed=2),
    ]
    inputs = [make_inputs(cfg, s, seed=i) for i, s in enumerate(samples)]
    vision, sound, action = (torch.stack([x[i] for x in inputs]) for i in range(3))
    return model.build_layout(samples), vision, sound, action


def test_static_step_equals_the_model():
    model = make_model("sound_action")
    layout, vision, sound, action = batch(model)
    with torch.no_grad():
        cache = model.encode_text(layout)
        step = CUDAGraphStep(model, layout, cache, vision, sound, action, capture=False)
        for t, scale in ((900.0, 1.0), (torch.tensor(400.0), 0.5), (37.5, -2.0)):
            args = (vision * scale, sound * scale, action * scale)
            expected = model(layout, args[0], t, sound=args[1], action=args[2], text_kv_cache=cache,
                             return_dict=False)
            got = step(args[0], t, args[1], args[2])
            for a, b in zip(expected, got):
                assert max_diff(a, b) == 0


def test_static_step_errors():
    model = make_model("sound_action")
    layout, vision, sound, action = batch(model)
    cache = model.encode_text(layout)
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors"):
        CUDAGraphStep(model, layout, cache, vision, sound, action)
    with pytest.raises(TypeError, match="Cosmos3Transformer"):
        CUDAGraphStep(torch.nn.Linear(2, 2), layout, cache, vision, capture=False)
    step = CUDAGraphStep(model, layout, cache, vision, sound, action, capture=False)
    with pytest.raises(ValueError, match=r"`vision` must have the captured shape"):
        step(vision[:1], 1.0, sound, action)
    with pytest.raises(ValueError, match="`sound` must be given"):
        step(vision, 1.0, None, action)


class SyncRecorder(TorchDispatchMode):
    """Ops that read device values on the host, or make tensors from Python data (a host-to-device copy on a GPU):
    either one breaks CUDA graph capture."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "unique", "lift_fresh", "masked_select", "item")

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(bad in name for bad in self.FORBIDDEN):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("config", ["sound_action", "edge", "gqa2"])
def test_a_warmed_up_step_needs_no_host_sync(config):
    model = make_model(config)
    cfg = model.config
    if cfg.sound_gen:
        layout, vision, sound, action = batch(model)
    else:
        samples = [make_sample(cfg, text_len=n, vision_shape=(3, 2, 4), cond=(1,), action=4 if cfg.action_gen else 0,
                               action_cond=(2,) if cfg.action_gen else (), seed=n) for n in (4, 7)]
        layout = model.build_layout(samples)
        inputs = [make_inputs(cfg, s) for s in samples]
        vision, sound = torch.stack([x[0] for x in inputs]), None
        action = torch.stack([x[2] for x in inputs]) if cfg.action_gen else None
    t = torch.tensor([700.0, 20.0])
    with torch.no_grad():
        cache = model.encode_text(layout)
        model(layout, vision, t, sound=sound, action=action, text_kv_cache=cache)  # caches the layout's tensors
        with SyncRecorder() as recorder:
            model(layout, vision, t, sound=sound, action=action, text_kv_cache=cache)
    assert recorder.found == []


def test_pipeline_reuses_the_step_while_the_request_repeats(components):  # noqa: F811
    parts, _ = components
    pipe = Cosmos3TextToVideoPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_frames=5, height=32, width=48, num_inference_steps=3, guidance_scale=3.0, output_type="np")
    expected = [pipe("a red ball", generator=gen(s), **kw).frames for s in (1, 2)]
    other = pipe("a blue cube", generator=gen(3), **kw).frames
    pipe.enable_cuda_graphs(capture=False)
    calls = []
    original = pipe.transformer.encode_text
    pipe.transformer.encode_text = lambda layout: calls.append(1) or original(layout)
    got = [pipe("a red ball", generator=gen(s), **kw).frames for s in (1, 2)]
    assert len(calls) == 1  # the second request reused the step and its text cache
    got_other = pipe("a blue cube", generator=gen(3), **kw).frames
    assert len(calls) == 2
    for a, b in zip(expected + [other], got + [got_other]):
        assert np.abs(a - b).max() == 0
    pipe.enable_cuda_graphs(capture=True)
    with pytest.raises(ValueError, match="CUDA graphs are enabled but the pipeline runs on cpu"):
        pipe("a red ball", generator=gen(1), **kw)


def policy_request(seed: int) -> ActionRequest:
    """A policy request from a random 40x64 observation (also used by tests/test_gpu.py)."""
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 64, 3), dtype=np.uint8))
    return ActionRequest(mode="policy", chunk_size=8, domain_name="bridge_orig_lerobot", image=image,
                         resolution_tier=256)


def test_policy_requests_reuse_the_step(components):  # noqa: F811
    parts, _ = components
    pipe = Cosmos3WorldActionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, output_type="np", fps=15.0, guidance_scale=1.0)
    expected = [pipe("pick up the block", policy_request(s), generator=gen(s), **kw).action[0] for s in (1, 2)]
    pipe.enable_cuda_graphs(capture=False)
    got = [pipe("pick up the block", policy_request(s), generator=gen(s), **kw).action[0] for s in (1, 2)]
    assert pipe._graph_step is not None
    for a, b in zip(expected, got):
        assert (a - b).abs().max() == 0


def test_text_tower_offload_streams_weights_and_restores():
    model = make_model("edge")
    layout, vision = batch_simple(model)
    with torch.no_grad():
        expected = model(layout, vision, 500.0).sample
        cache_expected = model.encode_text(layout)
    modules = text_tower_modules(model)
    assert model.layers[0].mlp in modules and model.layers[0].mlp_moe_gen not in modules
    assert model.embed_tokens not in modules
    seen = []

    def spy(module, args):
        # while a module runs, it computes with a copy, not its host master
        seen.extend(p.data_ptr() != masters[id(p)] for p in module.parameters())

    handle = offload_text_tower(model, "cpu")
    masters = {id(p): p.data_ptr() for m in modules for p in m.parameters()}  # the host copies
    spies = [m.register_forward_pre_hook(spy) for m in modules]
    with torch.no_grad():
        cache = model.encode_text(layout)
        got = model(layout, vision, 500.0, text_kv_cache=cache).sample
        uncached = model(layout, vision, 500.0).sample
    for s in spies:
        s.remove()
    assert seen and all(seen)
    for k_a, k_b in zip(cache_expected.keys, cache.keys):
        assert max_diff(k_a, k_b) == 0
    assert max_diff(expected, got) == 0 and max_diff(expected, uncached) == 0
    handle.remove()
    assert not any(m._forward_pre_hooks for m in modules)
    with torch.no_grad():
        assert max_diff(expected, model(layout, vision, 500.0).sample) == 0


def batch_simple(model):
    cfg = model.config
    samples = [make_sample(cfg, text_len=n, vision_shape=(2, 2, 4), seed=n) for n in (6, 3)]
    vision = torch.stack([make_inputs(cfg, s)[0] for s in samples])
    return model.build_layout(samples), vision


def test_fp8_selects_the_generation_towers_linears():
    model = make_model("gqa2")  # hidden 48, heads 4x12: every gen projection is a multiple of 16 except k/v (24)
    names = fp8_linear_names(model)
    assert "layers.0.self_attn.add_q_proj" in names and "layers.1.mlp_moe_gen.down_proj" in names
    assert "layers.0.self_attn.add_k_proj" not in names  # 48 -> 24: not a multiple of 16
    assert not any(".to_q" in n or ".mlp." in n or "proj_in" in n or "lm_head" in n for n in names)
    with pytest.raises(ValueError, match="FP8 needs the model on a CUDA GPU"):
        quantize_fp8(model)
    with pytest.raises(TypeError, match="Cosmos3Transformer"):
        fp8_linear_names(torch.nn.Linear(16, 16))


def test_text_tower_offload_under_regional_compile():
    """The offload's weight-swapping hooks run inside compiled layers (encode_text goes through them): outputs stay
    those of eager, and once sizes have settled a new request compiles nothing new."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = make_model("edge")
    cfg = model.config

    def run(lengths):
        samples = [make_sample(cfg, text_len=n, vision_shape=(2, 2, 4), seed=n) for n in lengths]
        layout = model.build_layout(samples)
        latents = torch.randn(len(lengths), cfg.latent_channel, 2, 2, 4, generator=torch.Generator().manual_seed(0))
        return model(layout, latents, 300.0, text_kv_cache=model.encode_text(layout)).sample

    requests = [(4, 9), (5, 7), (6, 3), (8, 2), (3, 11)]
    with torch.no_grad():
        eager = [run(r) for r in requests]
        model.compile_repeated_blocks()
        handle = offload_text_tower(model, "cpu")
        got = [run(r) for r in requests[:3]]
        graphs = counters["stats"]["unique_graphs"]
        got += [run(r) for r in requests[3:]]
    handle.remove()
    for a, b in zip(eager, got):
        assert max_diff(a, b) <= 1e-5
    assert counters["stats"]["unique_graphs"] == graphs
