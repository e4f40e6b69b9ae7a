"""Peak memory of one text-to-video request, with and without the understanding tower offloaded to host memory.

    python benchmarks/offload_memory.py --device cuda --dtype bfloat16 --size full   # Nano, 480p, 189 frames
    python benchmarks/offload_memory.py                                               # CPU: checks that it runs

Random weights (the Nano preset and the released Wan 2.2 VAE configuration at full size; the small twins of
workloads.py otherwise), guidance 6, 2 denoising steps (a step's peak does not grow with the step count). The
question is the issue's: does Nano fit in 32 GB once `pipe.enable_text_tower_offload()` keeps the text
tower in host memory after building the request's K/V cache? No reference here: its weights would share ours and
stay resident.

Printed per row: the weights resident on the device before the request, the process's peak during it (CUDA
allocator `max_memory_allocated`, absolute, not above a baseline), the allocator's peak reserve
(`max_memory_reserved`) and the seconds; for denoising alone (`output_type="latent"`) and with the float32 VAE
decode. On CPU the "device" is host memory, so the offload moves nothing: the rows only show that the script runs.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
from pipelines import PROMPT
from workloads import WAN22_VAE, PeakMemory, build_transformer, gen

from cosmos3 import Cosmos3TextToVideoPipeline
from cosmos3.testing import make_tiny_vae, randomize_
from cosmos3.tokenizers.text import build_tiny_tokenizer


def build_pipeline(args) -> Cosmos3TextToVideoPipeline:
    tokenizer = build_tiny_tokenizer()
    if args.size == "full":
        with torch.device(args.device):
            vae = AutoencoderKLWan(**WAN22_VAE)
        randomize_(vae, std=0.02)
    else:
        vae = make_tiny_vae()
    vae = vae.eval().to(args.device)
    model = build_transformer(args, "nano", len(tokenizer), int(vae.config.z_dim))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = Cosmos3TextToVideoPipeline(transformer=model, text_tokenizer=tokenizer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--size", default="small", choices=["small", "full"])
    parser.add_argument("--layers", type=int, default=None, help="a slice of the depth (default: all / 4 small)")
    parser.add_argument("--frames", type=int, default=None, help="default: 189 full, 33 small")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    args.dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    full = args.size == "full"
    size = dict(num_frames=args.frames or (189 if full else 33), height=480 if full else 256,
                width=832 if full else 448)
    pipe = build_pipeline(args)
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"dtype={str(args.dtype)[6:]} size={args.size} layers={args.layers or 'default'} "
          f"{size['num_frames']}x{size['height']}x{size['width']} steps={args.steps} torch={torch.__version__}")
    print(f"{'':40s} {'resident GiB':>12s} {'peak GiB':>9s} {'reserved GiB':>12s} {'s':>8s}")
    offloaded = False
    for offload, output in ((False, "latent"), (True, "latent"), (True, "np")):
        if offload and not offloaded:
            pipe.enable_text_tower_offload()
            offloaded = True
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device) / 2**30
        else:
            resident = float("nan")
        start = time.perf_counter()
        with PeakMemory(device) as peak:
            pipe(PROMPT, generator=gen(), num_inference_steps=args.steps, guidance_scale=6.0, output_type=output,
                 **size)
        seconds = time.perf_counter() - start
        # PeakMemory reports the growth above the start; what must fit on the card is the absolute peak, and the
        # caching allocator's reserve on top of it (the CUDA context adds ~0.5 GiB more)
        if device.type == "cuda":
            absolute = resident + peak.mib / 1024
            reserved = torch.cuda.max_memory_reserved(device) / 2**30
        else:
            absolute, reserved = peak.mib / 1024, float("nan")
        name = ("text tower offloaded" if offload else "all weights resident") + (
            ", denoise only" if output == "latent" else ", with VAE decode")
        print(f"{name:40s} {resident:12.2f} {absolute:9.2f} {reserved:12.2f} {seconds:8.2f}", flush=True)


if __name__ == "__main__":
    main()
