"""Step caches (cosmos3/step_cache.py): SeaCache on the reference pipeline and on ours, and our presets.

    python benchmarks/step_cache.py                          # CPU, a small transformer, t2v and t2i
    python benchmarks/step_cache.py --device cuda --hidden 2048 --layers 16 --steps 35

One call per row, same seed, after one warm-up call of each pipeline. Columns: wall and CPU seconds, speed-up
against the reference without a cache (by CPU seconds on the CPU, where a shared machine makes wall time noisy; by
wall time on a GPU), how many steps ran the layers (of the total), and the error of the output against the
same pipeline's uncached output (relative L2 and PSNR of the decoded frames in [0, 1]). The weights are random, so
the errors say how far a cache moves a sample, not how good it looks.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time

import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline, FirstBlockCacheConfig, SeaCacheConfig, UniPCMultistepScheduler
from diffusers.hooks import HookRegistry

from cosmos3 import Cosmos3TextToImagePipeline, Cosmos3TextToVideoPipeline, Cosmos3Transformer
from cosmos3.step_cache import step_cache_decisions, step_cache_presets
from cosmos3.testing import make_tiny_vae, randomize_, reference_transformer
from cosmos3.tokenizers.text import build_tiny_tokenizer

PROMPT = "A red car drives along a coastal road at dusk while waves break on the rocks below."
NEGATIVE = "blurry, low quality"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def once(fn, device: torch.device) -> tuple[tuple[float, float], np.ndarray]:
    """(wall seconds, this process's CPU seconds) of one call, and its output."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start, time.process_time() - cpu), out


def errors(out: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    out, base = out.astype(np.float64), base.astype(np.float64)
    rel = float(np.linalg.norm(out - base) / max(np.linalg.norm(base), 1e-12))
    mse = float(np.mean((out - base) ** 2))
    return rel, (math.inf if mse == 0 else 10 * math.log10(1.0 / mse))


def reference_full_steps(reference) -> list:
    """Records, per call of the reference's SeaCache, whether the layers ran."""
    hook = HookRegistry.check_if_exists_or_initialize(reference.transformer).get_hook("sea_cache_root")
    calls, prepare = [], hook.prepare_decoder_stack

    def recording(module, und, gen_seq):
        out = prepare(module, und, gen_seq)
        calls.append((hook.state_manager._context.step_index, out[2]))
        return out

    hook.prepare_decoder_stack = recording
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=224)
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("cosmos3").setLevel(logging.ERROR)
    device = torch.device(args.device)

    tokenizer = build_tiny_tokenizer()
    h = args.hidden
    torch.manual_seed(0)
    model = Cosmos3Transformer(
        hidden_size=h, intermediate_size=3 * h, num_hidden_layers=args.layers, num_attention_heads=max(1, h // 64),
        num_key_value_heads=max(1, h // 256), head_dim=64, rope_axes_dim=[12, 10, 10], vocab_size=len(tokenizer),
        latent_channel=8, patch_latent_dim=32,
    )
    model = randomize_(model, std=0.02).eval().to(device)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    parts = dict(transformer=model, text_tokenizer=tokenizer, vae=make_tiny_vae().to(device), scheduler=scheduler)
    reference = Cosmos3OmniPipeline(**{**parts, "transformer": reference_transformer(model, share_weights=True),
                                       "scheduler": copy.deepcopy(scheduler), "vae": copy.deepcopy(parts["vae"])},
                                    enable_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    tasks = {
        f"t2v {args.frames}x{args.height}x{args.width}": (
            Cosmos3TextToVideoPipeline, dict(num_frames=args.frames, height=args.height, width=args.width, fps=16.0),
            lambda out: out.frames[0], lambda out: out.video),
        f"t2i {args.height}x{args.width}": (
            Cosmos3TextToImagePipeline, dict(height=args.height, width=args.width),
            lambda out: out.images[0], lambda out: out.video[0]),
    }
    print(f"transformer hidden {h}, {args.layers} layers; {args.steps} steps, guidance 4.0, {device}; one call each\n")
    for task, spec in tasks.items():
        bench_task(task, *spec, parts=parts, reference=reference, args=args, device=device)

def bench_task(task, cls, size, read_ours, read_ref, *, parts, reference, args, device) -> None:
    ours = cls(**parts)
    ours.set_progress_bar_config(disable=True)
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=4.0, output_type="np")
    ref_size = size if "num_frames" in size else {**size, "num_frames": 1}

    def run_ref():
        return read_ref(reference(PROMPT, generator=gen(), **common, **ref_size))

    def run_ours():
        return read_ours(ours(PROMPT, generator=gen(), **common, **size))

    run_ref(), run_ours()  # warm-up
    rows = []
    ref_seconds, ref_base = once(run_ref, device)
    rows.append(("reference, uncached", ref_seconds, args.steps, ref_base, ref_base))
    reference.transformer.enable_cache(SeaCacheConfig())
    calls = reference_full_steps(reference)
    seconds, out = once(run_ref, device)
    rows.append(("reference + SeaCache()", seconds, len({s for s, ran in calls if ran}), out, ref_base))
    reference.transformer.disable_cache()

    seconds, base = once(run_ours, device)
    rows.append(("ours, uncached", seconds, args.steps, base, base))
    configs = [("ours + SeaCache()", SeaCacheConfig())]
    configs += [(f"ours + preset {name!r}", config) for name, config in step_cache_presets().items()]
    configs += [("ours + FirstBlockCache(0.05)", FirstBlockCacheConfig(threshold=0.05))]
    for name, config in configs:
        ours.enable_step_cache(config)
        seconds, out = once(run_ours, device)
        full = sum(any(ran) for _, ran in step_cache_decisions(ours.transformer))
        rows.append((name, seconds, full, out, base))
    ours.enable_step_cache(None)

    print(task)
    print(f"{'':34} {'wall s':>8} {'CPU s':>8} {'speed-up':>9} {'full steps':>11} {'rel L2':>9} {'PSNR dB':>8}")
    pick = 0 if device.type == "cuda" else 1
    for name, seconds, full, out, own_base in rows:
        rel, psnr = errors(out, own_base)
        print(f"{name:34} {seconds[0]:8.3f} {seconds[1]:8.3f} {ref_seconds[pick] / seconds[pick]:8.2f}x "
              f"{full:>5}/{args.steps:<5} {rel:9.2e} {psnr:8.1f}")
    print()

if __name__ == "__main__":
    main()
