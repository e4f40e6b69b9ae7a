"""What only a GPU shows: CUDA graph capture and replay, SDPA on its fused kernels (no math fallback), the text
tower offloaded to pinned host memory, FP8 GEMMs, and regional compilation through Inductor's GPU code.

Skipped without CUDA (CI has none; the same code paths run on CPU in test_optimize.py without capture). On the
device machine `bash benchmarks/gpu_session.sh tests` runs this file with tests/kernels.
"""

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cosmos3.models.attention import flash_varlen_available
from cosmos3.optimize import CUDAGraphStep, fp8_linear_names, offload_text_tower, quantize_fp8, text_tower_modules
from cosmos3.pipelines import Cosmos3TextToVideoPipeline, Cosmos3WorldActionPipeline

from .models.test_transformer_cosmos3 import make_inputs, make_model, make_sample, make_wide_model, max_diff
from .pipelines.conftest import components, gen  # noqa: F401  (fixture)
from .test_optimize import batch, batch_simple, policy_request

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def to_cuda(*tensors):
    return [None if t is None else t.to(CUDA) for t in tensors]


def test_captured_step_replays_the_eager_step():
    model = make_model("sound_action").to(CUDA)
    layout, *inputs = batch(model)
    vision, sound, action = to_cuda(*inputs)
    with torch.no_grad():
        cache = model.encode_text(layout)
        step = CUDAGraphStep(model, layout, cache, vision, sound, action)
        assert step.graph is not None
        for t, scale in ((900.0, 1.0), (torch.tensor(400.0, device=CUDA), 0.5), (37.5, -2.0)):
            args = (vision * scale, sound * scale, action * scale)
            expected = model(layout, args[0], t, sound=args[1], action=args[2], text_kv_cache=cache,
                             return_dict=False)
            got = step(*args[:1], t, *args[1:])
            for a, b in zip(expected, got):
                assert max_diff(a, b) <= 1e-5  # the replayed kernels are the eager ones; allow cuBLAS's choice


def test_pipeline_with_cuda_graphs_equals_eager(components):  # noqa: F811
    parts, _ = components
    pipe = Cosmos3TextToVideoPipeline(**parts).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_frames=5, height=32, width=48, num_inference_steps=3, guidance_scale=3.0, output_type="np")
    expected = [pipe("a red ball", generator=gen(s), **kw).frames for s in (1, 2)]
    pipe.enable_cuda_graphs()
    got = [pipe("a red ball", generator=gen(s), **kw).frames for s in (1, 2)]  # the second replays the first's
    assert pipe._graph_step[1].graph is not None
    for a, b in zip(expected, got):
        assert np.abs(a - b).max() <= 1e-5


def test_policy_with_cuda_graphs_equals_eager(components):  # noqa: F811
    parts, _ = components
    pipe = Cosmos3WorldActionPipeline(**parts).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, output_type="np", fps=15.0, guidance_scale=1.0)
    expected = [pipe("pick up the block", policy_request(s), generator=gen(s), **kw).action[0] for s in (1, 2)]
    pipe.enable_cuda_graphs()
    got = [pipe("pick up the block", policy_request(s), generator=gen(s), **kw).action[0] for s in (1, 2)]
    assert pipe._graph_step[1].graph is not None
    for a, b in zip(expected, got):
        assert (a - b).abs().max() <= 1e-5


def mixed_lengths(model):
    """Two samples of different text and video lengths: the native backend pads and needs a key-padding mask."""
    cfg = model.config
    samples = [make_sample(cfg, text_len=n, vision_shape=shape, action=4, sound=3, seed=n)
               for n, shape in ((13, (2, 4, 6)), (5, (1, 4, 4)))]
    inputs = [make_inputs(cfg, s) for s in samples]
    return model.build_layout(samples), [[x[i] for x in inputs] for i in range(3)]


