"""Speed and memory switches for a built `Cosmos3Transformer`, applied from outside the model file.

* Regional compilation is diffusers' `model.compile_repeated_blocks()` (each decoder layer compiled once, the same
  code for every layer). The attention dispatch stays out of the graphs, so a new prompt length does not recompile.
* `CUDAGraphStep`: one denoising step (the generation tower over a fixed layout and text cache) captured as a CUDA
  graph and replayed, for the few-step and policy loops where kernel launches, not FLOPs, set the time.
* `offload_text_tower`: the understanding tower's weights live in (pinned) host memory and visit the GPU one module
  at a time while it runs. It runs once per request (its keys/values are cached for every step), so Nano's
  generation tower alone is resident during sampling.
* `quantize_fp8`: torchao float8 (dynamic activations, per-row weight scales) for the generation tower's linears.

Each returns or holds what undoes it; none changes the checkpoint or what `state_dict()` returns (for FP8, the
weights are torchao tensor subclasses until the model is reloaded).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor, nn

from .models.layout import Cosmos3Layout
from .models.transformer_cosmos3 import Cosmos3TextKVCache, Cosmos3Transformer

# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------------------------


class CUDAGraphStep:
    """`model(layout, vision, t, sound=..., action=..., text_kv_cache=cache)` captured once and replayed per step.

    Build it after `encode_text` for one request, then call it each step with that step's inputs (same shapes and
    dtypes as the examples given here); it copies them into static buffers, replays the graph and returns
    `(vision, sound, action)` as the model's `return_dict=False` output. The returned tensors are the graph's
    static outputs: the next call overwrites them, so use (or clone) them first.

    `capture=False` runs the same static-buffer path eagerly (the model is called each time); it is how the
    plumbing is tested without a GPU, and a fallback where capture is not possible.
    """

    def __init__(
        self,
        model: Cosmos3Transformer,
        layout: Cosmos3Layout,
        text_kv_cache: Cosmos3TextKVCache,
        vision: Tensor,
        sound: Tensor | None = None,
        action: Tensor | None = None,
        *,
        capture: bool = True,
        warmup: int = 2,
    ):
        if not isinstance(model, Cosmos3Transformer):
            raise TypeError(f"`model` must be a Cosmos3Transformer, got {type(model).__name__}.")
        if not isinstance(vision, Tensor) or vision.ndim != 5:
            raise ValueError(f"`vision` must be a [B, C, T, H, W] tensor, got {_describe(vision)}.")
        if capture and vision.device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need CUDA tensors; `vision` is on {vision.device}. Pass capture=False to run the same "
                "path eagerly."
            )
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"`warmup` must be an int >= 1 (the first call caches the layout's device tensors), "
                             f"got {warmup!r}.")
        self.model, self.layout, self.cache = model, layout, text_kv_cache
        self.vision = vision.clone()
        self.sound = None if sound is None else sound.clone()
        self.action = None if action is None else action.clone()
        self.timestep = torch.zeros(layout.batch_size, device=vision.device, dtype=torch.float32)
        self.graph = None
        if not capture:
            return
        # Warm up on a side stream (caches the layout's device tensors and rotary tables, picks kernels), then
        # capture; the graph owns its memory pool from then on.
        stream = torch.cuda.Stream(device=vision.device)
        stream.wait_stream(torch.cuda.current_stream(vision.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream(vision.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.outputs = self._run()

    def _run(self):
        return self.model(self.layout, self.vision, self.timestep, sound=self.sound, action=self.action,
                          text_kv_cache=self.cache, return_dict=False)

    def __call__(self, vision: Tensor, timestep: Tensor | float, sound: Tensor | None = None,
                 action: Tensor | None = None):
        for name, static, value in (("vision", self.vision, vision), ("sound", self.sound, sound),
                                    ("action", self.action, action)):
            if (static is None) != (value is None):
                raise ValueError(f"`{name}` must be {'None' if static is None else 'given'}, as when the step was "
                                 "captured.")
            if value is not None:
                if not isinstance(value, Tensor) or value.shape != static.shape:
                    raise ValueError(f"`{name}` must have the captured shape {tuple(static.shape)}, got "
                                     f"{_describe(value)}.")
                static.copy_(value)
        if isinstance(timestep, Tensor):
            self.timestep.copy_(timestep.to(torch.float32).expand_as(self.timestep))
        else:
            self.timestep.fill_(float(timestep))
        if self.graph is None:
            with torch.no_grad():
                return self._run()
        self.graph.replay()
        return self.outputs


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


# ---------------------------------------------------------------------------------------------------------------
# Offloading the understanding tower
# ---------------------------------------------------------------------------------------------------------------


def text_tower_modules(model: Cosmos3Transformer) -> list[nn.Module]:
    """The understanding tower's weight-bearing modules in execution order, then the final text norm and `lm_head`
    (used only to decode text). The token embedding stays: its device is where the text stream starts."""
    if not isinstance(model, Cosmos3Transformer):
        raise TypeError(f"`model` must be a Cosmos3Transformer, got {type(model).__name__}.")
    modules = []
    for layer in model.layers:
        attn = layer.self_attn
        candidates = [layer.input_layernorm, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k,
                      attn.k_norm_und_for_gen, attn.to_out, layer.post_attention_layernorm, layer.mlp]
        modules += [m for m in candidates if m is not None and any(True for _ in m.parameters())]
    modules += [model.norm, model.lm_head]
    return modules


class TextTowerOffload:
    """Keeps the understanding tower in host memory; each module's weights are copied to the execution device just
    before it runs and dropped after (the host copy is the master: inference only).

    Made by `offload_text_tower`; `remove()` puts every weight back on the execution device.
    """

    def __init__(self, model: Cosmos3Transformer, offload_device: str | torch.device = "cpu"):
        self.modules = text_tower_modules(model)
        self.device = model.embed_tokens.weight.device
        self.offload_device = torch.device(offload_device)
        if self.offload_device == self.device and self.device.type != "cpu":
            raise ValueError(f"`offload_device` ({self.offload_device}) is the model's device; offload to 'cpu'.")
        pin = self.offload_device.type == "cpu" and self.device.type == "cuda"
        offloaded = {id(sub) for m in self.modules for sub in m.modules()}
        # a weight shared with a module that stays (tied embeddings in a fine-tune) stays too
        staying = {id(t) for m in model.modules() if id(m) not in offloaded for t in _tensors(m, recurse=False)}
        self.modules = [m for m in self.modules if not any(id(t) in staying for t in _tensors(m))]
        self.host: dict[nn.Parameter | Tensor, Tensor] = {}
        for module in self.modules:
            for tensor in _tensors(module):
                host = tensor.detach().to(self.offload_device, copy=True)
                self.host[tensor] = host.pin_memory() if pin else host
                tensor.data = self.host[tensor]
        self.handles = []
        for module in self.modules:
            self.handles.append(module.register_forward_pre_hook(self._onload))
            self.handles.append(module.register_forward_hook(self._offload))

    def _onload(self, module, args):
        for tensor in _tensors(module):
            # copy=True: a distinct device copy even when both devices are the CPU, so the host master is never
            # what the module computes with
            tensor.data = self.host[tensor].to(self.device, non_blocking=True, copy=True)

    def _offload(self, module, args, output):
        for tensor in _tensors(module):
            tensor.data = self.host[tensor]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for tensor, host in self.host.items():
            tensor.data = host.to(self.device)
        self.handles, self.host = [], {}


def _tensors(module: nn.Module, recurse: bool = True) -> list[Tensor]:
    return list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse))


def offload_text_tower(model: Cosmos3Transformer, offload_device: str | torch.device = "cpu") -> TextTowerOffload:
    """Move the understanding tower to `offload_device` and stream it back module by module when it runs.

    With a text K/V cache (every pipeline builds one per request), sampling never touches the tower, so for
    Cosmos3-Nano the GPU holds the generation tower, the embeddings and the cache. Call `.remove()` on the result
    to undo. For inference: the host copies are the weights, gradients do not reach them.
    """
    return TextTowerOffload(model, offload_device)


# ---------------------------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------------------------

GEN_LINEAR_PARTS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "mlp_moe_gen.")


def fp8_linear_names(model: Cosmos3Transformer) -> list[str]:
    """Names of the linears `quantize_fp8` converts: the generation tower's projections and MLPs (where nearly all
    sampling FLOPs are), with both sides divisible by 16 as float8 GEMMs require. Heads, embeddings, the timestep
    MLP and the text tower (run once per request) stay in their dtype."""
    if not isinstance(model, Cosmos3Transformer):
        raise TypeError(f"`model` must be a Cosmos3Transformer, got {type(model).__name__}.")
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("layers.")
            and any(part in name for part in GEN_LINEAR_PARTS)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0]


def quantize_fp8(model: Cosmos3Transformer) -> Cosmos3Transformer:
    """Float8 dynamic-activation, float8 per-row-weight linears (torchao) for the generation tower, in place.

    Needs a CUDA GPU with float8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell), bfloat16
    weights and the `torchao` package (`pip install cosmos3[fp8]`). Compile afterwards
    (`model.compile_repeated_blocks()`) to fuse the activation quantization.
    """
    names = set(fp8_linear_names(model))
    device = model.proj_in.weight.device
    if device.type != "cuda":
        raise ValueError(f"FP8 needs the model on a CUDA GPU; it is on {device}.")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"FP8 needs compute capability >= 8.9 (Ada/Hopper); this GPU has {capability}.")
    if model.dtype != torch.bfloat16:
        raise ValueError(f"FP8 quantization expects bfloat16 weights, the model has {model.dtype}; load it with "
                         "torch_dtype=torch.bfloat16.")
    if importlib.util.find_spec("torchao") is None:
        raise ImportError("quantize_fp8 needs torchao: pip install 'cosmos3[fp8]' (or torchao).")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantize_(model, config, filter_fn=lambda module, name: name in names)
    return model
