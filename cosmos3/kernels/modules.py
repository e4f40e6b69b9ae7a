"""Fused drop-ins for the transformer's modules, swapped in from outside the model file.

`apply_fused_kernels(model)` re-classes each `Cosmos3RMSNorm`, `Cosmos3NemotronRMSNorm`, `Cosmos3MLP`,
`Cosmos3Attention` and `Cosmos3TimestepEmbedding` in place to a subclass whose forward calls the kernels;
parameters, buffers, hooks and the state dict are untouched, and `remove_fused_kernels` restores the eager classes.
Nothing global changes: other models, and the model file's own functions, stay eager.

The kernels are forward-only, so under autograd (grad enabled and a tensor requiring grad) and for dtypes they do
not take (float64) the fused modules run the eager code; without Triton, or on CPU with the interpreter off, the
kernel wrappers do. Edge's relu² MLP stays eager (only the SiLU gate is fused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.transformer_cosmos3 import (
    Cosmos3Attention,
    Cosmos3MLP,
    Cosmos3NemotronRMSNorm,
    Cosmos3RMSNorm,
    Cosmos3TimestepEmbedding,
    apply_rope,
)
from ._triton import SUPPORTED_DTYPES
from .glu import silu_glu
from .norm_rope import rms_norm, rms_norm_rope
from .timestep import add_timestep_embedding


def _fusable(*tensors: Tensor) -> bool:
    """Whether the forward-only kernels may take these tensors (else the eager code runs)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    device = tensors[0].device
    return all(t.dtype in SUPPORTED_DTYPES and t.device == device for t in tensors)


def _norm_kind(norm: nn.Module) -> str | None:
    """The kernel's kind for a q/k norm module the fused chain may read the weight of, else None.

    A norm with hooks or a patched forward (offloading, casting, adapters), or of a subclass (which may compute
    something else), must run as a module, so it gets None.
    """
    if norm._forward_hooks or norm._forward_pre_hooks or "forward" in vars(norm):
        return None
    return _NORM_KIND.get(type(norm))


class FusedCosmos3RMSNorm(Cosmos3RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        if not _fusable(x, self.weight):
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps, kind="rms")


class FusedCosmos3NemotronRMSNorm(Cosmos3NemotronRMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        if not _fusable(x, self.weight):
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps, kind="nemotron")


class FusedCosmos3MLP(Cosmos3MLP):
    def forward(self, x: Tensor) -> Tensor:
        if self.hidden_act != "silu":
            return super().forward(x)
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(silu_glu(gate, up) if _fusable(gate, up) else F.silu(gate) * up)


class FusedCosmos3Attention(Cosmos3Attention):
    """`Cosmos3Attention` with each q/k norm + RoPE chain (`_norm_rope`) in one kernel."""

    def _norm_rope(self, norm: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if isinstance(norm, nn.Identity):
            return rms_norm_rope(x, None, cos, sin) if _fusable(x, cos, sin) else apply_rope(x, cos, sin)
        kind = _norm_kind(norm)
        if kind is None or not _fusable(x, norm.weight, cos, sin):
            return apply_rope(norm(x), cos, sin)
        return rms_norm_rope(x, norm.weight, cos, sin, eps=norm.eps, kind=kind)


class FusedCosmos3TimestepEmbedding(Cosmos3TimestepEmbedding):
    """The timestep-embedding add over the packed gen stream in one pass (`add_timestep_embedding`)."""

    def add_to(self, hidden: Tensor, t: Tensor, index: Tensor, sample_ids: Tensor) -> Tensor:
        temb = self(t).to(hidden.dtype)  # [B, D]
        if not _fusable(hidden, temb):
            return hidden.index_add(0, index, temb[sample_ids[index]])
        return add_timestep_embedding(hidden, temb, index, sample_ids)


_NORM_KIND = {
    Cosmos3RMSNorm: "rms",
    FusedCosmos3RMSNorm: "rms",
    Cosmos3NemotronRMSNorm: "nemotron",
    FusedCosmos3NemotronRMSNorm: "nemotron",
}
_FUSED = {
    Cosmos3RMSNorm: FusedCosmos3RMSNorm,
    Cosmos3NemotronRMSNorm: FusedCosmos3NemotronRMSNorm,
    Cosmos3MLP: FusedCosmos3MLP,
    Cosmos3Attention: FusedCosmos3Attention,
    Cosmos3TimestepEmbedding: FusedCosmos3TimestepEmbedding,
}
_EAGER = {fused: eager for eager, fused in _FUSED.items()}


def _swap(model: nn.Module, classes: dict, fn_name: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (e.g. a Cosmos3Transformer), got {type(model).__name__}.")
    known = 0
    for module in model.modules():
        # Exact types only: a user subclass may override what the fused class would bypass.
        if type(module) in _FUSED or type(module) in _EAGER:
            known += 1
        if type(module) in classes:
            module.__class__ = classes[type(module)]
    if not known:
        raise ValueError(
            f"`{fn_name}` found no Cosmos 3 modules ({', '.join(c.__name__ for c in _FUSED)}) in the "
            f"{type(model).__name__} it was given."
        )
    return model


def apply_fused_kernels(model: nn.Module) -> nn.Module:
    """Swap the model's norms, SiLU MLPs and attention q/k chains for fused-kernel versions, in place.

    Idempotent; returns `model`. The kernels serve inference: with autograd the modules run their eager code (see
    the module docstring). Undo with `remove_fused_kernels`.
    """
    return _swap(model, _FUSED, "apply_fused_kernels")


def remove_fused_kernels(model: nn.Module) -> nn.Module:
    """Restore the eager classes swapped in by `apply_fused_kernels`, in place; returns `model`."""
    return _swap(model, _EAGER, "remove_fused_kernels")