@pytest.mark.parametrize("backend", ["native", "flex", "flash_varlen"])
def test_attention_runs_without_the_math_kernel(backend):
    if backend == "flash_varlen" and not flash_varlen_available():
        pytest.skip("neither flash_attn nor torch.nn.attention.varlen is available")
    model = make_wide_model().to(CUDA, torch.bfloat16)
    layout, inputs = mixed_lengths(model)
    vision, sound, action = ([x.to(CUDA, torch.bfloat16) for x in xs] for xs in inputs)
    t = torch.tensor([700.0, 30.0], device=CUDA)

    def run():
        cache = model.encode_text(layout)
        return model(layout, vision, t, sound=sound, action=action, text_kv_cache=cache).sample

    with torch.no_grad():
        with sdpa_kernel([SDPBackend.MATH]):
            expected = run()
        model.set_attention_backend(backend)
        fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        with sdpa_kernel(fused):  # raises "No available kernel" where SDPA would fall back to math
            got = run()
    for a, b in zip(expected, got):
        # same bf16 weights on both sides: only the attention kernels differ (~1% after two layers)
        err = ((b.float() - a.float()).norm() / a.float().norm()).item()
        assert err < 0.03, f"{backend}: relative error {err:.3g} against SDPA's math kernel"


def test_text_tower_offload_frees_gpu_memory_and_keeps_outputs():
    model = make_model("edge").to(CUDA)
    layout, vision = batch_simple(model)
    vision = vision.to(CUDA)
    modules = text_tower_modules(model)
    tower_bytes = sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
    with torch.no_grad():
        expected = model(layout, vision, 500.0).sample
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    handle = offload_text_tower(model)
    offloaded = torch.cuda.memory_allocated()
    assert resident - offloaded >= tower_bytes
    assert all(p.device.type == "cpu" and p.is_pinned() for m in modules for p in m.parameters())
    with torch.no_grad():
        got = model(layout, vision, 500.0, text_kv_cache=model.encode_text(layout)).sample
    assert max_diff(expected, got) <= 1e-6
    del got
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - offloaded < tower_bytes  # the streamed copies were dropped
    handle.remove()
    assert all(p.device.type == "cuda" for m in modules for p in m.parameters())


def test_fp8_generation_tower_runs_close_to_bfloat16():
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 GEMMs need compute capability 8.9 or newer")
    model = make_wide_model().to(CUDA, torch.bfloat16)
    layout, (vision, sound, action) = mixed_lengths(model)
    args = [[x.to(CUDA, torch.bfloat16) for x in xs] for xs in (vision, sound, action)]
    t = torch.tensor([700.0, 30.0], device=CUDA)
    with torch.no_grad():
        expected = model(layout, args[0], t, sound=args[1], action=args[2]).sample
        quantize_fp8(model)
        got = model(layout, args[0], t, sound=args[1], action=args[2]).sample
    names = fp8_linear_names(model)
    modules = dict(model.named_modules())
    assert names and all(type(modules[n].weight) not in (torch.Tensor, torch.nn.Parameter) for n in names)
    for a, b in zip(expected, got):
        err = ((b.float() - a.float()).norm() / a.float().norm()).item()
        assert 0 < err < 0.15, f"relative error {err:.3g} against bfloat16"  # 0: the FP8 path did run


def test_compiled_layers_match_eager_on_gpu():
    model = make_model("sound_action").to(CUDA)
    layout, *inputs = batch(model)
    vision, sound, action = to_cuda(*inputs)
    t = torch.tensor([700.0, 20.0], device=CUDA)
    with torch.no_grad():
        cache = model.encode_text(layout)
        expected = model(layout, vision, t, sound=sound, action=action, text_kv_cache=cache, return_dict=False)
        model.compile_repeated_blocks()
        got = model(layout, vision, t, sound=sound, action=action, text_kv_cache=cache, return_dict=False)
    for a, b in zip(expected, got):
        assert max_diff(a, b) <= 1e-4
