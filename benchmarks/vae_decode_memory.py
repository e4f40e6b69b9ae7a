"""Peak memory of decoding latents to a 480p video: streaming (`iter_decode`) against one-shot (`decode`).

    python benchmarks/vae_decode_memory.py                      # 2 s and 10 s clips, both modes, plus 60 s streamed
    python benchmarks/vae_decode_memory.py --seconds 60 --modes stream

Uses the tiny random Wan-layout VAE from `cosmos3.testing` (the real 48-channel VAE has the same causal loop and
caches; its weights are not downloadable here), so the absolute numbers are those of the tiny network, and what the
table shows is how peak memory grows with clip length. Each measurement runs in a fresh process and reports its
peak resident set size (`ru_maxrss`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
from cosmos3.testing import make_tiny_vae
from cosmos3.tokenizers.vision import Cosmos3VisionTokenizer

mode, latent_frames, h, w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_grad_enabled(False)
tokenizer = Cosmos3VisionTokenizer(make_tiny_vae())
latents = torch.randn(1, 8, latent_frames, h // 16, w // 16, generator=torch.Generator().manual_seed(0))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
frames = 0
if mode == "stream":
    for chunk in tokenizer.iter_decode(latents):
        frames += chunk.shape[2]  # a real caller encodes the chunk to a file here
else:
    frames = tokenizer.decode(latents).shape[2]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(frames=frames, seconds=time.perf_counter() - start, base_mb=base / 1024, peak_mb=peak / 1024)))
"""


def measure(mode: str, seconds: float, fps: float, height: int, width: int) -> dict:
    num_frames = int(round(seconds * fps / 4)) * 4 + 1
    latent_frames = (num_frames - 1) // 4 + 1
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(latent_frames), str(height), str(width)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0, 10.0])
    parser.add_argument("--long-stream", type=float, default=60.0, help="also stream a clip this long (0: skip)")
    parser.add_argument("--modes", nargs="+", default=["stream", "full"], choices=["stream", "full"])
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    args = parser.parse_args()
    runs = [(mode, s) for s in args.seconds for mode in args.modes]
    if args.long_stream:
        runs.append(("stream", args.long_stream))
    print(f"{args.height}x{args.width} @ {args.fps:g} fps, tiny random Wan-layout VAE, CPU")
    print(f"{'mode':8s} {'clip s':>7s} {'frames':>7s} {'decode s':>9s} {'baseline MB':>12s} {'peak MB':>9s}")
    for mode, seconds in runs:
        row = measure(mode, seconds, args.fps, args.height, args.width)
        print(f"{mode:8s} {seconds:7.1f} {row['frames']:7d} {row['seconds']:9.1f} {row['base_mb']:12.0f} "
              f"{row['peak_mb']:9.0f}", flush=True)


if __name__ == "__main__":
    main()
