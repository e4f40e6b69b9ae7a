"""Sequence layout of a Cosmos 3 batch: what goes where in the two token streams.

A Cosmos 3 sample is one *understanding* segment (chat-templated text, causal) followed by one *generation*
segment (vision latent patches, then sound latents, then action tokens; bidirectional). We keep every batch as
two packed streams, never as one interleaved sequence:

    und stream  [text_0 | text_1 | ... ]                      (sum L_b tokens, cu_seqlens_und)
    gen stream  [vis_0 snd_0 act_0 | vis_1 snd_1 act_1 | ...]  (sum G_b tokens, cu_seqlens_gen)

so that each tower's linear layers run on one dense tensor, and attention is two calls: causal over the und
stream, and gen queries over [und K/V ‖ gen K/V] of their own sample.

Everything here depends only on the prompt lengths and latent shapes, so a layout is built once per request
and reused across denoising steps (and across the cond/uncond passes of guidance when batched together).

Position ids follow the reference (diffusers `Cosmos3OmniPipeline`): text uses 0..L-1 on all three mRoPE axes;
generated modalities start at L + `unified_3d_mrope_temporal_modality_margin`; the temporal id is modulated by
fps so that time is measured in the same units whatever the frame rate; sound and actions share the vision
temporal origin so the three are aligned in time.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Cosmos3Sample:
    """The static description of one sample of a batch.

    Args:
        text_ids: Token ids of the understanding segment (already chat-templated), a 1-D sequence of ints.
        vision_shape: Latent grid `(T, H, W)` of the vision segment (before 2x2 patchify).
        vision_condition_frames: Latent frame indexes that are clean conditioning (no timestep, no prediction).
        fps: Frame rate of the video, used for the fps-modulated temporal position ids (`None`: no modulation).
        sound_length: Number of sound latent frames (0: no sound segment).
        action_length: Number of action tokens (0: no action segment).
        action_condition_frames: Action token indexes that are clean conditioning.
        action_domain_id: Embodiment id selecting the per-domain action projections.
        vision_items: How many clips of `T / vision_items` latent frames the vision segment holds one after another
            (transfer: the control clips, then the target). Every item gets the same position ids, so a control
            frame sits exactly where its target frame does; frame indexes above count over all items.
    """

    text_ids: Sequence[int] | Tensor
    vision_shape: tuple[int, int, int]
    vision_condition_frames: tuple[int, ...] = ()
    fps: float | None = None
    sound_length: int = 0
    action_length: int = 0
    action_condition_frames: tuple[int, ...] = ()
    action_domain_id: int = 0
    vision_items: int = 1


def text_position_ids(num_tokens: int, enable_fps_modulation: bool) -> Tensor:
    """mRoPE ids of a text segment: `[3, L]`, all three axes 0..L-1."""
    dtype = torch.float32 if enable_fps_modulation else torch.long
    return torch.arange(num_tokens, dtype=dtype).unsqueeze(0).expand(3, -1)


def grid_position_ids(
    grid: tuple[int, int, int],
    temporal_offset: float,
    *,
    fps: float | None,
    base_fps: float,
    temporal_compression: int,
    base_temporal_compression: int | None = None,
    start_frame_offset: int = 0,
    reset_spatial_ids: bool = True,
) -> Tensor:
    """mRoPE ids `[3, T*H*W]` of a latent grid (vision patches, or `(T, 1, 1)` for sound and actions).

    With `fps`, the temporal id of frame `f` is `(f + start) / (fps / tcf) * (base_fps / base_tcf) + offset`:
    one unit is always 1/6 s at the defaults (24 fps, 4x), whatever the clip's frame rate. A single frame (an
    image) is never modulated. The float32 arithmetic follows the reference operation by operation so the ids
    are bitwise identical.
    """
    grid_t, grid_h, grid_w = grid
    if fps is not None and grid_t > 1:
        base_tcf = base_temporal_compression if base_temporal_compression is not None else temporal_compression
        tokens_per_second = fps / temporal_compression
        base_tokens_per_second = base_fps / base_tcf
        frames = torch.arange(grid_t, dtype=torch.float32)
        t_ids = (frames + start_frame_offset) / tokens_per_second * base_tokens_per_second + temporal_offset
    else:
        t_ids = (torch.arange(grid_t, dtype=torch.long) + int(temporal_offset) + start_frame_offset).float()
    t_ids = t_ids.view(-1, 1).expand(-1, grid_h * grid_w).flatten()
    h_ids = torch.arange(grid_h, dtype=torch.float32).view(1, -1, 1).expand(grid_t, -1, grid_w).flatten()
    w_ids = torch.arange(grid_w, dtype=torch.float32).view(1, 1, -1).expand(grid_t, grid_h, -1).flatten()
    if not reset_spatial_ids:
        h_ids = h_ids + int(temporal_offset)
        w_ids = w_ids + int(temporal_offset)
    return torch.stack([t_ids, h_ids, w_ids], dim=0)


def patchify(latent: Tensor, patch_size: int = 2) -> Tensor:
    """`[C, T, H, W]` -> `[T*h*w, p*p*C]` patches in (t, h, w) order; odd H/W are zero-padded up to p."""
    p = patch_size
    C, T, H, W = latent.shape
    latent = F.pad(latent, (0, -W % p, 0, -H % p))
    h, w = latent.shape[2] // p, latent.shape[3] // p
    latent = latent.reshape(C, T, h, p, w, p)
    return latent.permute(1, 2, 4, 3, 5, 0).reshape(T * h * w, p * p * C)  # [t h w (p q c)]


def unpatchify(patches: Tensor, shape: tuple[int, int, int, int], patch_size: int = 2) -> Tensor:
    """Inverse of `patchify` for a latent of `shape` `(C, T, H, W)`: `[T*h*w, p*p*C]` -> `[C, T, H, W]`."""
    p = patch_size
    C, T, H, W = shape
    h, w = -(-H // p), -(-W // p)
    patches = patches.reshape(T, h, w, p, p, C)
    return patches.permute(5, 0, 1, 3, 2, 4).reshape(C, T, h * p, w * p)[:, :, :H, :W]


def _cu_seqlens(lengths: list[int]) -> Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def _pad_index(lengths: list[int]) -> tuple[Tensor, int]:
    """Index of each packed token in a `[B * max_len]` padded buffer."""
    max_len = max(lengths)
    index = torch.cat([torch.arange(n) + b * max_len for b, n in enumerate(lengths)])
    return index, max_len


def _check_frames(name: str, frames: Sequence[int], length: int, sample: int) -> tuple[int, ...]:
    frames = tuple(int(f) for f in frames)
    bad = [f for f in frames if not 0 <= f < length]
    if bad:
        raise ValueError(f"samples[{sample}].{name}={list(frames)} has indexes outside [0, {length}): {bad}.")
    if len(set(frames)) != len(frames):
        raise ValueError(f"samples[{sample}].{name}={list(frames)} repeats an index.")
    return tuple(sorted(frames))


@dataclass
class Cosmos3Layout:
    """Packed two-stream layout of a batch (built by `Cosmos3Layout.build`, reused across denoising steps).

    All index tensors address the packed streams: `und_*` the text stream, everything else the gen stream.
    """

    samples: list[Cosmos3Sample]
    text_ids: Tensor  # [Nu] long
    text_lengths: list[int]
    gen_lengths: list[int]
    cu_seqlens_und: Tensor  # [B+1] int32
    cu_seqlens_gen: Tensor  # [B+1] int32
    und_position_ids: Tensor  # [3, Nu] float32
    gen_position_ids: Tensor  # [3, Ng] float32
    # vision: patch grids and where each sample's patches sit in the gen stream
    vision_grids: list[tuple[int, int, int]]  # (T, H/p, W/p) per sample
    vision_index: Tensor  # [Nv] gen-stream positions of all vision patches (sample-major)
    vision_noisy_index: Tensor  # [Nv_noisy] gen-stream positions of noisy vision patches
    vision_noisy_frames: list[list[int]]  # per sample: latent frames that are predicted
    sound_index: Tensor  # [Ns]
    sound_noisy_index: Tensor  # [Ns] every sound frame is noisy
    action_index: Tensor  # [Na]
    action_noisy_index: Tensor  # [Na_noisy]
    action_domain_ids: Tensor  # [Na] per action token
    action_noisy_domain_ids: Tensor  # [Na_noisy]
    action_noisy_tokens: list[list[int]]  # per sample: action tokens that are predicted
    # per gen token: which sample it belongs to, and whether it is noisy (gets a timestep and a prediction)
    gen_sample_ids: Tensor  # [Ng] long
    und_sample_ids: Tensor  # [Nu] long
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.samples)

    @classmethod
    def build(
        cls,
        samples: Sequence[Cosmos3Sample],
        config,
        *,
        temporal_compression: int = 4,
    ) -> Cosmos3Layout:
        """Lay out `samples` for a model with `config` (a `Cosmos3Transformer.config`).

        `temporal_compression` is the vision VAE's temporal factor (4 for the Wan 2.2 VAE); it sets the time
        unit of the fps-modulated position ids.
        """
        if isinstance(samples, Cosmos3Sample):
            samples = [samples]
        if not isinstance(samples, Sequence) or not samples:
            raise ValueError(f"`samples` must be a non-empty list of Cosmos3Sample, got {samples!r}.")
        p = config.latent_patch_size
        modulate = config.enable_fps_modulation
        text_ids, text_lengths, gen_lengths = [], [], []
        und_pos, gen_pos, vision_grids = [], [], []
        vision_index, vision_noisy, sound_index, action_index, action_noisy, action_domains = [], [], [], [], [], []
        vision_noisy_frames, action_noisy_tokens, action_noisy_domains = [], [], []
        gen_offset = 0
        checked: list[Cosmos3Sample] = []
        for b, s in enumerate(samples):
            if not isinstance(s, Cosmos3Sample):
                raise TypeError(f"samples[{b}] must be a Cosmos3Sample, got {type(s).__name__}.")
            ids = torch.as_tensor(s.text_ids)
            if ids.ndim != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(
                    f"samples[{b}].text_ids must be a non-empty 1-D sequence of ints, got shape {tuple(ids.shape)} "
                    f"dtype {ids.dtype}."
                )
            if int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size:
                raise ValueError(
                    f"samples[{b}].text_ids must lie in [0, vocab_size={config.vocab_size}), got range "
                    f"[{int(ids.min())}, {int(ids.max())}]."
                )
            if len(s.vision_shape) != 3 or any(int(n) != n or n < 1 for n in s.vision_shape):
                raise ValueError(f"samples[{b}].vision_shape must be 3 positive ints (T, H, W), got {s.vision_shape}.")
            if s.fps is not None and not (isinstance(s.fps, (int, float)) and math.isfinite(s.fps) and s.fps > 0):
                raise ValueError(f"samples[{b}].fps must be a positive number or None, got {s.fps!r}.")
            if s.sound_length < 0 or (s.sound_length and not config.sound_gen):
                raise ValueError(
                    f"samples[{b}].sound_length={s.sound_length} needs a model with sound_gen=True and a length >= 0."
                )
            if s.action_length < 0 or (s.action_length and not config.action_gen):
                raise ValueError(
                    f"samples[{b}].action_length={s.action_length} needs a model with action_gen=True and a "
                    "length >= 0."
                )
            if s.action_length and not 0 <= s.action_domain_id < config.num_embodiment_domains:
                raise ValueError(
                    f"samples[{b}].action_domain_id={s.action_domain_id} must be in "
                    f"[0, num_embodiment_domains={config.num_embodiment_domains})."
                )
            t, h, w = (int(n) for n in s.vision_shape)
            items = s.vision_items
            if isinstance(items, bool) or not isinstance(items, int) or items < 1 or t % items:
                raise ValueError(f"samples[{b}].vision_items={items!r} must be an int >= 1 dividing the "
                                 f"{t} latent frames.")
            vision_cond = _check_frames("vision_condition_frames", s.vision_condition_frames, t, b)
            action_cond = _check_frames("action_condition_frames", s.action_condition_frames, s.action_length, b)
            checked.append(s)

            L = ids.numel()
            text_ids.append(ids.long())
            text_lengths.append(L)
            und_pos.append(text_position_ids(L, modulate).float())
            # The generated modalities start after the text, past a fixed margin, all at the same time origin.
            media_offset = L + config.unified_3d_mrope_temporal_modality_margin
            fps = s.fps if modulate else None
            # every stream's ids share the time origin, the base rate and the spatial-id rule
            positions = functools.partial(grid_position_ids, temporal_offset=media_offset,
                                          base_fps=float(config.base_fps),
                                          reset_spatial_ids=config.unified_3d_mrope_reset_spatial_ids)
            grid = (t, -(-h // p), -(-w // p))
            vision_grids.append(grid)
            n_vision = grid[0] * grid[1] * grid[2]
            per_frame = grid[1] * grid[2]
            item_grid = (t // items, grid[1], grid[2])
            gen_pos.append(positions(item_grid, fps=fps, temporal_compression=temporal_compression).repeat(1, items))
            vision_index.append(torch.arange(n_vision) + gen_offset)
            noisy_frames = [f for f in range(t) if f not in vision_cond]
            vision_noisy_frames.append(noisy_frames)
            frame_starts = torch.tensor(noisy_frames, dtype=torch.long).view(-1, 1) * per_frame
            vision_noisy.append((frame_starts + torch.arange(per_frame)).flatten() + gen_offset)
            cursor = gen_offset + n_vision
            if s.sound_length:
                sound_fps = float(config.sound_latent_fps) if modulate else None
                gen_pos.append(positions((s.sound_length, 1, 1), fps=sound_fps, temporal_compression=1))
                sound_index.append(torch.arange(s.sound_length) + cursor)
                cursor += s.sound_length
            if s.action_length:
                # An action is the transition into frame f+1, hence the one-frame start offset.
                gen_pos.append(positions((s.action_length, 1, 1), fps=fps, temporal_compression=1,
                                         base_temporal_compression=temporal_compression, start_frame_offset=1))
                tokens = torch.arange(s.action_length) + cursor
                noisy_tokens = [i for i in range(s.action_length) if i not in action_cond]
                action_index.append(tokens)
                action_noisy.append(tokens[noisy_tokens])
                action_domains.append(torch.full((s.action_length,), s.action_domain_id, dtype=torch.long))
                action_noisy_domains.append(torch.full((len(noisy_tokens),), s.action_domain_id, dtype=torch.long))
                action_noisy_tokens.append(noisy_tokens)
                cursor += s.action_length
            else:
                action_noisy_tokens.append([])
            gen_lengths.append(cursor - gen_offset)
            gen_offset = cursor

        def cat(parts: list[Tensor]) -> Tensor:
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

        B = len(checked)
        return cls(
            samples=checked,
            text_ids=torch.cat(text_ids),
            text_lengths=text_lengths,
            gen_lengths=gen_lengths,
            cu_seqlens_und=_cu_seqlens(text_lengths),
            cu_seqlens_gen=_cu_seqlens(gen_lengths),
            und_position_ids=torch.cat(und_pos, dim=1),
            gen_position_ids=torch.cat(gen_pos, dim=1),
            vision_grids=vision_grids,
            vision_index=cat(vision_index),
            vision_noisy_index=cat(vision_noisy),
            vision_noisy_frames=vision_noisy_frames,
            sound_index=cat(sound_index),
            sound_noisy_index=cat(sound_index),
            action_index=cat(action_index),
            action_noisy_index=cat(action_noisy),
            action_domain_ids=cat(action_domains),
            action_noisy_domain_ids=cat(action_noisy_domains),
            action_noisy_tokens=action_noisy_tokens,
            gen_sample_ids=torch.repeat_interleave(torch.arange(B), torch.tensor(gen_lengths)),
            und_sample_ids=torch.repeat_interleave(torch.arange(B), torch.tensor(text_lengths)),
        )

    # ---------------------------------------------------------------------------------------------------------
    # Derived tensors, computed once per (layout, device) and cached: attention backends ask for what they need.
    # ---------------------------------------------------------------------------------------------------------

    def cached(self, key, device: torch.device, make):
        full_key = (key, str(device))
        if full_key not in self._cache:
            # A tensor made under inference_mode could never be used by autograd later (training on this layout).
            with torch.inference_mode(False):
                self._cache[full_key] = make()
        return self._cache[full_key]

    def to_device(self, name: str, device: torch.device) -> Tensor:
        """A layout tensor attribute on `device` (moved once, then cached)."""
        return self.cached(name, device, lambda: getattr(self, name).to(device))

    def padding(self, stream: str, device: torch.device) -> tuple[Tensor | None, int]:
        """`(index, max_len)` to scatter a packed stream into `[B, max_len]`; index is None when no padding."""
        lengths = self.text_lengths if stream == "und" else self.gen_lengths

        def make():
            if len(set(lengths)) == 1:
                return None, lengths[0]
            index, max_len = _pad_index(lengths)
            return index.to(device), max_len

        return self.cached(("pad", stream), device, make)

    def domain_groups(self, name: str, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """`(domain [1], rows [n])` on `device` for each embodiment domain in the layout's `name` ids
        (`action_domain_ids` or `action_noisy_domain_ids`): grouped here, on the host, once per layout, so that the
        action projections run without a device-to-host sync (and can be captured in a CUDA graph)."""

        def make():
            ids = getattr(self, name)
            return [(domain.view(1).to(device), (ids == domain).nonzero().squeeze(1).to(device))
                    for domain in ids.unique()]

        return self.cached(("domain_groups", name), device, make)

    def index_of(self, rows: list[int], device: torch.device) -> Tensor | slice:
        """`rows` as an index on `device`: a slice when consecutive, else a cached tensor (never a per-call
        host-to-device copy)."""
        if rows and rows == list(range(rows[0], rows[-1] + 1)):
            return slice(rows[0], rows[-1] + 1)
        return self.cached(("rows", tuple(rows)), device, lambda: torch.tensor(rows, dtype=torch.long, device=device))

    def joint_key_index(self, device: torch.device) -> Tensor:
        """Order of `cat([und_keys, gen_keys])` that puts each sample's `[und_b ‖ gen_b]` keys side by side."""

        def make():
            nu = sum(self.text_lengths)
            parts = []
            for b in range(self.batch_size):
                u0, u1 = int(self.cu_seqlens_und[b]), int(self.cu_seqlens_und[b + 1])
                g0, g1 = int(self.cu_seqlens_gen[b]), int(self.cu_seqlens_gen[b + 1])
                parts += [torch.arange(u0, u1), torch.arange(g0, g1) + nu]
            return torch.cat(parts).to(device)

        return self.cached("joint_key_index", device, make)
