"""One command per workload: ours against the reference (diffusers `Cosmos3OmniTransformer` / `Cosmos3OmniPipeline`)
on the same configuration, random weights, in the same process.

    python benchmarks/workloads.py t2v-step        # CPU: a small configuration (the default --size small)
    python benchmarks/workloads.py t2i
    python benchmarks/workloads.py t2v-distilled
    python benchmarks/workloads.py i2v
    python benchmarks/workloads.py policy
    python benchmarks/workloads.py all
    python benchmarks/workloads.py all --dtype bfloat16 --attention tiled   # CPU in bfloat16 (AVX512-BF16 / AMX)

    # GPU, the issue's targets (Nano / Edge sizes, random weights, the reference shares our weights' memory):
    python benchmarks/workloads.py t2v-step --device cuda --dtype bfloat16 --size full --compile --fused-kernels
    python benchmarks/workloads.py t2i --device cuda --dtype bfloat16 --size full --compile --fused-kernels
    python benchmarks/workloads.py t2v-distilled --device cuda --dtype bfloat16 --size full --compile --cuda-graphs
    python benchmarks/workloads.py i2v --device cuda --dtype bfloat16 --size full --compile --fused-kernels
    python benchmarks/workloads.py policy --device cuda --dtype bfloat16 --size full --cuda-graphs

Workloads:

* `t2v-step`: one guided denoising step of text-to-video (cond + uncond). Reference: two full forwards, as its
  pipeline runs them. Ours: one batched forward of the generation tower over the request's text K/V cache (built
  once per request; its time is printed apart). Full size: 480p, 189 frames (18,720 video tokens).
* `t2i`: text-to-image end to end (prompt encoding, 35 guided steps by default, VAE decode). Full size: 704x1280
  (720p rounded to the 32-pixel grid the patch and VAE need).
* `t2v-distilled`: 4 steps without guidance end to end. Ours runs the distilled students' re-noising sampler; the
  reference its UniPC at 4 steps: the same 4 transformer forwards each. Full size: 480p, 93 frames (the
  reference's demo length for students; `--frames` to change).
* `i2v`: image-to-video end to end (image encoding, prompt encoding, 35 guided steps by default, VAE decode).
  Ours encodes the image alone, the reference the image repeated to the clip's length. Small: 33x256x448; full:
  480p, 93 frames.
* `policy`: one action chunk (DROID 256 tier, chunk 32) at 4 steps, guidance 1, from a fresh observation. Full
  size: Edge.
* `transfer`: control-conditioned video end to end with edge + blur hints, text guidance 6 and control guidance
  1.5 (three branches per step), two windows. Reference: diffusers' modular `Cosmos3OmniBlocks` (its transfer
  branch), which runs each branch as its own forward; ours batches the branches. Small: 17x256x448, windows of 9
  frames; full: 480p, 61 frames in windows of 29.

Columns: median seconds after a warm-up; peak memory above the pre-run baseline (CUDA: `max_memory_allocated`;
CPU: resident set size sampled every 2 ms); the ratio ours / reference (below 1 is faster) ; MFU: model FLOPs of
the transformer work each side must do (performance.md's formula: the text tower once per prompt, the generation
tower per forward) over the measured time and `--peak-tflops`. End-to-end rows include text encoding and the VAE
in the time, so their MFU is lower than a step's. Outputs are checked equal (same seed) before timing, except
`t2v-distilled`, whose samplers differ by design.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import threading
import time
from math import nan

import numpy as np
import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition
from flops import forward_flops
from PIL import Image
from pipelines import PROMPT
from timing import timed

from cosmos3 import (
    ActionRequest,
    Cosmos3ImageToVideoPipeline,
    Cosmos3Sample,
    Cosmos3TextToImagePipeline,
    Cosmos3TextToVideoPipeline,
    Cosmos3Transformer,
    Cosmos3WorldActionPipeline,
)
from cosmos3.models.transformer_cosmos3 import COSMOS3_PRESETS
from cosmos3.testing import make_tiny_vae, randomize_, reference_inputs, reference_transformer
from cosmos3.tokenizers.text import build_tiny_tokenizer

WORKLOADS = ("t2v-step", "t2i", "t2v-distilled", "i2v", "policy", "transfer")
# The released Wan 2.2 VAE (48 latent channels, 16x spatial, 4x temporal), randomly initialised.
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48,
                 latents_std=[1.0] * 48)
DISTILLED_SIGMAS = [1.0, 15 / 16, 5 / 6, 5 / 8]  # the released students' schedule


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of a block above its starting point, in MiB (CUDA allocator, else sampled process RSS)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.mib = (self.peak - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn, device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak MiB of one call above the baseline)."""
    seconds = timed(fn, device, repeats)
    with PeakMemory(device) as peak:
        fn()
    return seconds, peak.mib


