"""One denoising step with classifier-free guidance (cond + uncond), ours against the reference transformer.

    python benchmarks/transformer_step.py                        # CPU, a small model, both shapes
    python benchmarks/transformer_step.py --device cuda --dtype bfloat16 --preset nano --layers 8

Both models hold the same random weights and see the same inputs; the script checks that their velocities agree
before timing. Rows:

* reference: `diffusers.Cosmos3OmniTransformer`, two full forwards (text + generation towers), as its pipeline does;
* ours, 2 passes, no cache: the same work done by our model (isolates the implementation);
* ours, cached + batched: the text K/V cache built once per prompt (excluded: it is paid once per request, not per
  step; its cost is printed separately) and cond/uncond in one batched forward of the generation tower.
"""

from __future__ import annotations

import argparse
import logging

import torch
from timing import timed

from cosmos3 import Cosmos3Sample, Cosmos3Transformer
from cosmos3.models.transformer_cosmos3 import COSMOS3_PRESETS
from cosmos3.testing import randomize_, reference_inputs, reference_transformer

SHAPES = {
    # name: (cond text tokens, uncond text tokens, latent (T, H, W)); 2x2 patches -> T*H*W/4 gen tokens
    "t2i ~300 text + 256 image tokens": (300, 280, (1, 32, 32)),
    "t2v ~300 text + 2048 video tokens": (300, 280, (8, 32, 32)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--preset", default=None, choices=sorted(COSMOS3_PRESETS), help="sizes of a preset")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (a slice of the full depth)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size when no preset is given")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="native", help="our attention backend")
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    if args.preset:
        config = dict(COSMOS3_PRESETS[args.preset], num_hidden_layers=args.layers)
    else:
        h = args.hidden
        config = dict(hidden_size=h, intermediate_size=3 * h, num_hidden_layers=args.layers,
                      num_attention_heads=h // 64, num_key_value_heads=max(1, h // 256), head_dim=64,
                      rope_axes_dim=[12, 10, 10], vocab_size=32000, latent_channel=48, patch_latent_dim=192)
    torch.manual_seed(0)
    ours = randomize_(Cosmos3Transformer(**config), std=0.02).eval()
    reference = reference_transformer(ours).to(device, dtype)
    ours = ours.to(device, dtype)
    ours.set_attention_backend(args.backend)
    n_params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"device={device} dtype={args.dtype} layers={config['num_hidden_layers']} hidden={config['hidden_size']} "
          f"heads={config['num_attention_heads']}/{config['num_key_value_heads']} params={n_params:.0f}M "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'shape':38s} {'reference s':>12s} {'ours 2-pass':>12s} {'ours cached':>12s} {'cache build':>12s} "
          f"{'speed-up':>9s} {'max |dv|':>9s}")

    g = torch.Generator().manual_seed(0)
    for name, (cond_len, uncond_len, latent_shape) in SHAPES.items():
        cond, uncond = (
            Cosmos3Sample(text_ids=torch.randint(0, 1000, (n,), generator=g).tolist(), vision_shape=latent_shape,
                          fps=24.0)
            for n in (cond_len, uncond_len)
        )
        latents = torch.randn(ours.config.latent_channel, *latent_shape, generator=g).to(device, dtype)
        row = bench_shape(ours, reference, cond, uncond, latents, device, args.repeats)
        print(f"{name:38s} {row['reference']:12.4f} {row['two_pass']:12.4f} {row['cached']:12.4f} "
              f"{row['cache_build']:12.4f} {row['reference'] / row['cached']:8.2f}x {row['max_diff']:9.2e}")


def bench_shape(ours, reference, cond, uncond, latents, device, repeats: int, t: float = 700.0) -> dict:
    ref_kwargs = [reference_inputs(ours.config, s, latents, t) for s in (cond, uncond)]
    single_layouts = [ours.build_layout([s]) for s in (cond, uncond)]
    layout = ours.build_layout([cond, uncond])
    cache = ours.encode_text(layout)

    def reference_step():
        return [reference(**kw, return_dict=False)[0][0][0] for kw in ref_kwargs]

    def ours_two_pass():
        return [ours(lay, [latents], t).sample[0] for lay in single_layouts]

    def ours_cached():
        return ours(layout, [latents, latents], t, text_kv_cache=cache).sample

    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(reference_step(), ours_cached()))
    return dict(
        reference=timed(reference_step, device, repeats),
        two_pass=timed(ours_two_pass, device, repeats),
        cached=timed(ours_cached, device, repeats),
        cache_build=timed(lambda: ours.encode_text(layout), device, repeats),
        max_diff=diff,
    )

if __name__ == "__main__":
    main()
