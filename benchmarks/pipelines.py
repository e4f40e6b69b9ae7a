"""End-to-end pipelines, ours against `diffusers.Cosmos3OmniPipeline`, on the same random checkpoint.

    python benchmarks/pipelines.py                     # CPU, a small transformer, every task
    python benchmarks/pipelines.py --device cuda --hidden 2048 --layers 8 --steps 10

Each row checks that both give the same output first (max abs difference of `output_type="np"`), then times one
call of each (median of `--repeats`). The `batch of 4` row compares one call of ours with 4 prompts against 4
reference calls (the reference runs one prompt per call).
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

from cosmos3 import (
    ActionRequest,
    Cosmos3ImageToVideoPipeline,
    Cosmos3TextToImagePipeline,
    Cosmos3TextToVideoPipeline,
    Cosmos3Transformer,
    Cosmos3WorldActionPipeline,
)
from cosmos3.testing import make_tiny_vae, randomize_, reference_transformer
from cosmos3.tokenizers.text import build_tiny_tokenizer

PROMPT = ("A red car drives along a coastal road at dusk, the camera tracking it from the side while waves break on "
          "the rocks below and the sky turns orange; seagulls glide over the water and headlights come on.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    device = torch.device(args.device)

    tokenizer = build_tiny_tokenizer()
    h = args.hidden
    torch.manual_seed(0)
    model = Cosmos3Transformer(
        hidden_size=h, intermediate_size=3 * h, num_hidden_layers=args.layers, num_attention_heads=h // 64,
        num_key_value_heads=max(1, h // 256), head_dim=64, rope_axes_dim=[12, 10, 10], vocab_size=len(tokenizer),
        latent_channel=8, patch_latent_dim=32, action_gen=True, action_dim=64,
    )
    model = randomize_(model, std=0.02).eval().to(device)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    parts = dict(transformer=model, text_tokenizer=tokenizer, vae=make_tiny_vae().to(device), scheduler=scheduler)
    reference = Cosmos3OmniPipeline(**{**parts, "transformer": reference_transformer(model).to(device),
                                       "scheduler": copy.deepcopy(scheduler),
                                       "vae": copy.deepcopy(parts["vae"])}, enable_safety_checker=False)
    pipes = {cls: cls(**parts) for cls in (Cosmos3TextToImagePipeline, Cosmos3TextToVideoPipeline,
                                           Cosmos3ImageToVideoPipeline, Cosmos3WorldActionPipeline)}
    for p in [reference, *pipes.values()]:
        p.set_progress_bar_config(disable=True)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 416, 3), dtype=np.uint8))
    video = dict(num_frames=33, height=256, width=448, fps=24.0)
    common = dict(num_inference_steps=args.steps, output_type="np")

    def gen(seed=0):
        return torch.Generator(device="cpu").manual_seed(seed)

    tasks = {
        "t2i 512x512, cfg 6": (
            lambda: reference(PROMPT, num_frames=1, height=512, width=512, guidance_scale=6.0, generator=gen(),
                              **common).video,
            lambda: pipes[Cosmos3TextToImagePipeline](PROMPT, height=512, width=512, guidance_scale=6.0,
                                                      generator=gen(), **common).images[0][None],
        ),
        "t2v 33x256x448, cfg 6": (
            lambda: reference(PROMPT, guidance_scale=6.0, generator=gen(), **video, **common).video,
            lambda: pipes[Cosmos3TextToVideoPipeline](PROMPT, guidance_scale=6.0, generator=gen(), **video,
                                                      **common).frames[0],
        ),
        "i2v 33x256x448, cfg 6": (
            lambda: reference(PROMPT, image=image, guidance_scale=6.0, generator=gen(), **video, **common).video,
            lambda: pipes[Cosmos3ImageToVideoPipeline](image, PROMPT, guidance_scale=6.0, generator=gen(), **video,
                                                       **common).frames[0],
        ),
        "policy chunk 16, 256 tier": (
            lambda: reference("pick up the cup", action=CosmosActionCondition(
                mode="policy", chunk_size=16, domain_name="droid_lerobot", image=image, resolution_tier=256),
                generator=gen(), guidance_scale=1.0, **common).video,
            lambda: pipes[Cosmos3WorldActionPipeline]("pick up the cup", ActionRequest(
                mode="policy", chunk_size=16, domain_name="droid_lerobot", image=image, resolution_tier=256),
                generator=gen(), **common).frames[0],
        ),
    }
    print(f"device={device} hidden={h} layers={args.layers} steps={args.steps} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")
    print(f"{'task':28s} {'reference s':>12s} {'ours s':>9s} {'speed-up':>9s} {'max |diff|':>11s}")
    for name, (theirs, ours) in tasks.items():
        diff = float(np.abs(np.asarray(theirs(), dtype=np.float64) - np.asarray(ours(), dtype=np.float64)).max())
        t_ref, t_ours = timed(theirs, device, args.repeats), timed(ours, device, args.repeats)
        print(f"{name:28s} {t_ref:12.3f} {t_ours:9.3f} {t_ref / t_ours:8.2f}x {diff:11.2e}", flush=True)

    prompts = [PROMPT, "Waves on a beach.", "A cat on a sofa, sunlight.", "Rain on a window at night."]
    pipe = pipes[Cosmos3TextToVideoPipeline]
    t_ref = timed(lambda: [reference(p, guidance_scale=6.0, generator=gen(i), **video, **common)
                           for i, p in enumerate(prompts)], device, args.repeats)
    t_ours = timed(lambda: pipe(prompts, guidance_scale=6.0, generator=[gen(i) for i in range(4)], **video,
                                **common), device, args.repeats)
    print(f"{'t2v batch of 4 prompts':28s} {t_ref:12.3f} {t_ours:9.3f} {t_ref / t_ours:8.2f}x {'':>11s}")


if __name__ == "__main__":
    main()
