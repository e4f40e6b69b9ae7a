"""Fused Triton kernels for the transformer's memory-bound chains, each with the eager reference it is tested
against.

* `rms_norm_rope`: per-head q/k RMSNorm + rotary embedding in one pass; `rms_norm`: the hidden-state norms.
* `silu_glu`: `silu(gate) * up` of the SiLU MLP.
* `add_timestep_embedding`: the per-sample timestep-embedding add over the packed generation stream.
* `apply_fused_kernels(model)` / `remove_fused_kernels(model)`: swap a model's modules to the fused ones and back.

Triton is optional. Each wrapper launches its kernel on CUDA tensors, or on any tensor under Triton's interpreter
(`TRITON_INTERPRET=1` set before Triton is first imported), and otherwise returns its eager reference, so code
written against these functions runs everywhere.
"""

from .glu import silu_glu, silu_glu_reference
from .modules import apply_fused_kernels, remove_fused_kernels
from .norm_rope import rms_norm, rms_norm_reference, rms_norm_rope, rms_norm_rope_reference
from .timestep import add_timestep_embedding, add_timestep_embedding_reference

__all__ = [
    "add_timestep_embedding",
    "add_timestep_embedding_reference",
    "apply_fused_kernels",
    "remove_fused_kernels",
    "rms_norm",
    "rms_norm_reference",
    "rms_norm_rope",
    "rms_norm_rope_reference",
    "silu_glu",
    "silu_glu_reference",
]
