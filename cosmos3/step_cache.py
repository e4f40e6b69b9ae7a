"""Step caches for `Cosmos3Transformer`: diffusers' SeaCache and FirstBlockCache, applied from outside the model file.

`model.enable_cache(SeaCacheConfig(...))`, `model.enable_cache(FirstBlockCacheConfig(...))` and `model.disable_cache()`
take diffusers' own config classes (importing this module installs them on `Cosmos3Transformer`; `cosmos3` does on
import). A pipeline turns a cache on with `pipe.enable_step_cache("fast" | "balanced" | "quality" | config)`, which
also gives each step the scheduler coordinates the caches need (`cache_context(name, step_index=, sigma=,
num_inference_steps=)`, as the reference `Cosmos3OmniPipeline` enters per forward).

* **SeaCache** (diffusers/hooks/sea_cache.py, its Cosmos 3 adapter): the same SEA indicator (the spectrally filtered
  current latents of a sample with noisy frames), the same accumulated relative-L1 gate with `retention_steps`,
  `cache_end_steps` and `max_consecutive_cached`, and the same boundary: the whole generation-tower layer stack
  with its final norm is replaced by `input + residual`, the residual extrapolated linearly from the last two full
  steps (`residual_order=1`). For one sample it takes the reference's decisions at the reference's steps.
* **FirstBlockCache** (diffusers/hooks/first_block_cache.py): the first layer always runs; when its residual moved
  less than `threshold` (relative mean absolute change) since the last full step, the other layers are replaced by
  their residual of that step. diffusers' own hook cannot run on the reference Cosmos 3 transformer (its layer has
  no `hidden_states` argument), so this one follows the algorithm, not a reference run.

Per-sample decisions: our step runs the guided batch `[samples..., negatives...]` (transfer: every guidance branch)
in one forward; every row of that batch keeps its own trajectory (the reference's "cond" and "uncond" contexts decide
separately), so a batch makes the decisions each of its samples would make alone. The layers run on the rows that
compute and only on them: a partial step cuts the packed streams, the text K/V and the rotary tables to those
samples (a layout of their own, built once per request and pattern of decisions) and puts the reusing rows' `input +
residual` back at the boundary. With every row reusing, the layers do not run at all.

Inference only: with autograd enabled, without a cache context, or without the step coordinates, the model runs in
full (warned once), as diffusers' SeaCache does. Composes with the text K/V cache (cut per partial step, never
recomputed) and with regional compilation (`compile_repeated_blocks`: the decisions are graph breaks, a partial
batch is one more shape). A captured CUDA graph replays one fixed computation, so it cannot skip per step:
`enable_cuda_graphs(capture=True)` with a step cache is refused; `capture=False` works. Distilled (few-step)
checkpoints refuse caching: each of their steps is a large jump, not a near-repeat.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
from dataclasses import dataclass, field

import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, ModelHook, SeaCacheConfig
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.hooks.sea_cache import (
    SeaCacheContextState,
    SeaCacheSharedState,
    _apply_sea_filter,
    _SeaCacheForwardMetadata,
)
from diffusers.models.cache_utils import CacheMixin
from torch import Tensor

from .models.layout import Cosmos3Layout
from .models.transformer_cosmos3 import Cosmos3Transformer

logger = logging.getLogger(__name__)

_ROOT_HOOK = "cosmos3_step_cache_root"
_LEADER_HOOK = "cosmos3_step_cache_leader"
_BLOCK_HOOK = "cosmos3_step_cache_block"
_NORM_HOOK = "cosmos3_step_cache_norm"
_HOOKS = (_NORM_HOOK, _BLOCK_HOOK, _LEADER_HOOK, _ROOT_HOOK)
CONFIG_TYPES = (SeaCacheConfig, FirstBlockCacheConfig)


def step_cache_presets() -> dict[str, SeaCacheConfig]:
    """The named SeaCache settings of `pipe.enable_step_cache` (fresh objects: configs are mutable).

    `balanced` is diffusers' default. `quality` halves the change budget; `fast` doubles it and allows three reuses
    in a row. The measured speed and error of each are in benchmarks/step_cache.py.
    """
    return {
        "quality": SeaCacheConfig(threshold=0.12, max_consecutive_cached=1),
        "balanced": SeaCacheConfig(),
        "fast": SeaCacheConfig(threshold=0.5, max_consecutive_cached=3),
    }


def resolve_config(config) -> SeaCacheConfig | FirstBlockCacheConfig:
    """A preset name or a config object -> the config object, or a ValueError naming the valid choices."""
    if isinstance(config, str):
        presets = step_cache_presets()
        if config not in presets:
            raise ValueError(f"Unknown step cache preset {config!r}; valid: {sorted(presets)} or a SeaCacheConfig / "
                             "FirstBlockCacheConfig.")
        return presets[config]
    if not isinstance(config, CONFIG_TYPES):
        raise TypeError(f"`config` must be one of {sorted(step_cache_presets())}, a SeaCacheConfig or a "
                        f"FirstBlockCacheConfig, got {type(config).__name__}.")
    return config


# ---------------------------------------------------------------------------------------------------------------
# State: one trajectory per batch row, one scratch record per forward
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Subset:
    """The samples that run the layers in a partial step, as a batch of their own: their layout, their rows in the
    packed streams, and the step-invariant layer inputs cut to them (rotary tables, each layer's text K/V). Built
    once per request and pattern of decisions."""

    keep: tuple[int, ...]
    layout: Cosmos3Layout
    gen_index: Tensor
    und_index: Tensor
    rope: tuple | None = None  # (the full batch's rope it was cut from, the cut)
    text_kv: dict[int, tuple] = field(default_factory=dict)  # layer -> (the full batch's keys, the cut (keys, values))


@dataclass
class _Forward:
    """What one model call decided, from the root hook to the final norm."""

    layout: Cosmos3Layout
    metadata: _SeaCacheForwardMetadata | None  # SeaCache: the step coordinates
    step_index: int | None
    vision: list[Tensor]
    bounds: list[tuple[int, int]]  # rows of each sample in the packed gen stream
    compute: list[bool] = field(default_factory=list)  # per sample: its layers run
    reuse: list[Tensor | None] = field(default_factory=list)  # per sample: the residual it takes instead
    gen_in: Tensor | None = None  # the stream entering the cached span
    head_out: Tensor | None = None  # FirstBlockCache: the first layer's output
    skip_all: bool = False
    out: Tensor | None = None  # with skip_all: what the final norm returns (SeaCache)
    subset: _Subset | None = None  # when only some samples compute
    narrowed: bool = False  # the streams between the layers hold only `subset`'s rows


class _FirstBlockRow:
    def __init__(self):
        self.head_residual: Tensor | None = None
        self.tail_residual: Tensor | None = None


class _StepCacheState(BaseState):
    """Per cache context: each batch row's trajectory (a `SeaCacheContextState` or a `_FirstBlockRow`) and the
    request's partial batches."""

    def __init__(self):
        self.rows: dict[int, object] = {}
        self.subsets: dict[tuple[int, ...], _Subset] = {}
        self.layout: Cosmos3Layout | None = None
        self.forward: _Forward | None = None

    def reset(self):
        self.rows, self.subsets, self.layout, self.forward = {}, {}, None, None


def _sample_bounds(layout: Cosmos3Layout) -> list[tuple[int, int]]:
    starts = [0, *itertools.accumulate(layout.gen_lengths)]
    return list(zip(starts[:-1], starts[1:]))


def _rows(x: Tensor, bounds: tuple[int, int]) -> Tensor:
    return x[bounds[0] : bounds[1]]


def _stream_index(lengths: list[int], keep: tuple[int, ...]) -> Tensor:
    starts = [0, *itertools.accumulate(lengths)]
    return torch.cat([torch.arange(starts[b], starts[b + 1]) for b in keep])


def _subset(state: _StepCacheState, forward: _Forward, model_config, device: torch.device) -> _Subset:
    keep = tuple(b for b, compute in enumerate(forward.compute) if compute)
    if keep not in state.subsets:
        full = forward.layout
        layout = Cosmos3Layout.build([full.samples[b] for b in keep], model_config)
        und_index, gen_index = _stream_index(full.text_lengths, keep), _stream_index(full.gen_lengths, keep)
        # position ids depend on the VAE's temporal factor, which a layout does not keep: the full batch's are right
        layout.und_position_ids = full.und_position_ids[:, und_index]
        layout.gen_position_ids = full.gen_position_ids[:, gen_index]
        state.subsets[keep] = _Subset(keep, layout, gen_index.to(device), und_index.to(device))
    return state.subsets[keep]


@torch.compiler.disable
def _narrow(state: _StepCacheState, forward: _Forward, model_config, index: int, und, gen, text_kv, rope):
    """Layer `index`'s arguments for the computing samples alone: the streams cut once (at the first layer that
    narrows), the text K/V and rotary tables cut once per request."""
    if forward.subset is None:
        forward.subset = _subset(state, forward, model_config, gen.device)
    subset = forward.subset
    if not forward.narrowed:
        gen = gen.index_select(0, subset.gen_index)
        und = None if und is None else und.index_select(0, subset.und_index)
        forward.narrowed = True
    if text_kv is not None:
        kept = subset.text_kv.get(index)
        if kept is None or kept[0] is not text_kv[0]:
            kept = (text_kv[0], tuple(x.index_select(0, subset.und_index) for x in text_kv))
            subset.text_kv[index] = kept
        text_kv = kept[1]
    if subset.rope is None or any(a is not b for a, b in zip(subset.rope[0], rope)):
        und_rope, gen_rope = rope
        cut = (None if und_rope is None else tuple(x.index_select(0, subset.und_index) for x in und_rope),
               tuple(x.index_select(0, subset.gen_index) for x in gen_rope))
        subset.rope = (rope, cut)
    return und, gen, text_kv, subset.rope[1], subset.layout


def _computed(forward: _Forward, out: Tensor) -> dict[int, Tensor]:
    """Each computing sample's rows of `out` (the full stream, or the subset's once narrowed)."""
    if forward.narrowed:
        return dict(zip(forward.subset.keep, (_rows(out, r) for r in _sample_bounds(forward.subset.layout))))
    return {b: _rows(out, r) for b, r in enumerate(forward.bounds) if forward.compute[b]}


# ---------------------------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------------------------


class _RootHook(ModelHook):
    """Reads the call (layout, latents) and the cache context's step coordinates before the forward runs."""

    _is_stateful = True

    def __init__(self, config, state_manager: StateManager, shared: SeaCacheSharedState):
        super().__init__()
        self.config, self.state_manager, self.shared = config, state_manager, shared
        self._signature = inspect.signature(Cosmos3Transformer.forward)
        self.decisions: list[tuple[int | None, tuple[bool, ...]]] = []  # this request's, see `step_cache_decisions`

    def pre_forward(self, module, *args, **kwargs):
        if self.state_manager._context is not None:
            self.state_manager.get_state().forward = None
        forward = self._forward(module, args, kwargs)
        if forward is not None:
            state = self.state_manager.get_state()
            if state.layout is not forward.layout or forward.step_index == 0:
                # a new request (or a new trajectory of the same one)
                state.rows, state.subsets = {}, {}
                state.layout = forward.layout
                self.decisions = []
            state.forward = forward
        return args, kwargs

    def _forward(self, module, args, kwargs) -> _Forward | None:
        if torch.is_grad_enabled():
            self.shared.warn_once("Step caching is inference-only; calls with autograd enabled run in full.")
            return None
        context = self.state_manager._context
        if context is None:
            self.shared.warn_once(
                "Step caching needs a cache context per call: in a cosmos3 pipeline use `pipe.enable_step_cache("
                "config)` (after `enable_cuda_graphs`), in a loop of your own enter `transformer.cache_context(name, "
                "step_index=..., sigma=..., num_inference_steps=...)`; running in full.")
            return None
        call = self._signature.bind(module, *args, **kwargs).arguments
        layout, vision = call["layout"], call["vision"]
        vision = list(vision.unbind(0)) if isinstance(vision, Tensor) else list(vision)
        metadata = None
        if isinstance(self.config, SeaCacheConfig):
            metadata = _step_metadata(context)
            if metadata is None:
                self.shared.warn_once(
                    "SeaCache needs the scheduler step, sigma and step count: pass them as `cache_context(name, "
                    "step_index=..., sigma=..., num_inference_steps=...)`; running in full.")
                return None
        step = context.step_index.item() if isinstance(context.step_index, Tensor) else context.step_index
        return _Forward(layout=layout, metadata=metadata, step_index=step, vision=vision,
                        bounds=_sample_bounds(layout))

    def post_forward(self, module, output):
        if self.state_manager._context is not None:
            forward = self.state_manager.get_state().forward
            if forward is not None and forward.compute:
                self.decisions.append((forward.step_index, tuple(forward.compute)))
            self.state_manager.get_state().forward = None
        return output

    def reset_state(self, module):
        self.state_manager.reset()
        return module


def _step_metadata(context) -> _SeaCacheForwardMetadata | None:
    values = [context.step_index, context.sigma, context.num_inference_steps]
    if any(v is None for v in values):
        return None
    step, sigma, count = (v.item() if isinstance(v, Tensor) else v for v in values)
    step, sigma, count = int(step), float(sigma), int(count)
    if not (0 <= step < count and 0.0 <= sigma <= 1.0):
        return None
    return _SeaCacheForwardMetadata(step_index=step, sigma=sigma, num_inference_steps=count)


class _LayerHook(ModelHook):
    """What the layer hooks share: the current call's record, and how a partial step narrows a layer's inputs."""

    def __init__(self, config, state_manager: StateManager, model_config, index: int):
        super().__init__()
        self.config, self.state_manager, self.model_config, self.index = config, state_manager, model_config, index

    @torch.compiler.disable
    def _active(self, gen, layout) -> _Forward | None:
        if self.state_manager._context is None:
            return None
        forward = self.state_manager.get_state().forward
        # the text tower alone (gen None) or another layout than the call's: not a step of this trajectory
        return None if forward is None or gen is None or layout is not forward.layout else forward

    def _narrow(self, forward, und, gen, text_kv, rope):
        return _narrow(self.state_manager.get_state(), forward, self.model_config, self.index, und, gen, text_kv,
                       rope)


class _LeaderHook(_LayerHook):
    """On the first layer: each sample's decision, then the layer, on the samples that compute (FirstBlockCache:
    on all of them, its decision needs this layer's output)."""

    def __init__(self, config, state_manager: StateManager, shared: SeaCacheSharedState, model_config):
        super().__init__(config, state_manager, model_config, 0)
        self.shared = shared

    def new_forward(self, module, und, gen, text_kv, rope, layout, backend):
        forward = self._active(gen, layout)
        if forward is None:
            return self.fn_ref.original_forward(und, gen, text_kv, rope, layout, backend)
        if isinstance(self.config, SeaCacheConfig):
            if not self._sea_decisions(forward, gen):
                return und, gen, text_kv
            if not all(forward.compute):
                und, gen, text_kv, rope, layout = self._narrow(forward, und, gen, text_kv, rope)
            return self.fn_ref.original_forward(und, gen, text_kv, rope, layout, backend)
        und, out, text_kv = self.fn_ref.original_forward(und, gen, text_kv, rope, layout, backend)
        return und, self._first_block_decisions(forward, gen, out), text_kv

    @torch.compiler.disable
    def _sea_decisions(self, forward: _Forward, gen: Tensor) -> bool:
        """Decide each sample; False when none computes (the final norm then returns `forward.out`)."""
        state = self.state_manager.get_state()
        forward.gen_in = gen
        for b, bounds in enumerate(forward.bounds):
            row = state.rows.setdefault(b, SeaCacheContextState())
            residual = self._sea_decision(row, forward, b, _rows(gen, bounds))
            forward.compute.append(residual is None)
            forward.reuse.append(residual)
        if any(forward.compute):
            return True
        forward.skip_all = True
        forward.out = torch.cat([_rows(gen, bounds) + r for bounds, r in zip(forward.bounds, forward.reuse)])
        return False

    @torch.compiler.disable
    def _first_block_decisions(self, forward: _Forward, gen: Tensor, out: Tensor) -> Tensor:
        """Decide each sample from the first layer's residual; with none computing, the stack's output at once."""
        state = self.state_manager.get_state()
        forward.head_out = out
        for b, bounds in enumerate(forward.bounds):
            row = state.rows.setdefault(b, _FirstBlockRow())
            residual = _rows(out, bounds) - _rows(gen, bounds)
            compute = _first_block_changed(row, residual, self.config.threshold)
            if compute:
                row.head_residual = residual
            forward.compute.append(compute)
            forward.reuse.append(None if compute else row.tail_residual)
        if any(forward.compute):
            return out
        forward.skip_all = True
        return torch.cat([_rows(out, bounds) + r for bounds, r in zip(forward.bounds, forward.reuse)])

    def _sea_decision(self, row: SeaCacheContextState, forward: _Forward, b: int, gen: Tensor) -> Tensor | None:
        """The residual sample `b` reuses this step, or None when its layers must run (diffusers'
        `SeaCacheRootHook.prepare_decoder_stack`, for one sample)."""
        metadata, config = forward.metadata, self.config
        latents = _output_latents(forward.vision[b], forward.layout, b)
        row.cacheable = bool(latents)
        if not row.cacheable:  # nothing generated in the vision stream: always run (the reference fails open)
            return None
        indicator = [_apply_sea_filter(x.movedim(0, -1), sigma=metadata.sigma, power_exp=config.power_exp).detach()
                     for x in latents]
        gate_compute = self.shared.resolve_gate(row, metadata, indicator, config)
        if gate_compute:
            return None
        if not row.history:
            row.accumulated_distance, row.gate_should_compute = 0.0, True
            return None
        history = row.history[-(config.residual_order + 1) :]
        if any(r.shape != gen.shape or r.dtype != gen.dtype or r.device != gen.device for _, _, r in history):
            row.history = []
            row.accumulated_distance, row.gate_should_compute = 0.0, True
            return None
        residual = history[-1][2]
        if config.residual_order == 1 and len(history) >= 2:
            (previous_step, _, previous), (latest_step, _, latest) = history[-2], history[-1]
            if latest_step != previous_step:
                scale = (metadata.step_index - latest_step) / (latest_step - previous_step)
                residual = latest + (latest - previous) * scale
        row.consecutive_cached += 1
        return residual


def _output_latents(vision: Tensor, layout: Cosmos3Layout, b: int) -> list[Tensor]:
    """The reference adapter's raw vision of sample `b`: each vision item `[C, T_item, H, W]` that has noisy frames,
    whole (its clean conditioning frames stay in the indicator); items that are all clean (separate hints) are left
    out."""
    items = layout.samples[b].vision_items
    length = vision.shape[1] // items
    noisy = set(layout.vision_noisy_frames[b])
    return [vision[:, k * length : (k + 1) * length] for k in range(items)
            if noisy.intersection(range(k * length, (k + 1) * length))]


def _first_block_changed(row: _FirstBlockRow, residual: Tensor, threshold: float) -> bool:
    """diffusers' `FBCHeadBlockHook._should_compute_remaining_blocks`, for one sample."""
    if row.head_residual is None or row.tail_residual is None or row.head_residual.shape != residual.shape:
        return True
    change = (residual - row.head_residual).abs().mean() / row.head_residual.abs().mean()
    return change.item() > threshold


class _BlockHook(_LayerHook):
    """On the other layers: passed through when no sample computes, run on the computing samples' rows otherwise;
    FirstBlockCache's last layer records their residuals and puts the reused ones in place."""

    def __init__(self, config, state_manager: StateManager, model_config, index: int, is_tail: bool):
        super().__init__(config, state_manager, model_config, index)
        self.is_tail = is_tail

    def new_forward(self, module, und, gen, text_kv, rope, layout, backend):
        forward = self._active(gen, layout)
        if forward is None or not forward.compute:
            return self.fn_ref.original_forward(und, gen, text_kv, rope, layout, backend)
        if forward.skip_all:
            return und, gen, text_kv
        if not all(forward.compute):
            und, gen, text_kv, rope, layout = self._narrow(forward, und, gen, text_kv, rope)
        output = self.fn_ref.original_forward(und, gen, text_kv, rope, layout, backend)
        if self.is_tail and forward.head_out is not None:
            return self._merge(forward, output)
        return output

    @torch.compiler.disable
    def _merge(self, forward: _Forward, output):
        """FirstBlockCache: the rest of the stack's residual per computing sample (from the first layer's output),
        and the full stream."""
        und, out, text_kv = output
        state, computed, pieces = self.state_manager.get_state(), _computed(forward, out), []
        for b, bounds in enumerate(forward.bounds):
            head = _rows(forward.head_out, bounds)
            if forward.compute[b]:
                state.rows[b].tail_residual = (computed[b] - head).detach()
                pieces.append(computed[b])
            else:
                pieces.append(head + forward.reuse[b])
        return und, out if all(forward.compute) else torch.cat(pieces), text_kv


class _NormHook(ModelHook):
    """On the generation tower's final norm, SeaCache's boundary: records each computing sample's residual and puts
    the reused ones in place (the stream in is the computing samples' rows alone in a partial step)."""

    def __init__(self, config, state_manager: StateManager):
        super().__init__()
        self.config, self.state_manager = config, state_manager

    @torch.compiler.disable
    def new_forward(self, module, hidden):
        forward = None if self.state_manager._context is None else self.state_manager.get_state().forward
        if forward is None or not forward.compute:
            return self.fn_ref.original_forward(hidden)
        if forward.skip_all:
            return forward.out
        out = self.fn_ref.original_forward(hidden)
        state, computed, pieces = self.state_manager.get_state(), _computed(forward, out), []
        for b, bounds in enumerate(forward.bounds):
            row = state.rows[b]
            if forward.compute[b]:
                row.consecutive_cached = 0
                if row.cacheable:
                    residual = (computed[b] - _rows(forward.gen_in, bounds)).detach()
                    row.history = [*row.history, (forward.metadata.step_index, None, residual)]
                    row.history = row.history[-(self.config.residual_order + 1) :]
                pieces.append(computed[b])
            else:
                pieces.append(_rows(forward.gen_in, bounds) + forward.reuse[b])
        return out if all(forward.compute) else torch.cat(pieces)


# ---------------------------------------------------------------------------------------------------------------
# enable_cache / disable_cache for Cosmos3Transformer
# ---------------------------------------------------------------------------------------------------------------


def apply_step_cache(model: Cosmos3Transformer, config) -> None:
    """Install SeaCache or FirstBlockCache on `model` (what `model.enable_cache(config)` does)."""
    if not isinstance(model, Cosmos3Transformer):
        raise TypeError(f"`model` must be a Cosmos3Transformer, got {type(model).__name__}.")
    if isinstance(config, FirstBlockCacheConfig) and len(model.layers) < 2:
        raise ValueError(f"FirstBlockCache needs at least 2 layers (a first and the rest), the model has "
                         f"{len(model.layers)}.")
    state_manager = StateManager(_StepCacheState)
    shared = SeaCacheSharedState()
    registrations = []

    def register(module, hook, name):
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, name)
        registrations.append((registry, name))

    try:
        register(model, _RootHook(config, state_manager, shared), _ROOT_HOOK)
        register(model.layers[0], _LeaderHook(config, state_manager, shared, model.config), _LEADER_HOOK)
        for i, layer in enumerate(model.layers[1:], start=1):
            register(layer, _BlockHook(config, state_manager, model.config, i, is_tail=i == len(model.layers) - 1),
                     _BLOCK_HOOK)
        if isinstance(config, SeaCacheConfig):
            register(model.norm_moe_gen, _NormHook(config, state_manager), _NORM_HOOK)
    except Exception:
        for registry, name in reversed(registrations):
            registry.remove_hook(name, recurse=False)
        raise
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()