def reference_or_oom(fn):
    """`fn()`, or None when the device runs out of memory: at full size the reference may not fit where ours does,
    and that is a result to print, not a reason to lose ours."""
    try:
        return fn()
    except (torch.OutOfMemoryError, RuntimeError) as error:
        # cuBLAS / cuDNN allocation failures arrive as plain RuntimeErrors
        if not isinstance(error, torch.OutOfMemoryError) and not any(
                text in str(error) for text in ("out of memory", "ALLOC_FAILED")):
            raise
    # outside the except block: the traceback no longer holds the failed call's tensors
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print("the reference ran out of device memory; its rows read nan", flush=True)
    return None


def gemm_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved TFLOP/s of one large square matmul here, now (8192 on CUDA, 2048 on CPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, device, 5) / 1e12


class FlopCounter:
    """Model FLOPs of what a Cosmos3Transformer is asked to do: text once per `encode_text` (or per uncached
    forward), the generation tower per forward (`benchmarks/flops.py`)."""

    def __init__(self, model: Cosmos3Transformer):
        self.model, self.flops = model, 0.0
        self.handle = model.register_forward_pre_hook(self._forward, with_kwargs=True)
        self.encode = model.encode_text
        model.encode_text = self._encode_text

    def _forward(self, module, args, kwargs):
        layout = args[0]
        cached = kwargs.get("text_kv_cache") is not None
        for text, gen in zip(layout.text_lengths, layout.gen_lengths):
            t, g = forward_flops(self.model, text, gen)
            self.flops += g + (0 if cached else t)

    def _encode_text(self, layout):
        self.flops += sum(forward_flops(self.model, n, 0)[0] for n in layout.text_lengths)
        return self.encode(layout)

    def per_call(self, fn) -> float:
        self.flops = 0.0
        fn()
        return self.flops

    def close(self):
        self.handle.remove()
        self.model.encode_text = self.encode


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def build_transformer(args, preset: str, vocab_size: int, latent_channel: int) -> Cosmos3Transformer:
    if args.size == "full":
        config = dict(COSMOS3_PRESETS[preset], vocab_size=vocab_size)
        if args.layers:
            config["num_hidden_layers"] = args.layers
    else:
        h = 1024 if preset == "nano" else 512
        config = dict(hidden_size=h, intermediate_size=3 * h, num_hidden_layers=args.layers or 4,
                      num_attention_heads=h // 64, num_key_value_heads=max(1, h // 256), head_dim=64,
                      rope_axes_dim=[12, 10, 10], vocab_size=vocab_size, action_gen=True, action_dim=64)
    config.update(latent_channel=latent_channel, patch_latent_dim=latent_channel * 4)
    with torch.device(args.device):
        model = Cosmos3Transformer(**config)
    return randomize_(model, std=0.02).eval().to(args.dtype)


def speed_up(model: Cosmos3Transformer, args) -> None:
    """Our switches, from outside the model file."""
    model.set_attention_backend(args.attention)
    if args.fused_kernels:
        from cosmos3.kernels import apply_fused_kernels

        apply_fused_kernels(model)
    if args.fp8:
        from cosmos3.optimize import quantize_fp8

        quantize_fp8(model)
    if args.compile:
        model.compile_repeated_blocks()


