"""`cosmos3 train RECIPE` and `cosmos3 distill RECIPE`: read and check a TOML recipe, build the pieces, run.

Both run unchanged in one process or under `torchrun --nproc-per-node N -m cosmos3 train RECIPE` (the recipe's
`[train] parallelism` picks DDP or FSDP2). Rerunning the same command after an interruption resumes from the
newest complete checkpoint. At the end, rank 0 exports `<output_dir>/pipeline`: the base pipeline folder with the
trained transformer (EMA weights), loadable by every pipeline here and by diffusers.
"""

from __future__ import annotations

import os

import torch

from .config import ConfigError, Recipe, load_recipe, split_data_table
from .encode import WORLD_ACTION_TASKS, ExampleEncoder, normalizer_from_stats
from .logs import RunLogger
from .parallel import init_distributed
from .trainer import TrainConfig, Trainer

# The encoder's arguments that the command fills in from the model folder and the dataset.
ENCODER_SET_BY_COMMAND = ("vae", "text_tokenizer", "action_normalizer", "action_dim", "device")


def _load_transformer(folder: str, device: torch.device):
    from ..models.transformer_cosmos3 import Cosmos3Transformer

    path = os.path.join(folder, "transformer")
    if not os.path.isdir(path):
        raise ValueError(f"`model` = {folder!r} is not a pipeline folder (no transformer/ inside).")
    return Cosmos3Transformer.from_pretrained(path, dtype=torch.float32).to(device)


def _dataset(recipe: Recipe):
    from .datasets import FolderDataset, LeRobotDataset

    kind, kwargs = split_data_table(recipe.path, recipe.tables["data"])
    return (LeRobotDataset if kind == "lerobot" else FolderDataset)(**kwargs)


def _encoder(recipe: Recipe, dataset) -> tuple[ExampleEncoder, object | None]:
    options = dict(recipe.tables["encode"])
    normalizer = None
    if options.get("task") in WORLD_ACTION_TASKS:
        stats = getattr(dataset, "stats", None)
        if not stats:
            raise ValueError(f"{recipe.path}: task {options['task']!r} needs action statistics; [data] must be a "
                             "LeRobot dataset with meta/stats.json.")
        normalizer = normalizer_from_stats(stats, embodiment=options.get("embodiment"))
        options["action_normalizer"] = normalizer
    return ExampleEncoder.from_pretrained(recipe.model, **options), normalizer


def _policy_config(encoder: ExampleEncoder, dataset):
    """How to run the trained world-action model as a policy: what it was trained on (`policy_config.json`)."""
    from ..robotics.policy import IMAGE_PREFIX, PolicyConfig

    cameras = encoder.cameras or list(getattr(dataset, "camera_keys", []) or []) or None
    if cameras is not None:
        cameras = [c[len(IMAGE_PREFIX):] if c.startswith(IMAGE_PREFIX) else c for c in cameras]
    chunk = encoder.num_frames - 1
    return PolicyConfig(embodiment=encoder.embodiment, action_dim=encoder.raw_action_dim, cameras=cameras,
                        chunk_size=chunk, n_action_steps=min(8, chunk), resolution_tier=encoder.resolution_tier,
                        view_point=encoder.view_point, fps=float(encoder.fps or dataset.fps))


def read_train_recipe(path: str) -> Recipe:
    recipe = load_recipe(path, {"data": None, "encode": ExampleEncoder, "train": TrainConfig},
                         exclude={"encode": ENCODER_SET_BY_COMMAND})
    split_data_table(path, recipe.tables["data"])
    try:  # value checks (ranges, choices) before anything loads
        TrainConfig(**recipe.tables["train"])
    except ValueError as e:
        raise ConfigError(f"{path}: [train] {e}") from None
    return recipe


