"""Fused kernels against their eager references, same inputs, same run: seconds per call, the ratio, and the
effective memory bandwidth of the fused kernel (bytes each must read and write once / time).

    python benchmarks/fused_kernels.py --device cuda --dtype bfloat16              # Nano-shaped rows (GPU)
    python benchmarks/fused_kernels.py --device cuda --dtype bfloat16 --tokens 18720 --hidden 4096 \
        --heads 32 --kv-heads 8

Shapes default to one Cosmos3-Nano layer at text-to-video 480p (18,720 generation tokens, hidden 4096, 32 query /
8 KV heads of 128, MLP 12288). On CPU the kernels only run under Triton's interpreter (slow by design, for
testing), so this script refuses `--device cpu` unless `--allow-cpu` is given, where both columns are eager code.
Every row first checks that the fused output equals the reference within the dtype's tolerance.

Not named kernels.py: a `kernels` module on the path makes transformers believe the Hugging Face `kernels`
package is installed, and importing diffusers then fails.
"""

from __future__ import annotations

import argparse

import torch
from timing import timed

from cosmos3.kernels import (
    add_timestep_embedding,
    add_timestep_embedding_reference,
    rms_norm,
    rms_norm_reference,
    rms_norm_rope,
    rms_norm_rope_reference,
    silu_glu,
    silu_glu_reference,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def rows(args, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

    n, d = args.tokens, args.head_dim
    cos_sin = randn(n, d), randn(n, d)
    weight = randn(d, dt=torch.float32)
    q, k = randn(n, args.heads, d), randn(n, args.kv_heads, d)
    hidden = randn(n, args.hidden)
    hidden_weight = randn(args.hidden, dt=torch.float32)
    gate, up = randn(n, args.intermediate), randn(n, args.intermediate)
    samples = 2
    temb = randn(samples, args.hidden)
    index = torch.arange(n, device=device)
    sample_ids = (index * samples // n).to(torch.long)
    size = torch.empty((), dtype=dtype).element_size()
    yield ("q norm + rope", lambda: rms_norm_rope_reference(q, weight, *cos_sin),
           lambda: rms_norm_rope(q, weight, *cos_sin), 2 * q.numel() * size + 2 * n * d * size)
    yield ("k norm + rope", lambda: rms_norm_rope_reference(k, weight, *cos_sin),
           lambda: rms_norm_rope(k, weight, *cos_sin), 2 * k.numel() * size + 2 * n * d * size)
    yield ("hidden rms norm", lambda: rms_norm_reference(hidden, hidden_weight, 1e-6),
           lambda: rms_norm(hidden, hidden_weight, 1e-6), 2 * hidden.numel() * size)
    yield ("silu glu", lambda: silu_glu_reference(gate, up), lambda: silu_glu(gate, up), 3 * gate.numel() * size)
    yield ("timestep add", lambda: add_timestep_embedding_reference(hidden, temb, index, sample_ids),
           lambda: add_timestep_embedding(hidden, temb, index, sample_ids), 2 * hidden.numel() * size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=18720)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=12288)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU anyway (both columns eager)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and not args.allow_cpu:
        parser.exit(2, "benchmarks/fused_kernels.py: the fused kernels need a GPU (see the docstring); "
                       "pass --device cuda\n")
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, {args.dtype}, {args.tokens} tokens, hidden {args.hidden}, heads {args.heads}/"
          f"{args.kv_heads} x {args.head_dim}, MLP {args.intermediate}, median of {args.repeats}")
    print("| op | eager ms | fused ms | speed-up | fused GB/s | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for op, eager, fused, nbytes in rows(args, device, dtype):
        expected, actual = eager(), fused()
        diff = (actual.float() - expected.float()).abs().max().item()
        torch.testing.assert_close(actual.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
        t_eager, t_fused = timed(eager, device, args.repeats), timed(fused, device, args.repeats)
        print(f"| {op} | {t_eager * 1e3:.3f} | {t_fused * 1e3:.3f} | {t_eager / t_fused:.2f}x | "
              f"{nbytes / t_fused / 1e9:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
