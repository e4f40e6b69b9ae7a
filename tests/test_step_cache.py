"""Step caches (cosmos3/step_cache.py): SeaCache against diffusers' SeaCache on the reference pipelines (transfer's
modular one included), per-sample decisions in a guided batch with the layers run on the computing rows only,
FirstBlockCache, and how both compose with the text K/V cache, the graph runner, regional compile and the distilled
students (refused)."""

import copy

import numpy as np
import pytest
import torch
from diffusers import (
    Cosmos3OmniPipeline,
    FirstBlockCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
)
from diffusers.hooks import HookRegistry
from PIL import Image

from cosmos3 import Cosmos3Sample
from cosmos3.pipelines import (
    Cosmos3ImageToVideoPipeline,
    Cosmos3TextToImagePipeline,
    Cosmos3TextToVideoPipeline,
    Cosmos3TransferPipeline,
)
from cosmos3.step_cache import step_cache_decisions
from cosmos3.testing import reference_transformer, tiny_parts

from .pipelines.conftest import gen

VIDEO = dict(num_frames=9, height=32, width=48, fps=16.0, num_inference_steps=10, output_type="np")
IMAGE = dict(height=32, width=32, num_inference_steps=10, output_type="np")


@pytest.fixture
def components(tiny_tokenizer):
    """Tiny random components, and the reference pipeline on the same weights (as tests/pipelines/conftest.py)."""
    parts = tiny_parts(tiny_tokenizer, sound=True)
    reference = Cosmos3OmniPipeline(
        **{**parts, "transformer": reference_transformer(parts["transformer"]),
           "scheduler": copy.deepcopy(parts["scheduler"]), "vae": copy.deepcopy(parts["vae"])},
        enable_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    return parts, reference


def pipeline(cls, parts):
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_reference_decisions(reference) -> list:
    """(context, step, layers ran) of every call the reference's SeaCache makes."""
    hook = HookRegistry.check_if_exists_or_initialize(reference.transformer).get_hook("sea_cache_root")
    calls, prepare = [], hook.prepare_decoder_stack

    def recording(module, und, gen_seq):
        out = prepare(module, und, gen_seq)
        context = hook.state_manager._context
        calls.append((context.name, context.step_index, out[2]))
        return out

    hook.prepare_decoder_stack = recording
    return calls


def has_cache_hooks(model) -> bool:
    return any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks for m in model.modules())


