"""A tiny training run, launched by tests under `torchrun` (or as a single process) with the parallelism,
LoRA and mixed-precision options given on the command line; rank 0 writes the step records and the exported
transformer under OUT."""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cosmos3 import Cosmos3Transformer  # noqa: E402
from cosmos3.testing import randomize_  # noqa: E402
from cosmos3.training import Example, TrainConfig, Trainer  # noqa: E402
from cosmos3.training.parallel import init_distributed  # noqa: E402


def dataset():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(8):
        action = torch.cat([torch.randn(3, 10, generator=g), torch.zeros(3, 6)], dim=1)
        out.append(Example(text_ids=list(range(1, 3 + i % 3)), vision=torch.randn(8, 2, 4, 4, generator=g), fps=16.0,
                           vision_condition_frames=(0,) if i % 4 == 1 else (),
                           action=action if i % 2 else None, action_domain_id=8, raw_action_dim=10,
                           sound=torch.randn(8, 4, generator=g) if i == 2 else None))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--parallelism", default="none")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mixed-precision", default="no")
    args = parser.parse_args()
    info = init_distributed("cpu")
    torch.set_num_threads(1)
    model = randomize_(Cosmos3Transformer.from_preset("tiny"), seed=0, std=0.1)
    records = []
    config = TrainConfig(output_dir=os.path.join(args.out, "run"), max_steps=args.steps, batch_size=4,
                         learning_rate=args.lr, grad_clip=10.0, save_every=2, timestep_distribution="uniform",
                         parallelism=args.parallelism, lora_rank=args.lora_rank, mixed_precision=args.mixed_precision)
    trainer = Trainer(model, dataset(), config, log=records.append)
    trainer.train()
    trainer.export(os.path.join(args.out, "transformer"), use_ema=False)
    if info.is_main:
        with open(os.path.join(args.out, "records.json"), "w") as f:
            json.dump(records, f)
    if torch.distributed.is_initialized():
        # No rank tears its group down while another still talks to it (that aborted a rank now and then).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
