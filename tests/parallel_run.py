"""Tiny text-to-video requests under `cosmos3.parallel.parallelize`, launched by tests/test_parallel.py under
`torchrun` (gloo, CPU). Each `--plan` (e.g. `cfg=2,shard=fsdp`) gets a fresh pipeline with the same random weights
in every process; every rank saves what it generated to OUT/<plan>.rank<r>.pt, so the test checks that the ranks
agree with each other and with one process. `--errors` records what `parallelize` refuses on this world size."""

import argparse
import json
import os
import sys

import torch
from torch import Tensor

VIDEO = dict(num_frames=9, height=32, width=48, fps=16.0, num_inference_steps=2, output_type="np")
TEXT = [5, 17, 42, 99, 3]


# 72 latent frames: more than twice the tiny VAE's decoder memory (34), so that with `vae=frames` some ranks warm
# their causal cache from a frame after the clip's start
LONG_LATENT = (1, 8, 72, 2, 3)


def build_pipeline(task: str = "t2v"):
    from cosmos3.pipelines import Cosmos3TextToVideoPipeline
    from cosmos3.pipelines.transfer import Cosmos3TransferPipeline
    from cosmos3.testing import tiny_parts
    from cosmos3.tokenizers.text import build_tiny_tokenizer

    cls = Cosmos3TransferPipeline if task == "transfer" else Cosmos3TextToVideoPipeline
    pipe = cls(**tiny_parts(build_tiny_tokenizer(), sound=task == "t2v"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transfer(pipe) -> dict:
    """Two prompts with text and control guidance (6 branch rows a step, the second prompt with two hints, so the
    rows differ in shape), and the batch of each transformer call."""
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].batch_size))
    g = torch.Generator().manual_seed(7)
    edge = [(torch.rand(9, 3, 32, 48, generator=g) > 0.8).float() for _ in range(2)]
    hints = [{"edge": edge[0]}, {"edge": edge[1], "blur": torch.rand(9, 3, 32, 48, generator=g)}]
    out = pipe(["a red car", "waves at dusk"], control_videos=hints, height=32, width=48, num_inference_steps=2,
               guidance_scale=4.0, control_guidance=2.0, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
               output_type="np")
    return {"transfer": torch.from_numpy(out.frames), "transfer_batch": seen}


def long_decode(pipe) -> Tensor:
    """A random latent clip of LONG_LATENT frames through the pipeline's vision tokenizer."""
    z = torch.randn(LONG_LATENT, generator=torch.Generator().manual_seed(5))
    return pipe.vision_tokenizer.decode(z)


def generate(pipe) -> dict:
    """A guided batch of two prompts with sound, an unguided single sample, and the text tower's logits; with what
    this rank ran: the batch of each transformer call, the tokens of the first generation projection, the heads
    of a text cache."""
    from cosmos3.models.layout import Cosmos3Sample

    model, seen = pipe.transformer, {"batch": [], "rows": []}
    model.register_forward_pre_hook(lambda m, args: seen["batch"].append(args[0].batch_size))
    model.layers[0].self_attn.add_q_proj.register_forward_pre_hook(lambda m, args: seen["rows"].append(len(args[0])))
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    guided = pipe(["a red car", "waves at dusk on a long beach"], negative_prompt=["blurry", None],
                  generator=gens, guidance_scale=4.0, enable_sound=True, **VIDEO)
    # 3 generated tokens: one more than two Ulysses ranks share evenly
    single = pipe("a cat", generator=torch.Generator().manual_seed(2), guidance_scale=1.0, **{**VIDEO, "width": 32})
    logits, _ = model.text_logits(torch.tensor(TEXT))
    cache = model.encode_text(model.build_layout([Cosmos3Sample(text_ids=TEXT, vision_shape=(1, 2, 2))]))
    return {"frames": torch.from_numpy(guided.frames), "sound": guided.sound,
            "single": torch.from_numpy(single.frames), "logits": logits,
            "seen": {**seen, "cache_heads": cache.keys[0].shape[1]}}


def parse_plan(text: str) -> dict:
    plan = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        plan[key] = value if key in ("shard", "sequence", "vae") else int(value)
    return plan


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--plan", action="append", default=[])
    parser.add_argument("--errors", action="append", default=[], help="plans that must be refused")
    args = parser.parse_args()
    from cosmos3.parallel import parallelize
    from cosmos3.training.parallel import init_distributed

    info = init_distributed("cpu")
    torch.set_num_threads(1)
    for name in args.plan:
        pipe = build_pipeline()
        plan = parallelize(pipe, **parse_plan(name))
        if plan.shard == "fsdp":  # each rank holds its share of every weight
            for n, p in pipe.transformer.named_parameters():
                assert p.to_local().shape[0] <= -(-p.shape[0] // info.world_size), (n, p.to_local().shape)
        if plan.shard == "tp":  # each rank holds its heads and its share of the MLP width
            layer = pipe.transformer.layers[0]
            for module in (layer.self_attn.to_q, layer.self_attn.add_k_proj, layer.mlp_moe_gen.up_proj):
                assert module.weight.to_local().shape[0] * plan.tp == module.weight.shape[0]
            assert layer.mlp.down_proj.weight.to_local().shape[1] * plan.tp == layer.mlp.down_proj.weight.shape[1]
        result = generate(pipe)
        if plan.vae:
            result["long"] = long_decode(pipe)
        transfer_pipe = build_pipeline("transfer")
        parallelize(transfer_pipe, **parse_plan(name))
        result.update(transfer(transfer_pipe))
        torch.save(result, os.path.join(args.out, f"{name}.rank{info.rank}.pt"))
    refused = {}
    for name in args.errors:
        try:
            parallelize(build_pipeline(), **parse_plan(name))
        except ValueError as e:
            refused[name] = str(e)
    if info.is_main and args.errors:
        with open(os.path.join(args.out, "refused.json"), "w") as f:
            json.dump(refused, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    # Python put this script's folder first, where tests/tokenizers would shadow the `tokenizers` package: the
    # repository root instead (imported by the tests, the module leaves sys.path alone).
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    main()
