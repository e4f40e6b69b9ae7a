"""Per-rank memory and time per denoising step of `cosmos3.parallel.parallelize` against the world size, on CPU.

    python benchmarks/parallel_scaling.py                 # every plan at world sizes 1, 2, 4 (gloo)
    python benchmarks/parallel_scaling.py --steps 3 --frames 33 --height 384 --width 512

The script launches itself under `torch.distributed.run` once per (world size, plan) with a small random model
(4 layers, hidden 512, 8/4 heads of 64; the generation tower 12.6 M weights) and a guided text-to-video request
(33 frames at 384x512: 9 latent frames x 12 x 16 = 1,728 generated tokens per sample, two samples per guided step).
Per rank it reports:

* `weights MB`: the transformer's parameter bytes this rank holds (its local shards under FSDP).
* `RSS MB`: the resident set after the pipeline is built and parallelized (weights, the VAE, the interpreter).
* `peak +MB`: how far the resident set's high-water mark rose above that during the timed calls (the kernel's
  VmHWM, reset through /proc/self/clear_refs): activations, gathered weights, communication buffers, allocator
  slack. This is process RSS, not an allocator statistic.
* `s/step`: one denoising step, `(t(1 + steps) - t(1)) / steps` of whole calls, so the text tower, the latents and
  the decode (`output_type="latent"`: none) cancel out.

The largest value over the ranks is reported, and the ratio to world size 1. On a machine with fewer cores than
`ranks`, the ranks share them: each rank gets `max(1, cores // ranks)` intra-op threads (OMP_NUM_THREADS), so the
ranks x threads product stays at the core count, except where there are more ranks than cores, where the ranks
oversubscribe them (said in the table).

On GPUs, launch the worker under torchrun yourself (`benchmarks/gpu_parallel.sh` does, for the Nano and Super
shapes with random weights); memory is then the CUDA caching allocator's (`memory_allocated` after set-up, the rise
of `max_memory_allocated` during the timed calls), not RSS:

    torchrun --nproc-per-node 8 benchmarks/parallel_scaling.py --worker --device cuda --size nano \
        --plan cfg=2,ulysses=4,shard=fsdp --out nano.json --frames 93 --height 480 --width 848
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = {1: ["none"], 2: ["cfg=2", "ulysses=2", "shard=fsdp", "cfg=2,shard=fsdp"],
         4: ["cfg=2,ulysses=2", "shard=fsdp", "cfg=2,shard=fsdp", "cfg=2,ulysses=2,shard=fsdp"]}
MODEL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, rope_axes_dim=[16, 8, 8])


def parse_plan(text: str) -> dict:
    if text == "none":
        return {}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key] = value if key == "shard" else int(value)
    return out


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from cosmos3.parallel import parallelize
    from cosmos3.pipelines import Cosmos3TextToVideoPipeline
    from cosmos3.testing import tiny_parts
    from cosmos3.tokenizers.text import build_tiny_tokenizer
    from cosmos3.training.parallel import init_distributed

    info = init_distributed(args.device)
    if args.size == "small":
        pipe = Cosmos3TextToVideoPipeline(**tiny_parts(build_tiny_tokenizer(), **MODEL))
    else:
        pipe = _published_shape_pipeline(args.size, info.device)
    pipe.set_progress_bar_config(disable=True)
    cuda = info.device.type == "cuda"
    parallelize(pipe, **parse_plan(args.plan))
    if cuda:
        torch.cuda.empty_cache()  # the whole model each rank built before sharding
    weights = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                  for p in pipe.transformer.parameters()) / 2**20
    call = dict(num_frames=args.frames, height=args.height, width=args.width, guidance_scale=4.0,
                output_type="latent")

    def run(steps):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        with torch.no_grad():
            if dist.is_initialized() and cuda:
                torch.cuda.synchronize()
            pipe("a red car on a coast road", negative_prompt="blurry", generator=torch.Generator().manual_seed(0),
                 num_inference_steps=steps, **call)
            if cuda:
                torch.cuda.synchronize()
        return time.perf_counter() - start

    run(1)  # warm-up: first calls allocate, FSDP initializes lazily
    if cuda:  # on a GPU: the caching allocator's statistics instead of the process's RSS
        rss = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        rss = _rss_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    one, many = run(1), run(1 + args.steps)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb("VmHWM")
    row = torch.tensor([weights, rss, peak - rss, (many - one) / args.steps], dtype=torch.float64,
                       device=info.device)
    if dist.is_initialized():
        dist.all_reduce(row, op=dist.ReduceOp.MAX)
    if info.is_main:
        with open(args.out, "w") as f:
            json.dump(dict(zip(["weights_mb", "rss_mb", "peak_mb", "step_s"], row.tolist())), f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _published_shape_pipeline(size: str, device):
    """A Nano- or Super-shaped pipeline with random bfloat16 weights built on `device`, and a random Wan 2.2-layout
    VAE of the published latent width (its own layers small: the timed calls stop at the latents)."""
    import torch
    from diffusers import AutoencoderKLWan

    from cosmos3 import Cosmos3Transformer
    from cosmos3.pipelines import Cosmos3TextToVideoPipeline
    from cosmos3.testing import randomize_, tiny_scheduler
    from cosmos3.tokenizers.text import build_tiny_tokenizer

    with torch.device(device):
        model = Cosmos3Transformer.from_preset(size)
    torch.nn.Module.to(model, torch.bfloat16)  # (diffusers' `to` warns about the next line)
    model.time_embedder.float()  # kept float32, as `from_pretrained` keeps it
    randomize_(model, seed=0, std=0.02)
    z = model.config.patch_latent_dim // 4
    vae = AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True,
                           patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
                           scale_factor_temporal=4, latents_mean=[0.0] * z, latents_std=[1.0] * z).to(device).eval()
    return Cosmos3TextToVideoPipeline(transformer=model, text_tokenizer=build_tiny_tokenizer(), vae=vae,
                                      scheduler=tiny_scheduler())


def launch(world: int, plan: str, args, cores: int) -> dict:
    threads = max(1, cores // world)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        options = ["--worker", "--plan", plan, "--out", out, "--steps", str(args.steps), "--frames", str(args.frames),
                   "--height", str(args.height), "--width", str(args.width)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               os.path.abspath(__file__), *options]
        result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"world {world}, plan {plan} failed:\n{result.stderr[-3000:]}")
        with open(out) as f:
            return {**json.load(f), "threads": threads}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help="timed denoising steps per call")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--device", default="cpu", help="worker: cpu or cuda (launch it with torchrun yourself)")
    parser.add_argument("--size", default="small", choices=["small", "nano", "super"],
                        help="worker: the model; nano/super: the published shapes, random bfloat16 weights")
    args = parser.parse_args()
    if args.worker:
        # this script's folder would come first on sys.path; the repository root instead, as tests/parallel_run.py
        sys.path[0] = ROOT
        return worker(args)
    cores = os.cpu_count() or 1
    tokens = (1 + (args.frames - 1) // 4) * (args.height // 32) * (args.width // 32)
    print(f"{cores} cores; {tokens} generated tokens per sample, guided (2 samples per step); model {MODEL}")
    print("| ranks | plan | threads/rank | weights MB | RSS MB | peak +MB | s/step | step vs 1 | weights vs 1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for world in (int(w) for w in args.worlds.split(",")):
        for plan in PLANS[world]:
            row = launch(world, plan, args, cores)
            base = base or row
            note = " (oversubscribed)" if world > cores else ""
            print(f"| {world} | {plan} | {row['threads']}{note} | {row['weights_mb']:.1f} | {row['rss_mb']:.0f} | "
                  f"{row['peak_mb']:.0f} | {row['step_s']:.2f} | {row['step_s'] / base['step_s']:.2f} | "
                  f"{row['weights_mb'] / base['weights_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
