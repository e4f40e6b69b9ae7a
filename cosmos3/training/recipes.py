"""`cosmos3 train RECIPE` and `cosmos3 distill RECIPE`: read and check a TOML recipe, build the pieces, run.

Both run unchanged in one process or under `torchrun --nproc-per-node N -m cosmos3 train RECIPE` (the recipe's
`[train] parallelism` picks DDP or FSDP2; `[distill] parallelism = "fsdp"` shards the teacher, student and
critic). Rerunning the same command after an interruption resumes from the newest complete checkpoint. At the
end, rank 0 exports `<output_dir>/pipeline`: the base pipeline folder with the trained transformer (EMA weights),
loadable by every pipeline here and by diffusers.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .config import ConfigError, Recipe, check_table, load_recipe, split_data_table
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


class _Sources(torch.utils.data.Dataset):
    """Several datasets, each with its own encoder, as one dataset of `Example`s. Encoding happens in `[i]`, so it
    runs in the loader's worker processes, and a sample that fails is skipped like a decoding failure."""

    def __init__(self, parts: list[tuple[object, ExampleEncoder]]):
        self.parts = parts
        self.offsets = [0]
        for dataset, _ in parts:
            self.offsets.append(self.offsets[-1] + len(dataset))

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        import bisect

        part = bisect.bisect_right(self.offsets, index) - 1
        return part, index - self.offsets[part]

    def __getitem__(self, index: int):
        part, local = self._locate(index)
        dataset, encoder = self.parts[part]
        return encoder(dataset[local])

    def sample_path(self, index: int) -> str | None:
        part, local = self._locate(index)
        path = getattr(self.parts[part][0], "sample_path", None)
        return path(local) if path is not None else None


def _sources_of(path: str, raw: dict) -> list[dict]:
    """The recipe's data sources: `[[sources]]` tables (each with its data arguments and an `encode` sub-table), or
    the single-source form `[data]` + `[encode]`. Each is checked against its dataset class and the encoder."""
    if "sources" in raw:
        if "data" in raw or "encode" in raw:
            raise ConfigError(f"{path}: give either [[sources]] or [data] + [encode], not both.")
        entries = raw["sources"]
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise ConfigError(f"{path}: `sources` must be one or more [[sources]] tables.")
    else:
        for table in ("data", "encode"):
            if table not in raw:
                raise ConfigError(f"{path}: the table [{table}] is missing (or use [[sources]]).")
        entries = [{**raw["data"], "encode": raw["encode"]}]
    out = []
    for number, entry in enumerate(entries):
        entry = dict(entry)
        encode = entry.pop("encode", None)
        where = f"sources[{number}]" if "sources" in raw else "data"
        if not isinstance(encode, dict):
            raise ConfigError(f"{path}: [{where}] needs an `encode` table ([{where}.encode] / [encode]).")
        kind, data = split_data_table(path, entry)
        check_table(path, f"{where}.encode" if "sources" in raw else "encode", encode, ExampleEncoder,
                    exclude=ENCODER_SET_BY_COMMAND)
        out.append({"format": kind, "data": data, "encode": encode})
    world = [s for s in out if s["encode"].get("task") in WORLD_ACTION_TASKS]
    if len(world) > 1:
        raise ConfigError(f"{path}: {len(world)} world-action sources; one embodiment (one normalizer) per run.")
    return out


def _build_source(recipe: Recipe, source: dict):
    from .datasets import FolderDataset, LeRobotDataset

    dataset = (LeRobotDataset if source["format"] == "lerobot" else FolderDataset)(**source["data"])
    options = dict(source["encode"])
    normalizer = None
    if options.get("task") in WORLD_ACTION_TASKS:
        stats = getattr(dataset, "stats", None)
        if not stats:
            raise ValueError(f"{recipe.path}: task {options['task']!r} needs action statistics; its data must be a "
                             "LeRobot dataset with meta/stats.json.")
        normalizer = normalizer_from_stats(stats, embodiment=options.get("embodiment"))
        options["action_normalizer"] = normalizer
    return dataset, ExampleEncoder.from_pretrained(recipe.model, **options), normalizer


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
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        raw = {}  # load_recipe reports these
    tables = {"sources": None} if "sources" in raw else {"data": None, "encode": None}
    recipe = load_recipe(path, {**tables, "train": TrainConfig})
    recipe.tables["sources"] = _sources_of(path, {k: recipe.tables[k] for k in tables})
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
    built = [_build_source(recipe, source) for source in recipe.tables["sources"]]
    dataset = _Sources([(d, e) for d, e, _ in built])
    model = _load_transformer(recipe.model, info.device)
    with RunLogger(config.output_dir, config.max_steps, tensorboard=recipe.log_tensorboard) as log:
        log({"event": "start", "recipe": os.path.abspath(path), "examples": len(dataset),
             "sources": [len(d) for d, _, _ in built], "ranks": info.world_size, "device": str(info.device)})
        trainer = Trainer(model, dataset, config, log=log)
        trainer.train()
        state = trainer.full_state_dict(use_ema=True)
        out = None
        if info.is_main:
            out = export_pipeline(recipe.model, state, os.path.join(config.output_dir, "pipeline"))
            for source_data, encoder, normalizer in built:
                if normalizer is not None:
                    normalizer.save(os.path.join(out, "action_normalizer.json"))
                    _policy_config(encoder, source_data).save(out)
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


def distill(path: str) -> str | None:
    """Run the distillation recipe at `path`; returns the exported distilled pipeline folder (rank 0) or None."""
    from ..io import atomic_directory
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
    pipe = Cosmos3TextToVideoPipeline.from_pretrained(recipe.model, dtype=torch.float32)
    if pipe.config.distilled_sigmas:
        raise ValueError(f"`model` = {recipe.model!r} is already a distilled student; distill from the teacher.")
    prompts = pipeline_prompts(pipe, texts, options.pop("negative_prompt", None), **options)
    teacher = pipe.transformer.to(info.device)
    with RunLogger(config.output_dir, config.max_steps, tensorboard=recipe.log_tensorboard) as log:
        log({"event": "start", "recipe": os.path.abspath(path), "prompts": len(prompts), "ranks": info.world_size,
             "device": str(info.device)})
        distiller = Distiller(teacher, prompts, config, log=log)
        distiller.train()
        out = os.path.join(config.output_dir, "pipeline")
        # replaces the previous export of this run (rebuilt from the checkpoints) only once the new one is whole;
        # every rank takes part (FSDP gathers the weights), rank 0 writes
        with atomic_directory(out) if info.is_main else contextlib.nullcontext() as fresh:
            distiller.export(pipe, fresh, ema=True)
        log({"event": "exported", "path": out, "skipped_student_steps": distiller.skipped_student_steps,
             "skipped_critic_steps": distiller.skipped_critic_steps})
    _finish()
    return out if info.is_main else None


def _finish() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