def train(path: str) -> str | None:
    """Run the training recipe at `path`; returns the exported pipeline folder (rank 0) or None (other ranks)."""
    from .export import export_pipeline

    recipe = read_train_recipe(path)
    config = TrainConfig(**recipe.tables["train"])
    info = init_distributed(recipe.device)
    dataset = _dataset(recipe)
    encoder, normalizer = _encoder(recipe, dataset)
    model = _load_transformer(recipe.model, info.device)
    with RunLogger(config.output_dir, config.max_steps, tensorboard=recipe.log_tensorboard) as log:
        log({"event": "start", "recipe": os.path.abspath(path), "examples": len(dataset), "ranks": info.world_size,
             "device": str(info.device)})
        trainer = Trainer(model, dataset, config, log=log, transform=encoder)
        trainer.train()
        state = trainer.full_state_dict(use_ema=True)
        out = None
        if info.is_main:
            out = export_pipeline(recipe.model, state, os.path.join(config.output_dir, "pipeline"))
            if normalizer is not None:
                normalizer.save(os.path.join(out, "action_normalizer.json"))
                _policy_config(encoder, dataset).save(out)
            log({"event": "exported", "path": out, "bad_samples": trainer.bad_samples,
                 "skipped_steps": trainer.skipped_steps})
    _finish()
    return out


def prompt_options(file: str | None = None, texts: list[str] | None = None, negative_prompt: str | None = None,
                   num_frames: int = 1, height: int = 720, width: int = 1280, fps: float = 24.0,
                   use_system_prompt: bool | None = None, add_resolution_template: bool = True,
                   add_duration_template: bool = True) -> dict:
    """The `[prompts]` table of a distillation recipe: the prompts (a text file with one per line, and/or a list)
    and the pipeline-call settings the student will be used with (1 frame: text-to-image)."""
    return dict(locals())


def read_distill_recipe(path: str) -> Recipe:
    from .distill import DistillConfig

    recipe = load_recipe(path, {"prompts": prompt_options, "distill": DistillConfig})
    options = recipe.tables["prompts"]
    if not options.get("file") and not options.get("texts"):
        raise ConfigError(f"{path}: [prompts] needs `file` (one prompt per line) or `texts` (a list).")
    try:
        DistillConfig(**recipe.tables["distill"])
    except ValueError as e:
        raise ConfigError(f"{path}: [distill] {e}") from None
    return recipe


def distill(path: str) -> str:
    """Run the distillation recipe at `path`; returns the exported distilled pipeline folder."""
    import shutil

    from ..pipelines import Cosmos3TextToVideoPipeline
    from .distill import DistillConfig, Distiller, pipeline_prompts

    recipe = read_distill_recipe(path)
    options = dict(recipe.tables["prompts"])
    file, texts = options.pop("file", None), list(options.pop("texts", None) or [])
    if file:
        file = file if os.path.isabs(file) else os.path.join(os.path.dirname(os.path.abspath(path)), file)
        with open(file, encoding="utf-8") as f:
            texts += [line.strip() for line in f if line.strip()]
    config = DistillConfig(**recipe.tables["distill"])
    info = init_distributed(recipe.device)
    if info.world_size > 1:
        raise ValueError("`cosmos3 distill` runs in one process (the student and critic are not sharded yet); "
                         "launch it without torchrun.")
    pipe = Cosmos3TextToVideoPipeline.from_pretrained(recipe.model, dtype=torch.float32)
    if pipe.config.distilled_sigmas:
        raise ValueError(f"`model` = {recipe.model!r} is already a distilled student; distill from the teacher.")
    prompts = pipeline_prompts(pipe, texts, options.pop("negative_prompt", None), **options)
    teacher = pipe.transformer.to(info.device)
    with RunLogger(config.output_dir, config.max_steps, tensorboard=recipe.log_tensorboard) as log:
        log({"event": "start", "recipe": os.path.abspath(path), "prompts": len(prompts), "device": str(info.device)})
        distiller = Distiller(teacher, prompts, config, log=log)
        distiller.train()
        out = os.path.join(config.output_dir, "pipeline")
        fresh = out + ".new"
        shutil.rmtree(fresh, ignore_errors=True)
        distiller.export(pipe, fresh, ema=True)
        shutil.rmtree(out, ignore_errors=True)  # the previous export of this run (rebuilt from the checkpoints)
        os.replace(fresh, out)
        log({"event": "exported", "path": out, "skipped_student_steps": distiller.skipped_student_steps,
             "skipped_critic_steps": distiller.skipped_critic_steps})
    _finish()
    return out


def _finish() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