def build_pipelines(args, preset: str):
    """Our pipelines and the reference's, on one random checkpoint (the reference transformer shares its weights)."""
    tokenizer = build_tiny_tokenizer()
    if args.size == "full":
        with torch.device(args.device):  # built and randomized where it runs (705M parameters)
            vae = AutoencoderKLWan(**WAN22_VAE)
        randomize_(vae, std=0.02)
    else:
        vae = make_tiny_vae()
    vae = vae.eval().to(args.device)
    model = build_transformer(args, preset, len(tokenizer), int(vae.config.z_dim))
    reference_model = reference_transformer(model, share_weights=True)
    speed_up(model, args)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    parts = dict(transformer=model, text_tokenizer=tokenizer, vae=vae, scheduler=scheduler)
    # diffusers' own VAE for the reference: our pipelines accelerate theirs in place (cosmos3.tokenizers.fast_wan)
    reference = Cosmos3OmniPipeline(**{**parts, "transformer": reference_model, "scheduler": copy.deepcopy(scheduler),
                                       "vae": copy.deepcopy(vae)}, enable_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    return parts, reference, model


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Workloads: each returns rows (name, seconds, peak MiB, FLOPs per call) and a check (max abs diff or None)
# ---------------------------------------------------------------------------------------------------------------


def t2v_step(args):
    tokenizer_vocab = 32000
    model = build_transformer(args, "nano", tokenizer_vocab, 48)
    reference = reference_transformer(model, share_weights=True)
    speed_up(model, args)
    latent_shape = (48, 30, 52) if args.size == "full" else (8, 32, 32)
    g = gen(0)
    cond, uncond = (Cosmos3Sample(text_ids=torch.randint(0, 1000, (n,), generator=g).tolist(),
                                  vision_shape=latent_shape, fps=24.0) for n in (300, 280))
    latents = torch.randn(48, *latent_shape, generator=g).to(args.device, args.dtype)
    t = 700.0
    ref_kwargs = [reference_inputs(model.config, s, latents, t) for s in (cond, uncond)]
    layout = model.build_layout([cond, uncond])
    cache = model.encode_text(layout)
    batch = torch.stack([latents, latents])

    def reference_step():
        return [reference(**kw, return_dict=False)[0][0][0] for kw in ref_kwargs]

    step = lambda: model(layout, batch, t, text_kv_cache=cache, return_dict=False)[0]  # noqa: E731
    if args.cuda_graphs:
        from cosmos3.optimize import CUDAGraphStep

        graph = CUDAGraphStep(model, layout, cache, batch)
        step = lambda: graph(batch, t)[0]  # noqa: E731
    expected = reference_or_oom(reference_step)
    diff = None if expected is None else max((a.float() - b.float()).abs().max().item()
                                             for a, b in zip(expected, step()))
    del expected
    counter = FlopCounter(model)
    flops = counter.per_call(lambda: model(layout, batch, t, text_kv_cache=cache))
    cache_flops = counter.per_call(lambda: model.encode_text(layout))
    counter.close()
    device = torch.device(args.device)
    reference_row = None if diff is None else reference_or_oom(lambda: measure(reference_step, device, args.repeats))
    rows = [("reference: 2 forwards", *(reference_row or (nan, nan)), flops),
            ("ours: 1 batched forward over the text cache", *measure(step, device, args.repeats), flops),
            ("ours: text cache, once per request", *measure(lambda: model.encode_text(layout), device, args.repeats),
             cache_flops)]
    return rows, diff


def t2i(args):
    parts, reference, model = build_pipelines(args, "nano")
    pipe = Cosmos3TextToImagePipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    h, w = (704, 1280) if args.size == "full" else (512, 512)
    common = dict(num_inference_steps=args.steps or 35, guidance_scale=6.0, output_type="np")
    theirs = lambda: reference(PROMPT, num_frames=1, height=h, width=w, generator=gen(), **common).video  # noqa: E731
    ours = lambda: pipe(PROMPT, height=h, width=w, generator=gen(), **common).images[0][None]  # noqa: E731
    return pipeline_rows(args, model, theirs, ours, check=True)


def t2v_distilled(args):
    parts, reference, model = build_pipelines(args, "nano")
    # the students' scheduler: the fixed sigmas, re-noised stochastically
    student_scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=1.0)
    pipe = Cosmos3TextToVideoPipeline(**{**parts, "scheduler": student_scheduler}, distilled_sigmas=DISTILLED_SIGMAS)
    pipe.set_progress_bar_config(disable=True)
    if args.cuda_graphs:
        pipe.enable_cuda_graphs()
    frames = args.frames or (93 if args.size == "full" else 33)
    size = dict(num_frames=frames, height=480, width=832) if args.size == "full" else dict(
        num_frames=frames, height=256, width=448)
    common = dict(num_inference_steps=4, guidance_scale=1.0, output_type="np", **size)
    theirs = lambda: reference(PROMPT, generator=gen(), **common).video  # noqa: E731
    ours = lambda: pipe(PROMPT, generator=gen(), **common).frames[0]  # noqa: E731
    return pipeline_rows(args, model, theirs, ours, check=False)


