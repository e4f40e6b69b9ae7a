"""From training checkpoints to pipeline folders in the reference layout.

`export_pipeline` writes a copy of the base pipeline folder (VAE, tokenizer, scheduler, ... as they were) with the
trained transformer in place of the original; the result loads in our pipelines and in diffusers'
`Cosmos3OmniPipeline`. `export_checkpoint` does that from a checkpoint folder written by any number of ranks,
in one process, without the training setup (LoRA adapters, if the run used them, are merged).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from torch import Tensor

from ..io import atomic_directory
from ..models.transformer_cosmos3 import Cosmos3Transformer
from . import checkpoint, lora
from .trainer import save_transformer

TRANSFORMER = "transformer"


def export_pipeline(base: str, state: dict[str, Tensor], out_dir: str, extra_files: dict[str, dict] | None = None,
                    ) -> str:
    """Copy the pipeline folder `base` to `out_dir` with the transformer weights replaced by `state` (a full state
    dict in the reference names). `extra_files`: JSON files to write at the top (e.g. `modular_model_index.json`).
    Written aside and renamed into place: `out_dir` is either the old folder or the complete new one."""
    config_path = os.path.join(base, TRANSFORMER, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{base!r} is not a pipeline folder: {config_path} is missing.")
    with open(config_path) as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    with atomic_directory(out_dir) as tmp:
        shutil.copytree(base, tmp, ignore=lambda folder, names: [TRANSFORMER] if os.path.samefile(folder, base) else [],
                        dirs_exist_ok=True)
        save_transformer(config, state, os.path.join(tmp, TRANSFORMER))
        for name, content in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2)
    return out_dir


def checkpoint_state_dict(checkpoint_dir: str, base: str, use_ema: bool = True) -> dict[str, Tensor]:
    """The full transformer state dict of a checkpoint: the base model's weights with the trained (or EMA) ones
    over them, LoRA adapters merged. Reads every rank's shards in this one process."""
    with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
        meta = json.load(f)
    prefix = "ema." if use_ema else "model."
    trained = {name[len(prefix):]: t for name, t in checkpoint.read_tensors(checkpoint_dir).items()
               if name.startswith(prefix)}
    if not trained:
        raise ValueError(f"{checkpoint_dir} holds no `{prefix}*` tensors; is it a training checkpoint?")
    model = Cosmos3Transformer.from_pretrained(os.path.join(base, TRANSFORMER))
    config = meta.get("config", {})
    if config.get("lora_rank"):
        model = lora.add_lora(model, config["lora_rank"], config.get("lora_alpha"))
    state = model.state_dict()
    unknown = sorted(set(trained) - set(state))
    if unknown:
        raise ValueError(f"{checkpoint_dir} trains parameters the base model lacks: {unknown[:5]}; is {base!r} the "
                         "model it was trained from?")
    for name, value in trained.items():
        if value.shape != state[name].shape:
            raise ValueError(f"{name}: checkpoint {tuple(value.shape)} vs base model {tuple(state[name].shape)}.")
        state[name] = value.to(state[name].dtype)
    state = {k: v.detach().clone() for k, v in state.items()}
    return lora.merged_state_dict(model, state) if lora.has_lora(model) else state


def export_checkpoint(checkpoint_dir: str, base: str, out_dir: str, use_ema: bool = True) -> str:
    """Write a pipeline folder with the transformer of `checkpoint_dir` (see `export_pipeline`)."""
    with torch.no_grad():
        state = checkpoint_state_dict(checkpoint_dir, base, use_ema)
    return export_pipeline(base, state, out_dir)