def step_cache_decisions(model: Cosmos3Transformer) -> list[tuple[int | None, tuple[bool, ...]]]:
    """The current (or last) request's decisions: per model call, its step index and, per batch row, whether the
    row's layers ran (True) or it reused its residual (False)."""
    hook = HookRegistry.check_if_exists_or_initialize(model).get_hook(_ROOT_HOOK)
    if hook is None:
        raise ValueError("No step cache is enabled on this model (`enable_cache(SeaCacheConfig())` or "
                         "`pipe.enable_step_cache(...)`).")
    return list(hook.decisions)


def _enable_cache(self: Cosmos3Transformer, config) -> None:
    """Enable SeaCache (`SeaCacheConfig`) or FirstBlockCache (`FirstBlockCacheConfig`) on this model; see
    cosmos3/step_cache.py. Other diffusers caches hook block classes diffusers knows, which ours are not."""
    if self.is_cache_enabled:
        raise ValueError(f"Caching is already enabled with {type(self._cache_config).__name__}; call "
                         "`disable_cache()` first.")
    if not isinstance(config, CONFIG_TYPES):
        raise ValueError(f"Cosmos3Transformer supports SeaCacheConfig and FirstBlockCacheConfig, got "
                         f"{type(config).__name__}.")
    apply_step_cache(self, config)
    self._cache_config = config