def i2v(args):
    parts, reference, model = build_pipelines(args, "nano")
    pipe = Cosmos3ImageToVideoPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    frames = args.frames or (93 if args.size == "full" else 33)
    size = dict(height=480, width=832) if args.size == "full" else dict(height=256, width=448)
    common = dict(num_frames=frames, num_inference_steps=args.steps or 35, guidance_scale=6.0, output_type="np",
                  **size)
    theirs = lambda: reference(PROMPT, image=image, generator=gen(), **common).video  # noqa: E731
    ours = lambda: pipe(image, PROMPT, generator=gen(), **common).frames[0]  # noqa: E731
    return pipeline_rows(args, model, theirs, ours, check=True)


def policy(args):
    parts, reference, model = build_pipelines(args, "edge" if args.size == "full" else "small")
    pipe = Cosmos3WorldActionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    if args.cuda_graphs:
        pipe.enable_cuda_graphs()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    chunk = 32 if args.size == "full" else 16
    common = dict(num_inference_steps=args.steps or 4, guidance_scale=1.0, fps=15.0, generator=None)

    def theirs():
        condition = CosmosActionCondition(mode="policy", chunk_size=chunk, domain_name="droid_lerobot", image=image,
                                          resolution_tier=256)
        return reference("pick up the cup", action=condition, **{**common, "generator": gen()},
                         output_type="latent").action[0]

    def ours():
        request = ActionRequest(mode="policy", chunk_size=chunk, domain_name="droid_lerobot", image=image,
                                resolution_tier=256)
        return pipe("pick up the cup", request, **{**common, "generator": gen()}, output_type="latent").action[0]

    return pipeline_rows(args, model, theirs, ours, check=True)


def pipeline_rows(args, model, theirs, ours, check: bool):
    device = torch.device(args.device)
    diff, fits = None, True
    if check:
        a = reference_or_oom(theirs)
        fits = a is not None
        if fits:
            b = ours()
            a = a.float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
            b = b.float().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
            diff = float(np.abs(a - b).max())
        del a
    reference_row = reference_or_oom(lambda: measure(theirs, device, args.repeats)) if fits else None
    counter = FlopCounter(model)
    flops = counter.per_call(ours)
    counter.close()
    rows = [("reference pipeline", *(reference_row or (nan, nan)), flops),
            ("ours", *measure(ours, device, args.repeats), flops)]
    return rows, diff


