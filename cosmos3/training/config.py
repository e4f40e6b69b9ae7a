"""TOML recipes for `cosmos3 train` and `cosmos3 distill`, validated before anything heavy starts.

A recipe is a TOML file with a few top-level keys and one table per component; each table's keys are the
keyword arguments of that component (a dataclass or constructor), checked against its signature: an unknown key,
a missing required key or a value of the wrong type is an error naming the table, the key, the value and what is
valid. For example:

    model = "checkpoints/Cosmos3-Tiny"   # a pipeline folder (transformer, vae, tokenizer, scheduler)
    device = "cuda"                      # optional; default: CUDA when available

    [data]                               # cosmos3.training.datasets.LeRobotDataset or FolderDataset arguments
    format = "lerobot"                   # or "folder"
    root = "data/pusht"
    clip_frames = 17

    [encode]                             # cosmos3.training.encode.ExampleEncoder options
    task = "policy"
    height = 256
    width = 256

    [train]                              # cosmos3.training.TrainConfig fields
    output_dir = "runs/pusht"
    max_steps = 2000

Relative paths are resolved against the recipe's folder.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import os
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TOP_LEVEL = {"model": str, "device": str, "log_tensorboard": bool}
DATA_FORMATS = ("lerobot", "folder")
PATH_KEYS = {"model", "root", "output_dir"}


class ConfigError(ValueError):
    """A recipe that cannot run: names the file, the table and the key."""


@dataclass
class Recipe:
    """A validated recipe: the raw tables, ready to be passed as keyword arguments."""

    path: str
    model: str
    device: str | None = None
    log_tensorboard: bool = True
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether a TOML value fits a (simple) type annotation: str/int/float/bool, unions, tuples, lists, dicts."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # TOML writes 1 or 1.0; both are fine for a float
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
        return all(_type_ok(v, args[0]) for v in value) if args else True
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation we cannot check statically (the component validates it itself)


def _describe(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_table(path: str, table: str, values: dict[str, Any], target: Callable,
                exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check `values` against the keyword parameters of `target` (a class or function); returns them."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: `{table}` must be a table ([{table}]), got {values!r}.")
    signature = inspect.signature(target)
    try:
        if dataclasses.is_dataclass(target):
            hints = typing.get_type_hints(target)
        else:
            hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable forward references: fall back to no type checks for those
        hints = {}
    params = {name: p for name, p in signature.parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in exclude and name != "self"}
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} in [{table}]; valid keys: {sorted(params)}.")
    for name, p in params.items():
        if name not in values:
            if p.default is inspect.Parameter.empty:
                raise ConfigError(f"{path}: [{table}] is missing the required key `{name}`.")
            continue
        annotation = hints.get(name, p.annotation)
        if isinstance(annotation, str):
            annotation = inspect.Parameter.empty
        if not _type_ok(values[name], annotation):
            raise ConfigError(f"{path}: [{table}] `{name}` = {values[name]!r} has the wrong type; expected "
                              f"{_describe(annotation)}.")
    return values


def _resolve_paths(base: str, values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for key in PATH_KEYS & set(out):
        if isinstance(out[key], str) and not os.path.isabs(out[key]):
            out[key] = os.path.normpath(os.path.join(base, out[key]))
    return out


def load_recipe(path: str, components: dict[str, Callable | None], exclude: dict[str, tuple[str, ...]] | None = None,
                ) -> Recipe:
    """Read and validate the recipe at `path`.

    `components`: table name -> the callable its keys are checked against (None: the table is checked by the
    caller, e.g. `data`, whose target depends on its `format`). Every listed table is required; other tables
    are errors. `exclude`: per table, parameters the command sets itself (not allowed in the file).
    """
    if not os.path.isfile(path):
        raise ConfigError(f"The recipe {path!r} does not exist.")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    known = set(TOP_LEVEL) | set(components)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) or table(s) {unknown}; valid: {sorted(known)}.")
    for key, kind in TOP_LEVEL.items():
        if key in raw and not _type_ok(raw[key], kind):
            raise ConfigError(f"{path}: `{key}` = {raw[key]!r} must be a {kind.__name__}.")
    if "model" not in raw:
        raise ConfigError(f"{path}: the required top-level key `model` (a pipeline folder) is missing.")
    if raw.get("device") not in (None, "cpu", "cuda"):
        raise ConfigError(f"{path}: `device` must be 'cpu' or 'cuda', got {raw['device']!r}.")
    tables = {}
    for name, target in components.items():
        if name not in raw:
            raise ConfigError(f"{path}: the table [{name}] is missing.")
        values = raw[name]
        if isinstance(values, dict):
            values = _resolve_paths(base, values)
        elif isinstance(values, list):  # an array of tables ([[sources]])
            values = [_resolve_paths(base, v) if isinstance(v, dict) else v for v in values]
        tables[name] = check_table(path, name, values, target, (exclude or {}).get(name, ())) if target else values
    model = _resolve_paths(base, {"model": raw["model"]})["model"]
    return Recipe(path=path, model=model, device=raw.get("device"), log_tensorboard=raw.get("log_tensorboard", True),
                  tables=tables)


def split_data_table(path: str, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The `[data]` table's `format` and the remaining keyword arguments (checked against that dataset class)."""
    from .datasets import FolderDataset, LeRobotDataset

    if not isinstance(values, dict):
        raise ConfigError(f"{path}: `data` must be a table ([data]).")
    values = dict(values)
    kind = values.pop("format", None)
    if kind not in DATA_FORMATS:
        raise ConfigError(f"{path}: [data] `format` must be one of {list(DATA_FORMATS)}, got {kind!r}.")
    target = LeRobotDataset if kind == "lerobot" else FolderDataset
    return kind, check_table(path, "data", values, target, exclude=("limits",))
