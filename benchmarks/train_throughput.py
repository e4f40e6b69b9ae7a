"""Training throughput of `cosmos3.training.Trainer`: generated (trained) tokens per second.

    python benchmarks/train_throughput.py                          # CPU, the `tiny` preset
    python benchmarks/train_throughput.py --preset nano --layers 2 --device cuda

Synthetic examples (random prompt ids and latents) of a fixed shape; the first steps are warm-up and not timed.
Tokens are the generation-stream tokens per step (2x2 latent patches), the part the trainer updates.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from cosmos3 import Cosmos3Transformer
from cosmos3.models.transformer_cosmos3 import COSMOS3_PRESETS
from cosmos3.testing import randomize_
from cosmos3.training import Example, TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(COSMOS3_PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=64, help="prompt tokens per example")
    parser.add_argument("--latent", type=int, nargs=3, default=[3, 16, 16], help="latent T H W per example")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    model = randomize_(Cosmos3Transformer.from_preset(args.preset, **overrides), std=0.02).to(args.device)
    g = torch.Generator().manual_seed(0)
    c = model.config
    data = [Example(text_ids=torch.randint(0, c.vocab_size, (args.text,), generator=g).tolist(),
                    vision=torch.randn(c.latent_channel, *args.latent, generator=g), fps=24.0)
            for _ in range(2 * args.batch)]
    records = []
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(output_dir=out, max_steps=args.warmup + args.steps, batch_size=args.batch,
                             save_every=10**9, learning_rate=1e-4)
        trainer = Trainer(model, data, config, log=records.append)
        start = None
        original = trainer.train_step

        def step():
            nonlocal start
            if trainer.step == args.warmup:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
            return original()

        trainer.train_step = step
        trainer.train()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    t, h, w = args.latent
    tokens = args.batch * t * -(-h // 2) * -(-w // 2)
    params = sum(p.numel() for p in trainer.params.values()) / 1e6
    print(f"preset={args.preset} layers={c.num_hidden_layers} hidden={c.hidden_size} trainable={params:.1f}M "
          f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"batch={args.batch} gen tokens/step={tokens} text tokens/example={args.text} steps={args.steps}")
    print(f"{elapsed / args.steps:.4f} s/step  {tokens * args.steps / elapsed:.0f} gen tokens/s  "
          f"final loss {records[-1]['loss']:.3f}")


if __name__ == "__main__":
    main()
