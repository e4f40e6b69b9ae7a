"""Training throughput of `cosmos3.training.Trainer`: generated (trained) tokens per second.

    python benchmarks/train_throughput.py                          # CPU, the `tiny` preset
    python benchmarks/train_throughput.py --preset nano --layers 2 --device cuda --mixed-precision bf16 \
        --latent 21 30 52 --text 256 --batch 1                      # prints MFU against --peak-tflops

Synthetic examples (random prompt ids and latents) of a fixed shape; the first steps are warm-up and not timed.
Tokens are the generation-stream tokens per step (2x2 latent patches), the part the trainer updates.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from flops import training_step_flops

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
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200 SXM)")
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
                             save_every=10**9, learning_rate=1e-4, mixed_precision=args.mixed_precision,
                             gradient_checkpointing=args.gradient_checkpointing)
        trainer = Trainer(model, data, config, log=records.append)
        start = None
        original = trainer.train_step

        def step(batch=None):
            nonlocal start
            if trainer.step == args.warmup:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
            return original(batch)

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
    flops = training_step_flops(model, args.text, tokens // args.batch, args.batch)
    achieved = flops * args.steps / elapsed
    line = f"model FLOPs/step {flops / 1e12:.3f} TFLOP, achieved {achieved / 1e12:.2f} TFLOP/s"
    if args.device.startswith("cuda"):
        line += f", MFU {100 * achieved / (args.peak_tflops * 1e12):.1f}% of {args.peak_tflops:.0f} TFLOP/s"
    if args.device.startswith("cuda"):
        line += f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    print(line)


if __name__ == "__main__":
    main()
