"""A paper estimate (not a measurement) of Cosmos3-Super text-to-video, 720p x 189 frames, on 8xH200 under
`parallelize(pipe, cfg=2, ulysses=4, shard="fsdp")`: model FLOPs per step (`benchmarks/flops.py` on Super's
config, built on the meta device), compute time at a stated MFU, and the bytes each collective moves per step
over NVLink at a stated bandwidth. Every input is a flag, so the arithmetic can be checked and redone.

    python benchmarks/parallel_estimate.py                      # the defaults below
    python benchmarks/parallel_estimate.py --mfu 0.45 --a2a-gbps 200

Shapes: 189 frames -> 48 latent frames (4x temporal), 720x1280 -> 45x80 latents (16x spatial) -> 23x40 patches
(2x2, the odd row padded): 44,160 generated tokens, the issue's "~44k". The prompt (with the system prompt and
templates) is taken as 512 text tokens. What the estimate leaves out: the VAE decode (parallel decode is not
counted here) and the process start and weight loading, which the peers' end-to-end figures may include.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flops import forward_flops, tower_weights  # noqa: E402

H200_BF16_DENSE = 989e12  # FLOP/s, the datasheet's dense (no sparsity) bf16 peak, as benchmarks/workloads.py uses
PEERS = {"vLLM-Omni, 8xH200 (cfg 2 x Ulysses 4 x HSDP 8)": 121.0, "NVIDIA framework, 8xH200": 123.5}
SINGLE_H200 = 770.0  # vLLM-Omni's measured Super 720p T2V time on one H200 (cosmos3.md, "Latency")


def estimate(args) -> list[tuple[str, str]]:
    from cosmos3 import Cosmos3Transformer

    with torch.device("meta"):
        model = Cosmos3Transformer.from_preset("super")
    c = model.config
    frames = 1 + (args.frames - 1) // 4
    gen_tokens = frames * -(-args.height // 32) * (args.width // 32)
    text_flops, gen_flops = forward_flops(model, args.text_tokens, gen_tokens)  # one sample, one forward
    _, gen_weights = tower_weights(model)
    gen_layer_params = sum(p.numel() for n, p in model.named_parameters()
                           if n.startswith("layers.0.") and any(k in n for k in ("add_", "to_add_out", "moe_gen")))
    bytes_per = 2  # bf16
    world, cfg, uly = 8, 2, 4
    # Compute: CFG doubles the forwards; cfg=2 gives each half to 4 ranks, Ulysses splits each half's tokens and
    # attention heads 4 ways, so one rank does 1/8 of a step's model FLOPs.
    step_flops = 2 * gen_flops
    rank_flops = step_flops / world
    compute_s = rank_flops / (args.mfu * H200_BF16_DENSE)
    # Ulysses: per layer 4 all-to-alls (q, k, v, out) of this rank's token shard; each rank sends (uly-1)/uly of it.
    shard = gen_tokens / uly
    widths = [c.num_attention_heads, c.num_key_value_heads, c.num_key_value_heads, c.num_attention_heads]
    a2a_bytes = c.num_hidden_layers * sum(shard * w * c.head_dim * bytes_per for w in widths) * (uly - 1) / uly
    a2a_s = a2a_bytes / (args.a2a_gbps * 1e9)
    # FSDP over 8: each step gathers the generation tower once (the text tower only at the prefill); each rank
    # receives 7/8 of it. FSDP2 prefetches the next layer while this one computes: only the first layer's gather is
    # exposed unless the whole gather outlasts the compute.
    ag_bytes = gen_weights * bytes_per * (world - 1) / world
    ag_s = ag_bytes / (args.allgather_gbps * 1e9)
    ag_exposed = max(ag_s / c.num_hidden_layers, ag_s - compute_s)
    # CFG: the halves' velocities gathered once per step (48 channels x 2x2 patch per token, float32).
    cfg_bytes = gen_tokens * 48 * 4 * 4 * (cfg - 1)
    cfg_s = cfg_bytes / (args.allgather_gbps * 1e9)
    step_s = compute_s + a2a_s + ag_exposed + cfg_s
    # Once per request: the text tower over prompt and negative (each cfg half its own), its weights gathered once.
    prefill_s = text_flops / (args.mfu * H200_BF16_DENSE) + gen_weights * bytes_per * (world - 1) / world / (
        args.allgather_gbps * 1e9)
    total = args.steps * step_s + prefill_s
    single_mfu = args.steps * step_flops / (SINGLE_H200 * H200_BF16_DENSE)
    per_gpu_gb = 2 * gen_weights * bytes_per / world / 1e9 + 2 * gen_layer_params * bytes_per / 1e9
    rows = [
        ("generated tokens (48 x 23 x 40)", f"{gen_tokens:,}"),
        ("model FLOPs, one forward (generation tower, attention included)", f"{gen_flops / 1e15:.2f} PFLOP"),
        ("model FLOPs per step (CFG: 2 forwards)", f"{step_flops / 1e15:.2f} PFLOP"),
        ("per rank per step (1/8)", f"{rank_flops / 1e15:.3f} PFLOP"),
        (f"compute per step at {args.mfu:.0%} MFU of {H200_BF16_DENSE / 1e12:.0f} TFLOP/s", f"{compute_s:.3f} s"),
        ("Ulysses all-to-all sent per rank per step (64 layers x q,k,v,out)", f"{a2a_bytes / 1e9:.1f} GB"),
        (f"  at {args.a2a_gbps:.0f} GB/s (not overlapped)", f"{a2a_s:.3f} s"),
        ("FSDP all-gather received per rank per step (generation tower)", f"{ag_bytes / 1e9:.1f} GB"),
        (f"  at {args.allgather_gbps:.0f} GB/s: {ag_s:.3f} s, exposed after prefetch", f"{ag_exposed:.3f} s"),
        ("CFG velocity gather per step", f"{cfg_bytes / 1e6:.0f} MB, {cfg_s * 1e3:.2f} ms"),
        ("one step", f"{step_s:.3f} s"),
        ("text prefill once (compute + one gather of the text tower)", f"{prefill_s:.2f} s"),
        (f"total, {args.steps} steps, VAE decode excluded", f"{total:.1f} s"),
        ("weights per GPU (both towers / 8) + two gathered generation layers", f"{per_gpu_gb:.1f} GB"),
        (f"MFU implied by vLLM-Omni's {SINGLE_H200:.0f} s on 1xH200 (decode included, so a lower bound)",
         f"{single_mfu:.0%}"),
    ]
    rows += [(f"peer: {name}", f"{s:.1f} s (ours / theirs {total / s:.2f})") for name, s in PEERS.items()]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mfu", type=float, default=0.50, help="model FLOPs utilisation per GPU (stated)")
    parser.add_argument("--a2a-gbps", type=float, default=250.0,
                        help="all-to-all bandwidth per GPU in a 4-rank NVLink group, GB/s sent (stated)")
    parser.add_argument("--allgather-gbps", type=float, default=350.0,
                        help="all-gather bus bandwidth over 8 NVLink GPUs, GB/s (stated; NVLink 4 is 450 per "
                             "direction)")
    parser.add_argument("--steps", type=int, default=35, help="denoising steps (the text-to-video default)")
    parser.add_argument("--frames", type=int, default=189)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--text-tokens", type=int, default=512)
    args = parser.parse_args()
    for name, value in (("mfu", args.mfu), ("a2a_gbps", args.a2a_gbps), ("allgather_gbps", args.allgather_gbps)):
        if not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    rows = estimate(args)
    width = max(len(k) for k, _ in rows)
    print(f"ESTIMATE (not measured): Cosmos3-Super 720p x {args.frames} frames, 8xH200, cfg 2 x ulysses 4 x fsdp 8")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