def picture(seed, size=(40, 56)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


# task: (our pipeline, our call, the reference's call, our output -> frames, the reference's output -> frames)
TASKS = {
    "t2v": (Cosmos3TextToVideoPipeline, lambda p, **k: p("a red car", negative_prompt="blurry", **VIDEO, **k),
            lambda p, **k: p("a red car", negative_prompt="blurry", **VIDEO, **k), lambda o: o.frames[0],
            lambda o: o.video),
    "t2v+sound": (Cosmos3TextToVideoPipeline, lambda p, **k: p("rain", enable_sound=True, **VIDEO, **k),
                  lambda p, **k: p("rain", enable_sound=True, **VIDEO, **k), lambda o: o.frames[0],
                  lambda o: o.video),
    "t2i": (Cosmos3TextToImagePipeline, lambda p, **k: p("a cat", **IMAGE, **k),
            lambda p, **k: p("a cat", num_frames=1, **IMAGE, **k), lambda o: o.images[0], lambda o: o.video[0]),
    "i2v": (Cosmos3ImageToVideoPipeline, lambda p, **k: p(picture(0), "a boat", **VIDEO, **k),
            lambda p, **k: p("a boat", image=picture(0), **VIDEO, **k), lambda o: o.frames[0], lambda o: o.video),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_sea_cache_matches_reference(components, task):
    parts, reference = components
    cls, call_ours, call_reference, read_ours, read_reference = TASKS[task]
    ours = pipeline(cls, parts)
    reference.transformer.enable_cache(SeaCacheConfig())
    calls = record_reference_decisions(reference)
    expected = read_reference(call_reference(reference, generator=gen(0), guidance_scale=4.0))
    ours.transformer.enable_cache(SeaCacheConfig())  # the diffusers habit, unchanged: the pipeline enters contexts
    got = read_ours(call_ours(ours, generator=gen(0), guidance_scale=4.0))

    decisions = step_cache_decisions(ours.transformer)
    assert [step for step, _ in decisions] == list(range(10))
    for name, row in (("cond", 0), ("uncond", 1)):
        theirs = [(step, ran) for context, step, ran in calls if context == name]
        assert theirs == [(step, rows[row]) for step, rows in decisions]
    assert 0 < sum(not rows[0] for _, rows in decisions) < 8  # some steps reused, some ran
    assert np.abs(got - expected).max() <= 1e-4


def test_caching_off_is_bit_identical_and_disable_restores(components):
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    kwargs = dict(VIDEO, num_inference_steps=6, guidance_scale=4.0)
    before = pipe("a dog", generator=gen(1), **kwargs).frames
    assert not has_cache_hooks(pipe.transformer)
    pipe.enable_step_cache("fast")
    cached = pipe("a dog", generator=gen(1), **kwargs).frames
    assert not np.array_equal(cached, before)  # "fast" reuses at this length
    pipe.transformer.disable_cache()
    assert not has_cache_hooks(pipe.transformer) and not pipe.transformer.is_cache_enabled
    assert np.array_equal(pipe("a dog", generator=gen(1), **kwargs).frames, before)
    pipe.enable_step_cache("balanced")
    pipe.enable_step_cache(None)
    assert pipe.model_step_factory is None and not has_cache_hooks(pipe.transformer)
    assert np.array_equal(pipe("a dog", generator=gen(1), **kwargs).frames, before)


@pytest.mark.parametrize("config", [SeaCacheConfig(threshold=0.2), FirstBlockCacheConfig(threshold=0.5)],
                         ids=["sea", "first_block"])
def test_batched_equals_single_with_caching(components, config):
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    pipe.enable_step_cache(config)
    kwargs = dict(VIDEO, guidance_scale=4.0)
    prompts, negatives = ["a red car", "waves at dusk on a long beach"], ["blurry", None]
    model = pipe.transformer
    lengths, rows_run = [], []
    handles = [model.register_forward_pre_hook(lambda _, args: lengths.append(args[0].gen_lengths)),
               model.layers[-1].mlp_moe_gen.register_forward_hook(lambda _, args, out: rows_run.append(len(args[0])))]
    batch = pipe(prompts, negative_prompt=negatives, generator=[gen(0), gen(1)], **kwargs).frames
    for handle in handles:
        handle.remove()
    batch_decisions = step_cache_decisions(model)
    assert any(len(set(rows)) > 1 for _, rows in batch_decisions)  # the samples disagree at some step
    # the layers run on the rows that compute, and only on them
    expected = [sum(n for n, ran in zip(lengths[k], rows) if ran) for k, (_, rows) in enumerate(batch_decisions)]
    assert rows_run == [n for n in expected if n]
    reused = 0
    for i, (prompt, negative) in enumerate(zip(prompts, negatives)):
        single = pipe(prompt, negative_prompt=negative, generator=gen(i), **kwargs).frames
        assert np.abs(batch[i] - single[0]).max() <= 1e-5
        # the batch's rows are [samples..., negatives...]; each decides as it would alone
        alone = step_cache_decisions(pipe.transformer)
        assert [(s, (r[i], r[2 + i])) for s, r in batch_decisions] == alone
        reused += sum(not r[0] for _, r in alone)
    assert reused > 0


def test_first_block_cache_thresholds(components):
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    kwargs = dict(VIDEO, num_inference_steps=5, guidance_scale=4.0)
    plain = pipe("a dog", generator=gen(2), **kwargs).frames
    pipe.enable_step_cache(FirstBlockCacheConfig(threshold=0.0))  # any change runs the layers
    assert np.abs(pipe("a dog", generator=gen(2), **kwargs).frames - plain).max() <= 1e-6
    assert all(all(rows) for _, rows in step_cache_decisions(pipe.transformer))
    pipe.enable_step_cache(FirstBlockCacheConfig(threshold=1e9))  # after the first full step, always reuse
    pipe("a dog", generator=gen(2), **kwargs)
    assert [all(rows) for _, rows in step_cache_decisions(pipe.transformer)] == [True, False, False, False, False]


def test_reference_first_block_cache_cannot_run_on_cosmos3(components):
    # why our FirstBlockCache is checked by its rules above and not against a reference run
    _, reference = components
    reference.transformer.enable_cache(FirstBlockCacheConfig())
    with pytest.raises(ValueError, match="hidden_states"):
        reference("a dog", num_frames=1, height=32, width=32, num_inference_steps=2, output_type="latent")


def test_graph_runner_without_capture_composes(components):
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    kwargs = dict(VIDEO, num_inference_steps=6, guidance_scale=4.0)
    pipe.enable_step_cache("fast")
    eager = pipe("a dog", generator=gen(3), **kwargs).frames
    eager_decisions = step_cache_decisions(pipe.transformer)
    pipe.enable_step_cache(None)
    pipe.enable_cuda_graphs(capture=False)
    pipe.enable_step_cache("fast")
    assert np.abs(pipe("a dog", generator=gen(3), **kwargs).frames - eager).max() <= 1e-6
    assert step_cache_decisions(pipe.transformer) == eager_decisions
    # a second request reuses the graph runner (same layout object): its trajectory still starts over
    assert np.abs(pipe("a dog", generator=gen(3), **kwargs).frames - eager).max() <= 1e-6

    pipe.enable_step_cache(None)
    pipe.enable_cuda_graphs(capture=True)
    with pytest.raises(ValueError, match="captured CUDA graph"):
        pipe.enable_step_cache("balanced")


def test_direct_model_calls_with_and_without_text_cache(components):
    """Outside a pipeline: a loop entering `cache_context` with the step coordinates, as the reference's does; the
    text tower in the step (no K/V cache) takes the same decisions and outputs."""
    parts, _ = components
    model = parts["transformer"]
    layout = model.build_layout([Cosmos3Sample(text_ids=[5, 6, 7, 8], vision_shape=(3, 4, 4))])
    x = torch.randn(1, 8, 3, 4, 4, generator=gen(4))
    sigmas = torch.linspace(0.99, 0.1, 6)
    model.enable_cache(SeaCacheConfig(threshold=10.0))

    def run(text_kv_cache):
        outs = []
        for i, sigma in enumerate(sigmas.tolist()):
            with torch.no_grad(), model.cache_context("c", step_index=i, sigma=sigma, num_inference_steps=6):
                outs.append(model(layout, x * (1 - sigma), sigma * 1000, text_kv_cache=text_kv_cache).sample)
        return outs, step_cache_decisions(model)

    runs = []
    handle = model.layers[-1].mlp_moe_gen.register_forward_hook(lambda *_: runs.append(1))
    with torch.no_grad():
        with_cache, decisions = run(model.encode_text(layout))
    handle.remove()
    assert len(runs) == sum(all(r) for _, r in decisions)  # a reused step does not run the layers at all
    without_cache, decisions_without = run(None)
    # retention step, two reuses (max_consecutive_cached), forced full, a reuse, the cache-end step
    assert decisions == decisions_without
    assert [r for _, r in decisions] == [(True,), (False,), (False,), (True,), (False,), (True,)]
    for a, b in zip(with_cache, without_cache):
        assert (a - b).abs().max() <= 1e-5
    # without a context the model runs in full, as diffusers' SeaCache does
    with torch.no_grad():
        full = model(layout, x, 500.0).sample
    model.disable_cache()
    with torch.no_grad():
        assert torch.equal(model(layout, x, 500.0).sample, full)


def test_clear_errors(components):
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    with pytest.raises(ValueError, match=r"preset 'turbo'; valid: \['balanced', 'fast', 'quality'\]"):
        pipe.enable_step_cache("turbo")
    with pytest.raises(TypeError, match="SeaCacheConfig"):
        pipe.enable_step_cache(0.25)
    with pytest.raises(ValueError, match="supports SeaCacheConfig and FirstBlockCacheConfig"):
        pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig())
    pipe.transformer.enable_cache(SeaCacheConfig())
    with pytest.raises(ValueError, match="already enabled"):
        pipe.transformer.enable_cache(SeaCacheConfig())
    pipe.enable_step_cache("quality")  # replaces what was there
    assert pipe.transformer._cache_config.threshold == 0.12


def test_indicator_leaves_out_control_clips(components):
    # transfer's vision segment is [control | target]: as the reference adapter, the all-clean control clip is not
    # part of the output, so it stays out of SeaCache's indicator (the target's clean frames stay in)
    from cosmos3.step_cache import _output_latents

    model = components[0]["transformer"]
    sample = Cosmos3Sample(text_ids=[5, 6], vision_shape=(6, 4, 4), vision_condition_frames=(0, 1, 2, 3),
                           vision_items=2)
    layout = model.build_layout([sample])
    x = torch.randn(8, 6, 4, 4)
    (latent,) = _output_latents(x, layout, 0)
    assert torch.equal(latent, x[:, 3:])


def test_transfer_matches_the_modular_reference(components, tiny_tokenizer):
    """Transfer's three guidance branches in one batch decide as the reference's three forwards ("cond",
    "cond_no_control", "uncond"); caching off again is bit-identical."""
    from diffusers.modular_pipelines.cosmos import Cosmos3OmniBlocks, Cosmos3OmniModularPipeline

    parts, _ = components
    ours = pipeline(Cosmos3TransferPipeline, parts)
    reference = Cosmos3OmniModularPipeline(blocks=Cosmos3OmniBlocks(), config_dict={"enable_safety_checker": False})
    reference.update_components(transformer=reference_transformer(parts["transformer"]),
                                vae=copy.deepcopy(parts["vae"]), text_tokenizer=tiny_tokenizer,
                                scheduler=copy.deepcopy(parts["scheduler"]))
    stack = [reference._blocks]
    while stack:
        block = stack.pop()
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        stack += list(getattr(block, "sub_blocks", {}).values())
    edge = (torch.rand(9, 1, 32, 48, generator=gen(5)) > 0.85).float().expand(-1, 3, -1, -1).contiguous()
    kwargs = dict(control_videos={"edge": edge}, height=32, width=48, negative_prompt="blurry",
                  num_inference_steps=8, guidance_scale=4.0, control_guidance=2.0, output_type="np")
    plain = ours("a red car", generator=gen(6), **kwargs).frames
    reference.transformer.enable_cache(SeaCacheConfig())
    calls = record_reference_decisions(reference)
    expected = reference(prompt="a red car", generator=gen(6), output="videos", **kwargs)
    ours.enable_step_cache("balanced")
    got = ours("a red car", generator=gen(6), **kwargs).frames
    decisions = step_cache_decisions(ours.transformer)
    for name, row in (("cond", 0), ("cond_no_control", 1), ("uncond", 2)):
        assert [(step, ran) for context, step, ran in calls if context == name] == [(s, r[row]) for s, r in decisions]
    assert 0 < sum(not r[0] for _, r in decisions) < 8
    assert np.abs(got[0] - expected).max() <= 1e-4
    ours.enable_step_cache(None)
    assert ours.branch_step_factory is None and not has_cache_hooks(ours.transformer)
    assert np.array_equal(ours("a red car", generator=gen(6), **kwargs).frames, plain)


def test_regional_compile_composes(components):
    """`compile_repeated_blocks` (as cosmos3.optimize and the benchmarks apply it) with a partial batch: the same
    decisions and outputs as eager. aot_eager traces what inductor would (dynamo, guards, graph breaks at the
    cache's decisions) without generating C++ on the CPU."""
    parts, _ = components
    pipe = pipeline(Cosmos3TextToVideoPipeline, parts)
    pipe.enable_step_cache(SeaCacheConfig(threshold=0.2))
    kwargs = dict(VIDEO, guidance_scale=4.0)
    prompts, negatives = ["a red car", "waves at dusk on a long beach"], ["blurry", None]
    eager = pipe(prompts, negative_prompt=negatives, generator=[gen(0), gen(1)], **kwargs).frames
    decisions = step_cache_decisions(pipe.transformer)
    assert any(len(set(rows)) > 1 for _, rows in decisions)
    torch._dynamo.reset()
    try:
        pipe.transformer.compile_repeated_blocks(backend="aot_eager")
        compiled = pipe(prompts, negative_prompt=negatives, generator=[gen(0), gen(1)], **kwargs).frames
    finally:
        torch._dynamo.reset()
    assert step_cache_decisions(pipe.transformer) == decisions
    assert np.abs(compiled - eager).max() <= 1e-5


def test_distilled_students_refuse_caching(components):
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts, _ = components
    student = Cosmos3TextToVideoPipeline(**{**parts, "scheduler": FlowMatchEulerDiscreteScheduler(
        stochastic_sampling=True, shift=1.0)}, distilled_sigmas=[1.0, 15 / 16, 5 / 6, 5 / 8])
    student.set_progress_bar_config(disable=True)
    assert not has_cache_hooks(student.transformer)  # off by default
    with pytest.raises(ValueError, match="off for distilled checkpoints .* fixed 4-step schedule"):
        student.enable_step_cache("fast")
    student.transformer.enable_cache(SeaCacheConfig())  # the diffusers habit is refused at the call
    with pytest.raises(ValueError, match="off for distilled checkpoints"):
        student("a dog", num_frames=9, height=32, width=48, num_inference_steps=4, guidance_scale=1.0)
    student.transformer.disable_cache()