def _disable_cache(self: Cosmos3Transformer) -> None:
    """Remove the cache `enable_cache` installed (a warning when none is)."""
    if self._cache_config is None:
        logger.warning("Caching is not enabled on this Cosmos3Transformer; nothing to disable.")
        return
    registry = HookRegistry.check_if_exists_or_initialize(self)
    for name in _HOOKS:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
    self._cache_config = None


# Installed on the class from here so the model file holds no caching code; `CacheMixin.enable_cache` would
# dispatch to diffusers' hooks, which need diffusers' block classes. `cache_context` stays CacheMixin's.
assert issubclass(Cosmos3Transformer, CacheMixin)
Cosmos3Transformer.enable_cache = _enable_cache
Cosmos3Transformer.disable_cache = _disable_cache


# ---------------------------------------------------------------------------------------------------------------
# The pipeline's side: each step inside a cache context with its scheduler coordinates
# ---------------------------------------------------------------------------------------------------------------

CONTEXT_NAME = "cosmos3_step"


def _check_pipeline(pipe, inner) -> None:
    if getattr(pipe, "_graph_capture", False) and inner is type(pipe).graph_model_step:
        raise ValueError("Step caching cannot run inside a captured CUDA graph (a graph replays one fixed "
                         "computation; the cache skips layers per step). Use enable_cuda_graphs(capture=False), "
                         "or turn caching off with pipe.enable_step_cache(None) / pipe.transformer.disable_cache().")
    if pipe.config.distilled_sigmas:
        # a student's every step is a large jump along its fixed schedule, often with fresh noise: a reused step
        # drops a quarter of its denoising, where a teacher's 35 steps lose a near-repeat
        raise ValueError(f"Step caching is off for distilled checkpoints (this one has a fixed "
                         f"{len(pipe.config.distilled_sigmas)}-step schedule); turn it off with "
                         "pipe.enable_step_cache(None) / pipe.transformer.disable_cache().")


