"""Action representation for Cosmos 3: embodiments, normalization, padding, rotations, chunking, conventions.

An action is the transition between consecutive frames, so a chunk of N actions pairs with N + 1 video frames (the
boundary frame is shared by neighbouring chunks). Raw actions of each embodiment are concatenations of a few unified
blocks: a 9D pose (xyz + 6D rotation), a 1D gripper and 15D fingertips (5 x xyz). The model sees them zero-padded to
`ACTION_DIM` = 64 channels, with the loss masked to the raw width.

Notable choices (each one silently ruins robot results when mismatched, so each is explicit and validated):

* 6D rotation = the first two COLUMNS of the rotation matrix, `[R[:, 0], R[:, 1]]` (Zhou et al. 2019 reference
  code); `convention="rows"` reads/writes the pytorch3d / Diffusion Policy layout (first two rows) instead.
* Quaternions are unit, Hamilton, scalar-first `wxyz` by default; pass `order="xyzw"` for scipy / ROS / robosuite
  data. Quaternions from matrices use the stable largest-component branch and are canonicalized to `w >= 0`.
* Euler strings follow scipy: lowercase = extrinsic (fixed axes), uppercase = intrinsic (moving axes). Robot data is
  mostly extrinsic `"xyz"` = (roll, pitch, yaw) with `R = Rz(yaw) @ Ry(pitch) @ Rx(roll)`. There is no default.
* `quantile` normalization maps per-dimension q01 / q99 linearly onto [-1, 1] and clips (as the framework does);
  `denormalize` inverts the linear map, so it is exact inside [q01, q99] and clipped values return at the bound.
  Constant dimensions (range or std below `eps`) get scale 1: normalized = x - center, still exactly invertible.
* Delta actions: rotation `R_prev^T @ R_next` (in 6D), translation either in the world frame (`p_next - p_prev`)
  or the previous pose's body frame (`R_prev^T (p_next - p_prev)`); non-pose channels (gripper, fingertips) carry
  the target frame's value.
* Block layouts follow the composition documented next to the reference tables; their order inside multi-block
  embodiments is that description's order, and `galbot` (30) has no documented layout (`layout=None`).

Nothing here touches the global RNG state.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..io import atomic_write_json

ACTION_DIM = 64  # the model's padded action width (`transformer.config.action_dim`)

# Copied from diffusers' `pipeline_cosmos3_omni` (`_EMBODIMENT_TO_DOMAIN_ID` / `_EMBODIMENT_TO_RAW_ACTION_DIM`); a
# test asserts equality. Some domains share projection weights (same id); `no_action` and `libero` have no fixed width.
EMBODIMENT_TO_DOMAIN_ID: dict[str, int] = {
    "no_action": 0, "av": 1, "camera_pose": 2, "hand_pose": 3, "pusht": 4, "libero": 5, "umi": 6,
    "bridge_orig_lerobot": 7, "droid_lerobot": 8, "robomind-franka": 8, "galbot": 9, "robomind-franka-dual": 12,
    "robomind-ur": 13, "agibotworld": 15, "agibot_gear_gripper": 15, "agibot_gear_gripper_ext": 15, "fractal": 20,
}  # fmt: skip
EMBODIMENT_TO_RAW_ACTION_DIM: dict[str, int] = {
    "av": 9, "camera_pose": 9, "pusht": 2, "umi": 10, "bridge_orig_lerobot": 10, "droid_lerobot": 10,
    "robomind-franka": 10, "robomind-franka-dual": 20, "robomind-ur": 10, "galbot": 30, "agibotworld": 29,
    "agibot_gear_gripper": 29, "agibot_gear_gripper_ext": 29, "fractal": 10, "hand_pose": 57,
}  # fmt: skip

SEGMENT_WIDTHS: dict[str, int] = {"position": 3, "rotation6d": 6, "gripper": 1, "fingertips": 15, "planar_position": 2}
_ARM = ("position", "rotation6d", "gripper")
_BLOCKS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "av": (("ego", ("position", "rotation6d")),),
    "camera_pose": (("camera", ("position", "rotation6d")),),
    "pusht": (("agent", ("planar_position",)),),
    **dict.fromkeys(("umi", "bridge_orig_lerobot", "droid_lerobot", "robomind-franka", "robomind-ur", "fractal"),
                    (("arm", _ARM),)),
    "robomind-franka-dual": (("left_arm", _ARM), ("right_arm", _ARM)),
    **dict.fromkeys(("agibotworld", "agibot_gear_gripper", "agibot_gear_gripper_ext"),
                    (("ego", ("position", "rotation6d")), ("left_arm", _ARM), ("right_arm", _ARM))),
    "hand_pose": (("ego", ("position", "rotation6d")), ("left_hand", ("position", "rotation6d", "fingertips")),
                  ("right_hand", ("position", "rotation6d", "fingertips"))),
}  # fmt: skip


@dataclass(frozen=True)
class ActionSegment:
    """Channels `[start, stop)` of a raw action hold a `kind` block (see `SEGMENT_WIDTHS`) of body part `group`."""

    group: str
    kind: str
    start: int
    stop: int


@dataclass(frozen=True)
class Embodiment:
    """One action domain: its projection id, raw width (None: set per dataset) and block layout (None: unknown)."""

    name: str
    domain_id: int
    raw_dim: int | None
    layout: tuple[ActionSegment, ...] | None

    def channels(self, *kinds: str) -> list[int]:
        """Channel indices of the segments of the given kinds, e.g. `("gripper", "rotation6d")` for `skip_dims`."""
        unknown = sorted(set(kinds) - set(SEGMENT_WIDTHS))
        if unknown:
            raise ValueError(f"Unknown segment `kinds` {unknown}; valid: {sorted(SEGMENT_WIDTHS)}.")
        return [c for seg in self._require_layout() if seg.kind in kinds for c in range(seg.start, seg.stop)]

    def pose_starts(self) -> list[int]:
        """First channel of each 9D pose block (a position segment directly followed by its rotation6d)."""
        layout = self._require_layout()
        return [a.start for a, b in zip(layout, layout[1:]) if (a.kind, b.kind) == ("position", "rotation6d")]

    def _require_layout(self) -> tuple[ActionSegment, ...]:
        if self.layout is None:
            raise ValueError(f"Embodiment {self.name!r} has no documented block layout (raw_dim={self.raw_dim}).")
        return self.layout


def _build_layout(blocks: tuple[tuple[str, tuple[str, ...]], ...] | None) -> tuple[ActionSegment, ...] | None:
    if blocks is None:
        return None
    segments, start = [], 0
    for group, kinds in blocks:
        for kind in kinds:
            segments.append(ActionSegment(group, kind, start, start + SEGMENT_WIDTHS[kind]))
            start += SEGMENT_WIDTHS[kind]
    return tuple(segments)


EMBODIMENTS: dict[str, Embodiment] = {
    name: Embodiment(name, i, EMBODIMENT_TO_RAW_ACTION_DIM.get(name), _build_layout(_BLOCKS.get(name)))
    for name, i in EMBODIMENT_TO_DOMAIN_ID.items()
}
for _e in EMBODIMENTS.values():  # the layouts are hand-written: fail at import if one disagrees with its width
    if _e.layout is not None and _e.layout[-1].stop != _e.raw_dim:
        raise AssertionError(f"Layout of {_e.name!r} spans {_e.layout[-1].stop} channels, not {_e.raw_dim}.")


def get_embodiment(domain_name: str) -> Embodiment:
    """The registered embodiment called `domain_name` (ValueError listing the valid names otherwise)."""
    if not isinstance(domain_name, str):
        raise TypeError(f"`domain_name` must be a str, got {type(domain_name).__name__}.")
    if domain_name not in EMBODIMENTS:
        raise ValueError(f"Unknown action `domain_name` {domain_name!r}; valid: {sorted(EMBODIMENTS)}.")
    return EMBODIMENTS[domain_name]


def domain_id(domain_name: str) -> int:
    """The id selecting the domain-aware action projection weights."""
    return get_embodiment(domain_name).domain_id


def raw_action_dim(domain_name: str) -> int:
    """The unpadded action width of `domain_name`; ValueError for domains whose width is set per dataset."""
    raw_dim = get_embodiment(domain_name).raw_dim
    if raw_dim is None:
        raise ValueError(
            f"`domain_name` {domain_name!r} has no fixed action width (it depends on the dataset); domains with one: "
            f"{sorted(EMBODIMENT_TO_RAW_ACTION_DIM)}."
        )
    return raw_dim


# ---------------------------------------------------------------------------------------------------- normalization

NORMALIZATION_MODES = ("quantile", "meanstd", "minmax")
_STAT_NAMES = {"quantile": ("low", "high"), "minmax": ("low", "high"), "meanstd": ("mean", "std")}
_FORMAT = "cosmos3.action_normalizer"
_JSON_KEYS = {"format", "version", "mode", "dim", "domain_name", "clip", "eps", "skip_dims", "stats"}


def _quantile(x: Tensor, q: float) -> Tensor:
    """Per-column linear-interpolation quantile (numpy's default); unlike `torch.quantile`, no input size limit."""
    s = x.sort(dim=0).values
    pos = q * (s.shape[0] - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, s.shape[0] - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class ActionNormalizer:
    """Per-dimension affine normalization `y = (x - offset) / scale` of raw (unpadded) actions `[..., dim]`.

    * `quantile`: q01 / q99 -> -1 / +1, clipped to [-1, 1] unless `clip=False`;
    * `minmax`: min / max -> -1 / +1 (not clipped unless `clip=True`);
    * `meanstd`: zero mean, unit standard deviation.

    `skip_dims` pass through untouched (e.g. a gripper already in [0, 1], or rotation6d channels). Statistics are
    float64 and saved as JSON (`save` / `load`) next to a checkpoint, per dataset.
    """

    def __init__(
        self,
        mode: str = "quantile",
        *,
        skip_dims: Sequence[int] = (),
        clip: bool | None = None,
        eps: float = 1e-6,
        domain_name: str | None = None,
    ) -> None:
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"Unknown normalization `mode` {mode!r}; valid: {list(NORMALIZATION_MODES)}.")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"`eps` must be a number >= 0, got {eps!r}.")
        if domain_name is not None:
            get_embodiment(domain_name)
        self.mode, self.eps, self.domain_name = mode, float(eps), domain_name
        self.clip = (mode == "quantile") if clip is None else bool(clip)
        self.skip_dims = tuple(int(d) for d in skip_dims)
        if len(set(self.skip_dims)) != len(self.skip_dims) or any(d < 0 for d in self.skip_dims):
            raise ValueError(f"`skip_dims` must be distinct non-negative indices, got {list(skip_dims)}.")
        self.stats: dict[str, Tensor] | None = None

    @property
    def dim(self) -> int | None:
        return None if self.stats is None else int(next(iter(self.stats.values())).shape[0])

    def _check_dim(self, dim: int, what: str) -> None:
        if self.skip_dims and max(self.skip_dims) >= dim:
            raise ValueError(f"`skip_dims` {list(self.skip_dims)} out of range for {what} width {dim}.")
        expected = EMBODIMENTS[self.domain_name].raw_dim if self.domain_name is not None else None
        if expected is not None and dim != expected:
            raise ValueError(f"{what} width {dim} does not match domain {self.domain_name!r} raw width {expected}.")

    def fit(self, actions: Tensor) -> ActionNormalizer:
        """Statistics over every leading dimension of `actions` `[..., dim]` (at least two samples)."""
        if not torch.is_tensor(actions) or not actions.is_floating_point():
            raise TypeError(f"`actions` must be a floating-point tensor, got {type(actions).__name__}.")
        if actions.ndim < 2 or actions[..., 0].numel() < 2 or actions.shape[-1] < 1:
            raise ValueError(f"`actions` must be [..., dim] with >= 2 samples, got {tuple(actions.shape)}.")
        x = actions.detach().reshape(-1, actions.shape[-1]).to(torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("`actions` contains NaN or inf; statistics would be meaningless.")
        self._check_dim(x.shape[1], "`actions`")
        if self.mode == "quantile":
            self.stats = {"low": _quantile(x, 0.01), "high": _quantile(x, 0.99)}
        elif self.mode == "minmax":
            self.stats = {"low": x.min(0).values, "high": x.max(0).values}
        else:
            self.stats = {"mean": x.mean(0), "std": x.std(0, unbiased=False)}
        return self

    def _affine(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.stats is None:
            raise RuntimeError("ActionNormalizer is not fitted; call `fit` or `load` first.")
        if like.shape[-1] != self.dim:
            raise ValueError(
                f"Action width {like.shape[-1]} does not match the normalizer's {self.dim} (unpad padded actions)."
            )
        if self.mode == "meanstd":
            offset, scale = self.stats["mean"], self.stats["std"]
        else:
            offset, scale = (self.stats["low"] + self.stats["high"]) / 2, (self.stats["high"] - self.stats["low"]) / 2
        # A constant dimension would divide by ~0; scale 1 keeps it finite and exactly invertible.
        scale = torch.where(scale > self.eps, scale, torch.ones_like(scale))
        skip = torch.zeros(self.dim, dtype=torch.bool)
        skip[list(self.skip_dims)] = True
        offset, scale = torch.where(skip, 0.0, offset), torch.where(skip, 1.0, scale)
        return offset.to(like), scale.to(like), skip.to(like.device)

    def normalize(self, actions: Tensor) -> Tensor:
        if not actions.is_floating_point():
            raise TypeError(f"`actions` must be floating point, got {actions.dtype}.")
        if not torch.isfinite(actions).all():
            raise ValueError("`actions` contains NaN or infinite values.")
        offset, scale, skip = self._affine(actions)
        y = (actions - offset) / scale
        return torch.where(skip, y, y.clamp(-1.0, 1.0)) if self.clip else y

    def denormalize(self, normalized: Tensor) -> Tensor:
        if not normalized.is_floating_point():
            raise TypeError(f"`normalized` must be floating point, got {normalized.dtype}.")
        if not torch.isfinite(normalized).all():
            raise ValueError("`normalized` contains NaN or infinite values.")
        offset, scale, _ = self._affine(normalized)
        return normalized * scale + offset

    def to_dict(self) -> dict:
        if self.stats is None:
            raise RuntimeError("ActionNormalizer is not fitted; nothing to save.")
        return {
            "format": _FORMAT, "version": 1, "mode": self.mode, "dim": self.dim, "domain_name": self.domain_name,
            "clip": self.clip, "eps": self.eps, "skip_dims": list(self.skip_dims),
            "stats": {k: v.tolist() for k, v in self.stats.items()},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict, *, expected_dim: int | None = None) -> ActionNormalizer:
        """Strict inverse of `to_dict`: every field required, no extras; `expected_dim` guards the width."""
        if not isinstance(data, dict):
            raise ValueError(f"Normalizer JSON must be an object, got {type(data).__name__}.")
        if set(data) != _JSON_KEYS:
            raise ValueError(
                f"Normalizer JSON fields: missing {sorted(_JSON_KEYS - set(data))}, unexpected "
                f"{sorted(set(data) - _JSON_KEYS)}; required exactly {sorted(_JSON_KEYS)}."
            )
        if data["format"] != _FORMAT or data["version"] != 1:
            raise ValueError(f"`format`/`version` must be {_FORMAT!r}/1, got {data['format']!r}/{data['version']!r}.")
        dim = data["dim"]
        if type(dim) is not int or dim < 1:
            raise ValueError(f"`dim` must be a positive int, got {dim!r}.")
        if expected_dim is not None and dim != expected_dim:
            raise ValueError(f"Normalizer `dim` {dim} does not match `expected_dim` {expected_dim}.")
        if type(data["clip"]) is not bool:
            raise ValueError(f"`clip` must be true/false, got {data['clip']!r}.")
        skip = data["skip_dims"]
        if not isinstance(skip, list) or any(type(d) is not int for d in skip):
            raise ValueError(f"`skip_dims` must be a list of ints, got {skip!r}.")
        if data["domain_name"] is not None and not isinstance(data["domain_name"], str):
            raise ValueError(f"`domain_name` must be a string or null, got {data['domain_name']!r}.")
        norm = cls(data["mode"], skip_dims=skip, clip=data["clip"], eps=data["eps"], domain_name=data["domain_name"])
        stats = data["stats"]
        names = _STAT_NAMES[norm.mode]
        if not isinstance(stats, dict) or set(stats) != set(names):
            got = sorted(stats) if isinstance(stats, dict) else stats
            raise ValueError(f"`stats` for mode {norm.mode!r} must have exactly {list(names)}, got {got!r}.")
        for name in names:
            values = stats[name]
            if not (isinstance(values, list) and len(values) == dim):
                raise ValueError(f"`stats.{name}` must be a list of {dim} numbers, got {values!r:.80}.")
            if any(type(v) not in (int, float) or not math.isfinite(v) for v in values):
                raise ValueError(f"`stats.{name}` must hold finite numbers only.")
        tensors = {k: torch.tensor(stats[k], dtype=torch.float64) for k in names}
        if norm.mode == "meanstd" and (tensors["std"] < 0).any():
            raise ValueError("`stats.std` must be >= 0.")
        if norm.mode != "meanstd" and (tensors["low"] > tensors["high"]).any():
            raise ValueError("`stats.low` must be <= `stats.high` in every dimension.")
        norm._check_dim(dim, "Normalizer `dim`")
        norm.stats = tensors
        return norm

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically and fsynced (`cosmos3.io.atomic_write_json`): readers never see half a file."""
        atomic_write_json(path, self.to_dict(), fsync=True)

    @classmethod
    def load(cls, path: str | os.PathLike, *, expected_dim: int | None = None) -> ActionNormalizer:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"Normalizer file {str(path)!r} is not valid JSON: {err}.") from err
        return cls.from_dict(data, expected_dim=expected_dim)


# ---------------------------------------------------------------------------------------------------------- padding


def _check_actions(actions: Tensor, name: str = "actions", ndim: int | None = 2) -> None:
    if not torch.is_tensor(actions):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(actions).__name__}.")
    if ndim is not None and actions.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dims, got shape {tuple(actions.shape)}.")


def pad_actions(
    actions: Tensor, action_dim: int = ACTION_DIM, *, domain_name: str | None = None
) -> tuple[Tensor, Tensor]:
    """`[T, raw]` -> (zero-padded `[T, action_dim]`, bool channel mask `[action_dim]`, True on the raw channels)."""
    _check_actions(actions)
    raw = actions.shape[-1]
    if domain_name is not None and raw != raw_action_dim(domain_name):
        raise ValueError(f"`actions` width {raw} != raw width {raw_action_dim(domain_name)} of {domain_name!r}.")
    if raw > action_dim:
        raise ValueError(f"`actions` width {raw} exceeds `action_dim` {action_dim}; the model cannot represent it.")
    mask = torch.arange(action_dim, device=actions.device) < raw
    return F.pad(actions, (0, action_dim - raw)), mask


def unpad_actions(padded: Tensor, raw_dim: int) -> Tensor:
    """`[..., action_dim]` -> `[..., raw_dim]` (predicted padding channels are dropped, whatever their values)."""
    _check_actions(padded, "padded", ndim=None)
    if not 0 < raw_dim <= padded.shape[-1]:
        raise ValueError(f"`raw_dim` must be in [1, {padded.shape[-1]}], got {raw_dim}.")
    return padded[..., :raw_dim]


def pad_action_batch(actions: Sequence[Tensor], action_dim: int = ACTION_DIM) -> tuple[Tensor, Tensor]:
    """Samples `[T, raw_i]` (same T, any widths) -> (`[B, T, action_dim]`, mask `[B, 1, action_dim]`).

    The mask broadcasts against `[B, T, action_dim]`, as `flow.masked_mse` expects.
    """
    if not actions:
        raise ValueError("`actions` is empty.")
    lengths = {a.shape[0] for a in actions if torch.is_tensor(a)}
    if len(lengths) > 1:
        raise ValueError(f"`actions` samples must share their length T, got {sorted(lengths)}.")
    padded, masks = zip(*(pad_actions(a, action_dim) for a in actions))
    return torch.stack(padded), torch.stack(masks)[:, None]


def unpad_action_batch(padded: Tensor, raw_dims: Sequence[int]) -> list[Tensor]:
    """`[B, T, action_dim]` -> per-sample `[T, raw_dims[b]]`."""
    _check_actions(padded, "padded", ndim=3)
    if len(raw_dims) != padded.shape[0]:
        raise ValueError(f"`raw_dims` has {len(raw_dims)} entries but `padded` has {padded.shape[0]} samples.")
    return [unpad_actions(p, d) for p, d in zip(padded, raw_dims)]


def fit_chunk_length(actions: Tensor, chunk_size: int) -> Tensor:
    """As the reference pipeline: repeat the last action up to `chunk_size`, or truncate to it."""
    _check_actions(actions)
    if chunk_size < 1 or actions.shape[0] < 1:
        raise ValueError(f"Need `chunk_size` >= 1 and >= 1 action, got {chunk_size} and {actions.shape[0]}.")
    if actions.shape[0] < chunk_size:
        actions = torch.cat([actions, actions[-1:].expand(chunk_size - actions.shape[0], -1)])
    return actions[:chunk_size]


# -------------------------------------------------------------------------------------------------------- rotations


def _check_rot(x: Tensor, name: str, shape: tuple[int, ...]) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}.")
    if x.ndim < len(shape) or tuple(x.shape[x.ndim - len(shape) :]) != shape:
        raise ValueError(f"`{name}` must have shape [..., {', '.join(map(str, shape))}], got {tuple(x.shape)}.")
    if not torch.isfinite(x).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")


def _check_choice(value: str, name: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"Invalid `{name}` {value!r}; valid: {list(valid)}.")


def rotation6d_to_matrix(d6: Tensor, *, convention: str = "columns") -> Tensor:
    """`[..., 6]` -> `[..., 3, 3]` by Gram-Schmidt (any non-degenerate 6D vector gives a proper rotation)."""
    _check_rot(d6, "d6", (6,))
    _check_choice(convention, "convention", ("columns", "rows"))
    # A zero first vector, or a second one parallel to it, spans no plane: there is no rotation to recover.
    spans = torch.linalg.cross(d6[..., :3], d6[..., 3:], dim=-1).norm(dim=-1)
    if (d6[..., :3].norm(dim=-1) < 1e-8).any() or (spans < 1e-8).any():
        raise ValueError("`d6` has a degenerate 6D rotation (a zero vector, or two parallel vectors).")
    b1 = F.normalize(d6[..., :3], dim=-1)
    a2 = d6[..., 3:]
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-1 if convention == "columns" else -2)


def matrix_to_rotation6d(matrix: Tensor, *, convention: str = "columns") -> Tensor:
    """`[..., 3, 3]` -> `[..., 6]` = `[R[:, 0], R[:, 1]]` (columns) or `[R[0], R[1]]` (rows)."""
    _check_rot(matrix, "matrix", (3, 3))
    _check_choice(convention, "convention", ("columns", "rows"))
    m = matrix if convention == "columns" else matrix.transpose(-1, -2)
    return torch.cat((m[..., :, 0], m[..., :, 1]), dim=-1)


def quaternion_to_matrix(quaternion: Tensor, *, order: str = "wxyz") -> Tensor:
    """Unit quaternion `[..., 4]` (normalized here) -> `[..., 3, 3]`."""
    _check_rot(quaternion, "quaternion", (4,))
    _check_choice(order, "order", ("wxyz", "xyzw"))
    if (quaternion.norm(dim=-1) < 1e-8).any():
        raise ValueError("`quaternion` has a zero quaternion, which is no rotation.")
    q = quaternion if order == "wxyz" else quaternion.roll(1, dims=-1)
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)),
        (2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)),
        (2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)),
    )
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def matrix_to_quaternion(matrix: Tensor, *, order: str = "wxyz") -> Tensor:
    """`[..., 3, 3]` -> unit quaternion with `w >= 0`, via the branch with the largest component (no 0/0)."""
    _check_rot(matrix, "matrix", (3, 3))
    _check_choice(order, "order", ("wxyz", "xyzw"))
    m = matrix
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # 4 q_k^2 for k = w, x, y, z; the largest one is far from 0, so dividing by it is well conditioned.
    four_sq = torch.stack((1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22), -1)
    sw, sx, sy = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    pxy, pxz, pyz = m[..., 1, 0] + m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 2, 1] + m[..., 1, 2]
    # Row k holds 4 q_k * (w, x, y, z).
    cand = torch.stack(
        (
            torch.stack((four_sq[..., 0], sw, sx, sy), -1),
            torch.stack((sw, four_sq[..., 1], pxy, pxz), -1),
            torch.stack((sx, pxy, four_sq[..., 2], pyz), -1),
            torch.stack((sy, pxz, pyz, four_sq[..., 3]), -1),
        ),
        -2,
    )
    best = four_sq.argmax(-1)
    q = cand.gather(-2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = F.normalize(q, dim=-1)
    q = torch.where(q[..., :1] < 0, -q, q)
    return q if order == "wxyz" else q.roll(-1, dims=-1)


_AXES = {"x": 0, "y": 1, "z": 2}


def _parse_euler(convention: str) -> tuple[list[int], bool]:
    """scipy naming: 3 distinct axes, lowercase extrinsic / uppercase intrinsic (proper Euler like 'zyz' not here)."""
    valid = "3 distinct letters of xyz, all lowercase (extrinsic) or all uppercase (intrinsic), e.g. 'xyz' or 'XYZ'"
    if (
        not isinstance(convention, str)
        or len(convention) != 3
        or not (convention.islower() or convention.isupper())
        or set(convention.lower()) != set("xyz")
    ):
        raise ValueError(f"Invalid Euler `convention` {convention!r}; valid: {valid}.")
    return [_AXES[c] for c in convention.lower()], convention.islower()


def _axis_rotation(axis: int, angle: Tensor) -> Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    m = torch.zeros(*angle.shape, 3, 3, dtype=angle.dtype, device=angle.device)
    i1, i2 = (axis + 1) % 3, (axis + 2) % 3
    m[..., axis, axis] = 1
    m[..., i1, i1], m[..., i2, i2], m[..., i2, i1], m[..., i1, i2] = c, c, s, -s
    return m


def euler_to_matrix(angles: Tensor, convention: str) -> Tensor:
    """`[..., 3]` radians -> `[..., 3, 3]`. `"xyz"`: `Rz(a2) Ry(a1) Rx(a0)`; `"XYZ"`: `Rx(a0) Ry(a1) Rz(a2)`."""
    _check_rot(angles, "angles", (3,))
    axes, extrinsic = _parse_euler(convention)
    mats = [_axis_rotation(a, angles[..., n]) for n, a in enumerate(axes)]
    if extrinsic:  # rotations about fixed axes compose right-to-left
        mats = mats[::-1]
    return mats[0] @ mats[1] @ mats[2]


def matrix_to_euler(matrix: Tensor, convention: str) -> Tensor:
    """Inverse of `euler_to_matrix`; middle angle in [-pi/2, pi/2], others in (-pi, pi].

    At gimbal lock (middle angle +-pi/2) the last intrinsic angle is set to 0; the matrix still round-trips.
    """
    _check_rot(matrix, "matrix", (3, 3))
    axes, extrinsic = _parse_euler(convention)
    if extrinsic:  # extrinsic (a, b, c) about i, j, k == intrinsic (c, b, a) about k, j, i
        axes = axes[::-1]
    i, j, k = axes
    sign = 1.0 if (j - i) % 3 == 1 else -1.0  # cyclic (xyz, yzx, zxy) vs anti-cyclic sequences
    r = matrix
    b = torch.atan2(sign * r[..., i, k], torch.hypot(r[..., i, i], r[..., i, j]))
    locked = torch.cos(b) < 10 * torch.finfo(r.dtype).eps
    c = torch.where(locked, torch.zeros_like(b), torch.atan2(-sign * r[..., i, j], r[..., i, i]))
    # The first angle comes from what is left, R_i(a) = R R_k(c)^T R_j(b)^T, so it absorbs any error in c.
    rest = r @ _axis_rotation(k, c).transpose(-1, -2) @ _axis_rotation(j, b).transpose(-1, -2)
    i1, i2 = (i + 1) % 3, (i + 2) % 3
    a = torch.atan2(rest[..., i2, i1], rest[..., i1, i1])
    out = torch.stack((a, b, c), -1)
    return out.flip(-1) if extrinsic else out


def axis_angle_to_matrix(axis_angle: Tensor) -> Tensor:
    """Rotation vector `[..., 3]` (axis * angle, radians) -> `[..., 3, 3]`."""
    _check_rot(axis_angle, "axis_angle", (3,))
    theta = axis_angle.norm(dim=-1, keepdim=True)
    small = theta < 1e-4
    k = torch.where(small, 0.5 - theta**2 / 48, torch.sin(theta / 2) / torch.where(small, 1.0, theta))
    return quaternion_to_matrix(torch.cat((torch.cos(theta / 2), axis_angle * k), -1))


def matrix_to_axis_angle(matrix: Tensor) -> Tensor:
    """`[..., 3, 3]` -> rotation vector with angle in [0, pi]."""
    q = matrix_to_quaternion(matrix)
    w, v = q[..., :1], q[..., 1:]
    n = v.norm(dim=-1, keepdim=True)
    small = n < 1e-6
    return v * torch.where(small, 2 / w.clamp(min=0.5), 2 * torch.atan2(n, w) / torch.where(small, 1.0, n))


# name -> (shape of one rotation, to matrix, from matrix)
_Fn = Callable[[Tensor], Tensor]
ROTATION_REPRESENTATIONS: dict[str, tuple[tuple[int, ...], _Fn, _Fn]] = {
    "rotation6d": ((6,), rotation6d_to_matrix, matrix_to_rotation6d),
    "matrix": ((3, 3), lambda m: m, lambda m: m),
    "quaternion_wxyz": ((4,), quaternion_to_matrix, matrix_to_quaternion),
    "quaternion_xyzw": ((4,), partial(quaternion_to_matrix, order="xyzw"), partial(matrix_to_quaternion, order="xyzw")),
    "euler_xyz_extrinsic": ((3,), lambda e: euler_to_matrix(e, "xyz"), lambda m: matrix_to_euler(m, "xyz")),
    "euler_xyz_intrinsic": ((3,), lambda e: euler_to_matrix(e, "XYZ"), lambda m: matrix_to_euler(m, "XYZ")),
    "axis_angle": ((3,), axis_angle_to_matrix, matrix_to_axis_angle),
}


def convert_rotation(rotation: Tensor, source: str, target: str) -> Tensor:
    """Between any two of `ROTATION_REPRESENTATIONS` (through the rotation matrix)."""
    _check_choice(source, "source", list(ROTATION_REPRESENTATIONS))
    _check_choice(target, "target", list(ROTATION_REPRESENTATIONS))
    shape, to_matrix, _ = ROTATION_REPRESENTATIONS[source]
    _check_rot(rotation, "rotation", shape)
    return rotation if source == target else ROTATION_REPRESENTATIONS[target][2](to_matrix(rotation))


# --------------------------------------------------------------------------------------------- absolute <-> delta

TRANSLATION_FRAMES = ("world", "body")


def poses_to_deltas(poses: Tensor, *, translation_frame: str) -> Tensor:
    """Absolute 9D poses `[..., T, 9]` (xyz + 6D) -> `[..., T - 1, 9]` deltas (translation + 6D of R_prev^T R_next)."""
    _check_rot(poses, "poses", (9,))
    _check_choice(translation_frame, "translation_frame", TRANSLATION_FRAMES)
    if poses.ndim < 2 or poses.shape[-2] < 2:
        raise ValueError(f"`poses` must be [..., T, 9] with T >= 2, got {tuple(poses.shape)}.")
    rot = rotation6d_to_matrix(poses[..., 3:])
    r_prev_t = rot[..., :-1, :, :].transpose(-1, -2)
    d = poses[..., 1:, :3] - poses[..., :-1, :3]
    if translation_frame == "body":
        d = (r_prev_t @ d[..., None])[..., 0]
    return torch.cat((d, matrix_to_rotation6d(r_prev_t @ rot[..., 1:, :, :])), -1)


def deltas_to_poses(initial_pose: Tensor, deltas: Tensor, *, translation_frame: str) -> Tensor:
    """Integrate `deltas` `[..., N, 9]` from `initial_pose` `[..., 9]` -> absolute `[..., N + 1, 9]`."""
    _check_rot(initial_pose, "initial_pose", (9,))
    _check_rot(deltas, "deltas", (9,))
    _check_choice(translation_frame, "translation_frame", TRANSLATION_FRAMES)
    if deltas.ndim != initial_pose.ndim + 1:
        raise ValueError(f"`deltas` {tuple(deltas.shape)} must be `initial_pose` {tuple(initial_pose.shape)} + [N].")
    p, r = initial_pose[..., :3], rotation6d_to_matrix(initial_pose[..., 3:])
    positions, rotations = [p], [r]
    for n in range(deltas.shape[-2]):  # sequential by nature; chunks are short
        dp = deltas[..., n, :3]
        if translation_frame == "body":
            dp = (r @ dp[..., None])[..., 0]
        p, r = p + dp, r @ rotation6d_to_matrix(deltas[..., n, 3:])
        positions.append(p)
        rotations.append(r)
    return torch.cat((torch.stack(positions, -2), matrix_to_rotation6d(torch.stack(rotations, -3))), -1)


def absolute_to_delta(states: Tensor, domain_name: str, *, translation_frame: str) -> Tensor:
    """Per-frame raw states `[..., F, raw]` -> actions `[..., F - 1, raw]`: every 9D pose block of the embodiment
    becomes a delta; other channels (gripper, fingertips) take the target frame's value."""
    starts = _pose_starts(states, domain_name, "states")
    out = states[..., 1:, :].clone()
    for s in starts:
        out[..., s : s + 9] = poses_to_deltas(states[..., s : s + 9], translation_frame=translation_frame)
    return out


def delta_to_absolute(initial_state: Tensor, actions: Tensor, domain_name: str, *, translation_frame: str) -> Tensor:
    """Inverse of `absolute_to_delta`: `initial_state` `[..., raw]`, `actions` `[..., N, raw]` -> `[..., N+1, raw]`."""
    starts = _pose_starts(actions, domain_name, "actions")
    if initial_state.shape != actions.shape[:-2] + actions.shape[-1:]:
        raise ValueError(f"`initial_state` {tuple(initial_state.shape)} does not fit `actions` {tuple(actions.shape)}.")
    out = torch.cat((initial_state[..., None, :], actions), -2)
    for s in starts:
        out[..., s : s + 9] = deltas_to_poses(
            initial_state[..., s : s + 9], actions[..., s : s + 9], translation_frame=translation_frame
        )
    return out


def _pose_starts(x: Tensor, domain_name: str, name: str) -> list[int]:
    embodiment = get_embodiment(domain_name)
    raw = raw_action_dim(domain_name)
    _check_actions(x, name, ndim=None)
    if x.ndim < 2 or x.shape[-1] != raw:
        raise ValueError(f"`{name}` must be [..., T, {raw}] for {domain_name!r}, got {tuple(x.shape)}.")
    starts = embodiment.pose_starts()
    if not starts:
        raise ValueError(f"`domain_name` {domain_name!r} has no 9D pose block; absolute/delta is undefined for it.")
    return starts


# --------------------------------------------------------------------------------------------------------- chunking


class ActionChunk(NamedTuple):
    start: int  # index of the chunk's first frame (and first action) in the trajectory
    frames: Tensor | np.ndarray  # [N + 1, ...]
    actions: Tensor  # [N, raw]


def check_chunk(frames: Tensor | np.ndarray, actions: Tensor, chunk_size: int | None = None) -> None:
    """N actions are the transitions between N + 1 frames; raise ValueError naming both lengths otherwise."""
    if len(frames) != len(actions) + 1:
        raise ValueError(
            f"`frames` has {len(frames)} entries and `actions` {len(actions)}; N actions pair with N + 1 frames."
        )
    if chunk_size is not None and len(actions) != chunk_size:
        raise ValueError(f"`actions` has {len(actions)} entries, expected `chunk_size` {chunk_size}.")


def chunk_trajectory(
    frames: Tensor | np.ndarray, actions: Tensor, chunk_size: int, *, stride: int | None = None, drop_last: bool = True
) -> list[ActionChunk]:
    """Split frames `[F, ...]` and actions `[F - 1, raw]` into chunks of `chunk_size` actions + `chunk_size + 1` frames.

    Chunks start every `stride` actions (default `chunk_size`: consecutive chunks share one boundary frame). With
    `drop_last=False` a final chunk aligned to the trajectory's end covers a remainder (overlapping its neighbour).
    """
    check_chunk(frames, actions)
    stride = chunk_size if stride is None else stride
    if chunk_size < 1 or stride < 1:
        raise ValueError(f"`chunk_size` and `stride` must be >= 1, got {chunk_size} and {stride}.")
    n = len(actions)
    if n < chunk_size:
        raise ValueError(f"Trajectory has {n} actions, fewer than `chunk_size` {chunk_size}.")
    starts = list(range(0, n - chunk_size + 1, stride))
    if not drop_last and starts[-1] + chunk_size < n:
        starts.append(n - chunk_size)
    return [ActionChunk(s, frames[s : s + chunk_size + 1], actions[s : s + chunk_size]) for s in starts]


def merge_chunks(chunks: Sequence[ActionChunk]) -> tuple[Tensor | np.ndarray, Tensor]:
    """Reassemble a trajectory from chunks (overlaps are taken from the earlier chunk); ValueError on gaps."""
    if not chunks:
        raise ValueError("`chunks` is empty.")
    for c in chunks:
        check_chunk(c.frames, c.actions)
    chunks = sorted(chunks, key=lambda c: c.start)
    if chunks[0].start != 0:
        raise ValueError(f"`chunks` must start at action 0, first starts at {chunks[0].start}.")
    frames, actions, end = [], [], 0
    for c in chunks:
        if c.start > end:
            raise ValueError(f"`chunks` leave actions [{end}, {c.start}) uncovered.")
        keep = end - c.start  # already covered by earlier chunks
        frames.append(c.frames[keep + (1 if end else 0) :])
        actions.append(c.actions[keep:])
        end = max(end, c.start + len(c.actions))
    cat = np.concatenate if isinstance(chunks[0].frames, np.ndarray) else torch.cat
    return cat(frames), torch.cat(actions)


# ------------------------------------------------------------------------------------------------------ conventions

GRIPPER_OPEN = ("max", "min")
GRIPPER_RANGES = {"[0,1]": (0.0, 1.0), "[-1,1]": (-1.0, 1.0)}
# (flip rows, flip columns); a 180 degree rotation is both flips.
IMAGE_FLIPS = {
    "none": (False, False), "vertical": (True, False), "horizontal": (False, True), "rotate180": (True, True)
}  # fmt: skip
ACTION_SPACES = ("absolute", "delta")


@dataclass(frozen=True, kw_only=True)
class ActionConventions:
    """How a dataset (or a model) encodes actions and images. Every field is required: no silent defaults.

    * `gripper_open`: whether "open" is the `max` or the `min` of `gripper_range` (LIBERO: -1 open, so `min`);
    * `gripper_range`: `"[0,1]"` or `"[-1,1]"`;
    * `image_flip`: how stored frames differ from upright (`"rotate180"` for LIBERO simulator images);
    * `action_space`: `"absolute"` poses or `"delta"` transitions, and `translation_frame` of deltas;
    * `rotation`: one of `ROTATION_REPRESENTATIONS`.
    """

    gripper_open: str
    gripper_range: str
    image_flip: str
    action_space: str
    translation_frame: str
    rotation: str

    def __post_init__(self) -> None:
        valid = {
            "gripper_open": GRIPPER_OPEN, "gripper_range": list(GRIPPER_RANGES), "image_flip": list(IMAGE_FLIPS),
            "action_space": ACTION_SPACES, "translation_frame": TRANSLATION_FRAMES,
            "rotation": list(ROTATION_REPRESENTATIONS),
        }  # fmt: skip
        for name, choices in valid.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"ActionConventions.{name}={value!r} is invalid; valid: {list(choices)}.")


def assert_conventions_match(expected: ActionConventions, actual: ActionConventions, context: str = "") -> None:
    """ValueError listing every field where `actual` differs from `expected`."""
    diffs = [
        f"{f.name}: expected {getattr(expected, f.name)!r}, got {getattr(actual, f.name)!r}"
        for f in fields(ActionConventions)
        if getattr(expected, f.name) != getattr(actual, f.name)
    ]
    if diffs:
        raise ValueError(f"Action conventions mismatch{' (' + context + ')' if context else ''}: {'; '.join(diffs)}.")


def convert_gripper(
    gripper: Tensor, source: ActionConventions, target: ActionConventions, *, atol: float = 1e-3
) -> Tensor:
    """Map gripper values between conventions; values outside `source`'s range (beyond `atol`) raise."""
    if not torch.is_tensor(gripper) or not gripper.is_floating_point():
        raise TypeError(f"`gripper` must be a floating-point tensor, got {getattr(gripper, 'dtype', type(gripper))}.")
    lo, hi = GRIPPER_RANGES[source.gripper_range]
    if gripper.numel() and (gripper.min() < lo - atol or gripper.max() > hi + atol):
        raise ValueError(
            f"`gripper` spans [{gripper.min().item():.4g}, {gripper.max().item():.4g}], outside the source "
            f"gripper_range {source.gripper_range}; the source convention is probably wrong."
        )
    openness = (gripper - lo) / (hi - lo)
    if source.gripper_open == "min":
        openness = 1 - openness
    if target.gripper_open == "min":
        openness = 1 - openness
    lo, hi = GRIPPER_RANGES[target.gripper_range]
    return lo + openness * (hi - lo)


def flip_images(images: Tensor | np.ndarray, flip: str, *, channels_last: bool | None = None) -> Tensor | np.ndarray:
    """Apply `flip` (an `IMAGE_FLIPS` name; each is its own inverse) to uint8 `[..., H, W, 3]` (channels last, the
    default for uint8) or float `[..., 3, H, W]` (channels first, the default otherwise); numpy or torch."""
    _check_choice(flip, "flip", list(IMAGE_FLIPS))
    if not isinstance(images, (Tensor, np.ndarray)):
        raise TypeError(f"`images` must be a torch.Tensor or np.ndarray, got {type(images).__name__}.")
    if channels_last is None:
        channels_last = images.dtype == (torch.uint8 if isinstance(images, Tensor) else np.uint8)
    c_axis = -1 if channels_last else -3
    if images.ndim < 3 or images.shape[c_axis] != 3:
        layout = "[..., H, W, 3]" if channels_last else "[..., 3, H, W]"
        raise ValueError(f"`images` must be {layout} for dtype {images.dtype}, got {tuple(images.shape)}.")
    vertical, horizontal = IMAGE_FLIPS[flip]
    h_axis = -3 if channels_last else -2
    axes = [a for a, on in ((h_axis, vertical), (h_axis + 1, horizontal)) if on]
    if not axes:
        return images
    return np.flip(images, axes).copy() if isinstance(images, np.ndarray) else torch.flip(images, axes)


def convert_image_flip(
    images: Tensor | np.ndarray,
    source: ActionConventions,
    target: ActionConventions,
    *,
    channels_last: bool | None = None,
) -> Tensor | np.ndarray:
    """Re-orient frames stored with `source.image_flip` to `target.image_flip` (flips compose by xor)."""
    sv, sh = IMAGE_FLIPS[source.image_flip]
    tv, th = IMAGE_FLIPS[target.image_flip]
    net = {v: k for k, v in IMAGE_FLIPS.items()}[(sv != tv, sh != th)]
    return flip_images(images, net, channels_last=channels_last)


def convert_action_space(
    actions: Tensor,
    source: ActionConventions,
    target: ActionConventions,
    *,
    domain_name: str,
    initial_state: Tensor | None = None,
) -> Tensor:
    """Absolute states `[..., F, raw]` <-> delta actions `[..., F - 1, raw]` (deltas need `initial_state`)."""
    same_frame = source.translation_frame == target.translation_frame
    if source.action_space == target.action_space and (source.action_space == "absolute" or same_frame):
        return actions
    if source.rotation != "rotation6d" or target.rotation != "rotation6d":
        raise ValueError(f"Pose blocks must be rotation6d, got {source.rotation!r} -> {target.rotation!r}.")
    if source.action_space == "delta":
        if initial_state is None:
            raise ValueError("Converting delta actions needs `initial_state` (the absolute state at frame 0).")
        actions = delta_to_absolute(initial_state, actions, domain_name, translation_frame=source.translation_frame)
    if target.action_space == "absolute":
        return actions
    return absolute_to_delta(actions, domain_name, translation_frame=target.translation_frame)
