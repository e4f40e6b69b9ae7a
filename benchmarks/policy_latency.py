"""Policy latency: seconds per action chunk of `Cosmos3Policy` at 4, 10 and 30 denoising steps, against
`diffusers.Cosmos3OmniPipeline` (policy mode) on the same random checkpoint in the same run.

    python benchmarks/policy_latency.py                                   # CPU, a small transformer
    python benchmarks/policy_latency.py --device cuda --hidden 2048 --layers 16 --chunk 32 --dtype bfloat16

One observation (a 256x256 frame, an instruction) -> one chunk of `--chunk` actions (DROID layout, 10-d), the
video latents generated alongside as the model does. Median of `--repeats` calls after a warm-up. The anchor
(performance.md): pi0 runs a chunk in 20-40 ms on one consumer GPU.
"""

from __future__ import annotations

import argparse
import copy
import logging

import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline, UniPCMultistepScheduler
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition
from PIL import Image
from timing import timed

from cosmos3 import Cosmos3Transformer, Cosmos3WorldActionPipeline
from cosmos3.robotics.policy import Cosmos3Policy, PolicyConfig
from cosmos3.testing import make_tiny_vae, randomize_, reference_transformer
from cosmos3.tokenizers.text import build_tiny_tokenizer

INSTRUCTION = "put the marker in the cup"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--tier", type=int, default=256)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 10, 30])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tokenizer = build_tiny_tokenizer()
    h = args.hidden
    model = Cosmos3Transformer(
        hidden_size=h, intermediate_size=3 * h, num_hidden_layers=args.layers, num_attention_heads=h // 64,
        num_key_value_heads=max(1, h // 256), head_dim=64, rope_axes_dim=[12, 10, 10], vocab_size=len(tokenizer),
        latent_channel=8, patch_latent_dim=32, action_gen=True, action_dim=64,
    )
    model = randomize_(model, std=0.02).eval().to(device, dtype)
    vae = make_tiny_vae().to(device)  # the tiny VAE: the transformer's share is what differs between the two
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    parts = dict(transformer=model, text_tokenizer=tokenizer, vae=vae, scheduler=scheduler)
    reference = Cosmos3OmniPipeline(**{**parts, "transformer": reference_transformer(model).to(device, dtype),
                                       "scheduler": copy.deepcopy(scheduler),
                                       "vae": copy.deepcopy(parts["vae"])}, enable_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    frame = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    observation = {"observation.images.exterior": frame, "task": INSTRUCTION}
    print(f"device={args.device} dtype={args.dtype} hidden={h} layers={args.layers} "
          f"chunk={args.chunk} tier={args.tier} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'steps':>5} | {'reference s/chunk':>17} | {'ours s/chunk':>12} | {'speed-up':>8}")
    for steps in args.steps:
        config = PolicyConfig(embodiment="droid_lerobot", chunk_size=args.chunk, n_action_steps=args.chunk,
                              num_inference_steps=steps, resolution_tier=args.tier, fps=15.0)
        policy = Cosmos3Policy(Cosmos3WorldActionPipeline(**parts), config)
        condition = CosmosActionCondition(mode="policy", chunk_size=args.chunk, domain_name="droid_lerobot",
                                          resolution_tier=args.tier, image=Image.fromarray(frame))
        ours = timed(lambda policy=policy: policy.predict_action_chunk(observation), device, args.repeats)
        ref = timed(lambda condition=condition, steps=steps: reference(
            INSTRUCTION, action=condition, num_inference_steps=steps, guidance_scale=1.0, fps=15.0,
            generator=torch.Generator().manual_seed(0), output_type="latent"), device, args.repeats)
        print(f"{steps:>5} | {ref:>17.3f} | {ours:>12.3f} | {ref / ours:>7.2f}x")


if __name__ == "__main__":
    main()