def _step_attribute(pipe) -> str:
    # transfer runs its own loop over a batch of guidance branches, its model steps made by `branch_step_factory`
    return "branch_step_factory" if hasattr(type(pipe), "branch_step_factory") else "model_step_factory"


def cached_step_factory(inner, own_schedule: bool = False):
    """A step factory (`model_step_factory`, or transfer's `branch_step_factory` with `own_schedule`) that runs
    `inner`'s steps (eager or graph, None: eager) inside the transformer's cache context, with the step index and
    sigma of the step's timestep: looked up in `pipe.scheduler` at call time, or (`own_schedule`: transfer steps
    copies of it, one per sample and window) in a copy set for `pipe.num_timesteps` steps when the factory runs."""

    def factory(pipe, layout, inputs):
        _check_pipeline(pipe, inner)
        step = (inner or type(pipe).eager_model_step)(pipe, layout, inputs)
        scheduler = pipe.scheduler
        if own_schedule:
            scheduler = copy.deepcopy(pipe.scheduler)
            scheduler.set_timesteps(pipe.num_timesteps, device=pipe._execution_device)

        def cached_step(vision, t, sound, action):
            timesteps = scheduler.timesteps
            where = torch.nonzero(timesteps == t.to(timesteps.device)).flatten()
            if where.numel() != 1:
                raise RuntimeError(f"Step caching could not place timestep {t.item()} in the schedule "
                                   f"{timesteps.tolist()}.")
            i = int(where[0])
            sigma = float(scheduler.sigmas[i])
            with pipe.transformer.cache_context(CONTEXT_NAME, step_index=i, sigma=sigma,
                                                num_inference_steps=len(timesteps)):
                return step(vision, t, sound, action)

        return step if not pipe.transformer.is_cache_enabled else cached_step

    factory.inner = inner
    factory.is_step_cache = True
    return factory


def enable_pipeline_step_cache(pipe, config) -> None:
    """`pipe.enable_step_cache(config)`: a preset name, a SeaCacheConfig or FirstBlockCacheConfig, or None to turn
    caching off."""
    attribute = _step_attribute(pipe)
    factory = getattr(pipe, attribute)
    inner = factory.inner if getattr(factory, "is_step_cache", False) else factory
    if pipe.transformer.is_cache_enabled:
        pipe.transformer.disable_cache()
    if config is None:
        setattr(pipe, attribute, inner)
        return
    config = resolve_config(config)
    _check_pipeline(pipe, inner)
    pipe.transformer.enable_cache(config)
    setattr(pipe, attribute, cached_step_factory(inner, own_schedule=attribute == "branch_step_factory"))
