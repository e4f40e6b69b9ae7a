"""Wan VAE decode (and encode) speed: diffusers' `AutoencoderKLWan` as shipped against `accelerate_wan_vae`.

    OMP_NUM_THREADS=1 python benchmarks/vae_decode_speed.py                 # tiny VAE, CPU, 33x256x448 video
    OMP_NUM_THREADS=1 python benchmarks/vae_decode_speed.py --encode-clip   # also encode the whole clip
    OMP_NUM_THREADS=1 python benchmarks/vae_decode_speed.py --real          # Wan 2.2 config, random, 5x64x112
    python benchmarks/vae_decode_speed.py --real --device cuda --dtype bfloat16 --frames 33 --height 480 --width 832

One VAE is built, and each row times it with diffusers' module classes and then with the accelerated ones
(`restore_wan_vae` / `accelerate_wan_vae` swap them in place), on the same inputs in the same run; the accelerated
output is checked against diffusers' before it is timed (float32: max abs diff <= 1e-5 times the output's scale).
Rows: `vae.decode` of the clip's latents ([1, z, 1 + (frames - 1) / 4, height / 16, width / 16]), `vae.encode` of
its first frame, and with `--encode-clip` `vae.encode` of the whole clip.

The default VAE is `cosmos3.testing.make_tiny_vae` (8 channels throughout); `--real` builds a randomly initialised
VAE with the Wan 2.2 (TI2V-5B) config -- z_dim 48, base 160 / decoder 256, 705M parameters -- at a smaller default
clip so both columns run on CPU in a minute or two. Weights are random, so only the timings mean anything.
"""

from __future__ import annotations

import argparse
import logging

import torch
from timing import timed

from cosmos3.testing import make_tiny_vae
from cosmos3.tokenizers.fast_wan import accelerate_wan_vae, restore_wan_vae

# Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json, less the latent statistics (irrelevant to speed).
WAN22_VAE_CONFIG = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0, is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-1, torch.float16: 2e-2}  # times max(1, max |reference|)


def build_vae(real: bool):
    if not real:
        return make_tiny_vae()
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(**WAN22_VAE_CONFIG).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="the Wan 2.2 config (random weights) instead of tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--frames", type=int, default=None, help="1 + 4k (default 33; 5 with --real)")
    parser.add_argument("--height", type=int, default=None, help="multiple of 16 (default 256; 64 with --real)")
    parser.add_argument("--width", type=int, default=None, help="multiple of 16 (default 448; 112 with --real)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per column (default 3; 1 with --real)")
    parser.add_argument("--encode-clip", action="store_true", help="also time encoding the whole clip")
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    frames = args.frames or (5 if args.real else 33)
    height, width = args.height or (64 if args.real else 256), args.width or (112 if args.real else 448)
    repeats = args.repeats or (1 if args.real else 3)
    if (frames - 1) % 4 or height % 16 or width % 16:
        parser.error("frames must be 1 + 4k, height and width multiples of 16")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    vae = build_vae(args.real).to(device, dtype)
    z_dim = vae.config.z_dim
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, z_dim, (frames - 1) // 4 + 1, height // 16, width // 16, generator=g).to(device, dtype)
    video = (torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1).to(device, dtype)
    rows = [
        (f"decode {list(latents.shape)} -> {frames}x{height}x{width}", lambda: vae.decode(latents).sample),
        (f"encode 1 frame {height}x{width}", lambda: vae.encode(video[:, :, :1]).latent_dist.parameters),
    ]
    if args.encode_clip:
        rows.append((f"encode {frames}x{height}x{width}", lambda: vae.encode(video).latent_dist.parameters))

    n_params = sum(p.numel() for p in vae.parameters()) / 1e6
    print(f"{'Wan 2.2 config' if args.real else 'tiny'} VAE ({n_params:.1f}M params, random), device={device} "
          f"dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()}, median of {repeats}")
    print(f"{'row':44s} {'diffusers s':>12s} {'accelerated s':>14s} {'speed-up':>9s} {'max abs diff':>13s}")
    for name, fn in rows:
        restore_wan_vae(vae)
        expected = fn()
        t_reference = timed(fn, device, repeats)
        accelerate_wan_vae(vae)
        actual = fn()
        diff = (actual.float() - expected.float()).abs().max().item()
        bound = TOLERANCE[dtype] * max(1.0, expected.abs().max().item())
        if not diff <= bound:
            raise SystemExit(f"{name}: the accelerated output differs from diffusers' by {diff:.3g} > {bound:.3g}")
        t_fast = timed(fn, device, repeats)
        print(f"{name:44s} {t_reference:12.3f} {t_fast:14.3f} {t_reference / t_fast:8.2f}x {diff:13.1e}", flush=True)

if __name__ == "__main__":
    main()