def transfer(args):
    from diffusers.modular_pipelines.cosmos import Cosmos3OmniBlocks, Cosmos3OmniModularPipeline

    from cosmos3.pipelines import Cosmos3TransferPipeline

    parts, _, model = build_pipelines(args, "nano")
    pipe = Cosmos3TransferPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    reference = Cosmos3OmniModularPipeline(blocks=Cosmos3OmniBlocks(), config_dict={"enable_safety_checker": False})
    reference.update_components(transformer=reference_transformer(model, share_weights=True),
                                vae=copy.deepcopy(parts["vae"]), text_tokenizer=parts["text_tokenizer"],
                                scheduler=copy.deepcopy(parts["scheduler"]))
    stack = [reference._blocks]
    while stack:  # the modular pipeline's own switch reaches only its top-level blocks
        block = stack.pop()
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        stack += list(getattr(block, "sub_blocks", {}).values())
    frames, window = (61, 29) if args.size == "full" else (args.frames or 17, 9)
    height, width = (480, 832) if args.size == "full" else (256, 448)
    g = gen(1)
    edge = (torch.rand(frames, 1, height, width, generator=g) > 0.9).float().expand(-1, 3, -1, -1).contiguous()
    blur = torch.nn.functional.interpolate(torch.rand(frames, 3, height // 16, width // 16, generator=g),
                                           size=(height, width), mode="bilinear").clamp(0, 1)
    common = dict(control_videos={"edge": edge, "blur": blur}, height=height, width=width,
                  num_inference_steps=args.steps or 35, guidance_scale=6.0, control_guidance=1.5,
                  num_video_frames_per_chunk=window, output_type="np")
    theirs = lambda: reference(prompt=PROMPT, generator=gen(), output="videos", **common)  # noqa: E731
    ours = lambda: pipe(PROMPT, generator=gen(), **common).frames[0]  # noqa: E731
    return pipeline_rows(args, model, theirs, ours, check=True)


RUNNERS = {"t2v-step": t2v_step, "t2i": t2i, "t2v-distilled": t2v_distilled, "i2v": i2v, "policy": policy,
           "transfer": transfer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=[*WORKLOADS, "all"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--size", default="small", choices=["small", "full"],
                        help="small: CPU-sized twins; full: the Nano (Edge for policy) presets and the real VAE")
    parser.add_argument("--layers", type=int, default=None, help="a slice of the depth (default: all / 4 small)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps of t2i, i2v (35) / policy (4)")
    parser.add_argument("--frames", type=int, default=None, help="frames of t2v-distilled, i2v")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="ours: compile_repeated_blocks()")
    parser.add_argument("--fused-kernels", action="store_true", help="ours: cosmos3.kernels.apply_fused_kernels")
    parser.add_argument("--fp8", action="store_true", help="ours: cosmos3.optimize.quantize_fp8 (CUDA, torchao)")
    parser.add_argument("--cuda-graphs", action="store_true", help="ours: replay steps from a CUDA graph")
    parser.add_argument("--attention", default="native", help="ours: set_attention_backend (e.g. tiled on a bf16 CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="for MFU (default: 989 on CUDA, the H100/H200 bf16 dense peak; none on CPU)")
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    args.dtype = getattr(torch, args.dtype)
    peak = args.peak_tflops or (989.0 if args.device.startswith("cuda") else None)
    gemm = gemm_tflops(torch.device(args.device), args.dtype)
    switches = [name for name in ("compile", "fused_kernels", "fp8", "cuda_graphs") if getattr(args, name)]
    print(f"device={args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}) "
          f"dtype={str(args.dtype)[6:]} size={args.size} layers={args.layers or 'default'} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} ours+={','.join(switches) or 'none'} attention={args.attention}")
    print(f"GEMM ceiling measured now: {gemm:.3f} TFLOP/s; MFU against {peak or '-'} TFLOP/s, '/GEMM' against the "
          "ceiling")
    for workload in WORKLOADS if args.workload == "all" else [args.workload]:
        rows, diff = RUNNERS[workload](args)
        reference_s = rows[0][1]
        print(f"\n{workload}" + ("" if diff is None else f"  (max |ours - reference| = {diff:.2e})"))
        print(f"{'':46s} {'s':>9s} {'peak MiB':>9s} {'/ref':>6s} {'TFLOP':>8s} {'MFU':>6s} {'/GEMM':>6s}")
        for name, seconds, mib, flops in rows:
            mfu = f"{100 * flops / seconds / (peak * 1e12):5.1f}%" if peak else "    -"
            ratio = f"{seconds / reference_s:6.2f}" if "once per request" not in name else "     -"
            of_gemm = 100 * flops / seconds / (gemm * 1e12)
            print(f"{name:46s} {seconds:9.4f} {mib:9.0f} {ratio} {flops / 1e12:8.3f} {mfu} {of_gemm:5.1f}%", flush=True)


if __name__ == "__main__":
    main()
