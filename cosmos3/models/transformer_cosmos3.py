"""Cosmos 3 mixture-of-transformers (MoT): an understanding tower and a generation tower, one shared attention.

Notable choices (the reference is diffusers 0.42.1's `diffusers/models/transformers/transformer_cosmos3.py`; usage
in the README's "The transformer" section):

* Two full parameter sets per layer: the *und* (text) tower `to_q/to_k/to_v/to_out, norm_q/norm_k, mlp, *_layernorm`
  and the *gen* tower `add_q_proj/.../to_add_out, norm_added_q/k, mlp_moe_gen, *_layernorm_moe_gen`. Names and
  `config.json` keys are those of `diffusers.Cosmos3OmniTransformer`, so checkpoints load both ways unchanged.
* Text tokens attend causally to text only; generated tokens attend bidirectionally to `[text K/V ‖ gen K/V]` of
  their own sample. Text never sees generated tokens, so the text tower is a pure function of the prompt: we run
  it once (`encode_text`, a `Cosmos3TextKVCache`) and every denoising step runs the generation tower only.
* Batches are two packed streams (`layout.py`); attention backends in `attention.py`.
* Interleaved 3D mRoPE (T/H/W frequency slots interleaved), computed in float32.
* Timestep embeddings are added to noisy tokens only; clean conditioning tokens get none and are not predicted.
* Edge variant (`hidden_act="relu2"`): relu² MLP, fp32 Nemotron RMSNorm, no text q/k norm, and a separate norm on
  text keys when generated tokens read them (`use_und_k_norm_for_gen`).

Axis legend for shape comments: N tokens of a packed stream, H query heads, Hkv key/value heads, D head_dim,
C latent channels, B samples.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from .attention import _sdpa, gen_attention, resolve_backend, und_attention
from .layout import Cosmos3Layout, patchify, unpatchify

# Named presets (published sizes; see cosmos3.md §1). `tiny` is for tests.
COSMOS3_PRESETS: dict[str, dict] = {
    "edge": dict(
        hidden_size=2048, intermediate_size=9216, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=131072, hidden_act="relu2", rms_norm_eps=1e-5,
        rope_theta=1e8, qk_norm_for_text=False, use_und_k_norm_for_gen=True, action_gen=True, action_dim=64,
    ),
    "nano": dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=5e6, rms_norm_eps=1e-6,
        action_gen=True, action_dim=64, sound_gen=True, sound_dim=64,
    ),
    "super": dict(
        hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=5e6, rms_norm_eps=1e-6,
        sound_gen=True, sound_dim=64,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=512, rope_axes_dim=[4, 2, 2], latent_channel=8, patch_latent_dim=32,
        rope_theta=10000.0, action_gen=True, action_dim=16, num_embodiment_domains=32, sound_gen=True, sound_dim=8,
    ),
}

# Keys that published `transformer/config.json` files carry beyond the constructor's arguments. They describe the
# training setup; the ones that would change the network must hold the only value this architecture implements.
_CONFIG_METADATA_REQUIRED = {
    "joint_attn_implementation": "two_way",
    "position_embedding_type": "unified_3d_mrope",
    "use_moe": True,
    "video_temporal_causal": False,
    "qk_norm_for_diffusion": True,
}
_CONFIG_METADATA_FREE = {
    "dtype", "freeze_und", "initializer_range", "max_action_dim", "max_position_embeddings", "model_type", "qk_norm",
    "temporal_compression_factor", "temporal_compression_factor_sound", "use_cache", "backbone_type", "torch_dtype",
    "architectures",
}


@dataclass
class Cosmos3TransformerOutput(BaseOutput):
    """Velocity predictions, zero at clean (conditioning) frames and tokens.

    Args:
        sample: vision, `[B, C, T, H, W]` (or a list of `[C, T, H, W]` when the input was a list).
        sound: sound, `[B, C_s, T_s]` or a list of `[C_s, T_s]` (None without sound).
        action: actions, `[B, T_a, action_dim]` or a list of `[T_a, action_dim]` (None without actions).
    """

    sample: Tensor | list[Tensor]
    sound: Tensor | list[Tensor | None] | None = None
    action: Tensor | list[Tensor | None] | None = None


@dataclass
class Cosmos3TextKVCache:
    """Per-layer text keys/values as the generation tower reads them (after norm and RoPE).

    keys[i], values[i]: `[Nu, Hkv, D]` for layer i, packed over the batch's prompts (`text_ids`, `text_lengths`).
    """

    keys: list[Tensor]
    values: list[Tensor]
    text_ids: Tensor
    text_lengths: list[int]


# ---------------------------------------------------------------------------------------------------------------
# Small layers
# ---------------------------------------------------------------------------------------------------------------


class Cosmos3RMSNorm(nn.Module):
    """RMSNorm with the variance in fp32 and the product in the weight's dtype (the Qwen3 / diffusers recipe)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class Cosmos3NemotronRMSNorm(nn.Module):
    """RMSNorm computed entirely in fp32, weight included, then cast back (the Nemotron / Edge recipe)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    return Cosmos3NemotronRMSNorm(dim, eps) if kind == "nemotron" else Cosmos3RMSNorm(dim, eps)


class Cosmos3MLP(nn.Module):
    """SiLU-gated MLP (Qwen3) or relu² MLP (Nemotron / Edge)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.hidden_act = hidden_act
        if hidden_act == "silu":
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.hidden_act == "relu2":
            return self.down_proj(torch.relu(self.up_proj(x)).square())
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DomainAwareLinear(nn.Module):
    """A linear layer per embodiment domain, stored as embedding tables (checkpoint layout of the reference).

    `fc.weight[d]` is the row-major `[in, out]` matrix of domain d, `bias.weight[d]` its bias.
    """

    def __init__(self, input_size: int, output_size: int, num_domains: int):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.fc = nn.Embedding(num_domains, input_size * output_size)
        self.bias = nn.Embedding(num_domains, output_size)

    def forward(self, x: Tensor, groups: list[tuple[Tensor, Tensor]]) -> Tensor:
        """`x [N, in]` -> `[N, out]`; `groups` partitions the rows by domain: `(domain [1], rows)` pairs on x's
        device (from `Cosmos3Layout.domain_groups`)."""
        # Tokens of one domain share one matmul, rather than gathering an [in, out] matrix per token. The tables
        # are read through their modules so that hooks (layerwise casting, offloading) see the access.
        out = x.new_zeros(x.shape[0], self.output_size)
        for domain, rows in groups:
            weight = self.fc(domain).view(self.input_size, self.output_size)  # [in, out]
            out = out.index_put((rows,), (x[rows] @ weight + self.bias(domain)).to(out.dtype))
        return out


class Cosmos3TimestepEmbedding(nn.Module):
    """Sinusoidal(256, cos first) -> Linear -> SiLU -> Linear; kept in fp32 (`_keep_in_fp32_modules`)."""

    def __init__(self, hidden_size: int, num_channels: int = 256):
        super().__init__()
        self.num_channels = num_channels
        self.linear_1 = nn.Linear(num_channels, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: Tensor) -> Tensor:
        half = self.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        angles = t.float()[:, None] * torch.exp(exponent)[None, :]  # [B, half]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))

    def add_to(self, hidden: Tensor, t: Tensor, index: Tensor, sample_ids: Tensor) -> Tensor:
        """`hidden [N, D]` with each sample's embedding of `t [B]` added to rows `index` of the packed gen stream
        (`sample_ids [N]`: the sample of each row). A method of its own so cosmos3.kernels can fuse the add."""
        temb = self(t).to(hidden.dtype)  # [B, D]
        return hidden.index_add(0, index, temb[sample_ids[index]])


class Cosmos3RotaryEmbedding(nn.Module):
    """Interleaved 3D mRoPE: frequency slot j rotates with the H ids if j % 3 == 1 (first 3*h_dim slots), with the
    W ids if j % 3 == 2 (first 3*w_dim slots), with the T ids otherwise."""

    def __init__(self, head_dim: int, rope_theta: float, rope_axes_dim: list[int]):
        super().__init__()
        self.head_dim, self.rope_theta = head_dim, rope_theta
        self.register_buffer("inv_freq", _inverse_frequencies(head_dim, rope_theta), persistent=False)
        axis = torch.zeros(head_dim // 2, dtype=torch.long)
        axis[1 : 3 * rope_axes_dim[1] : 3] = 1
        axis[2 : 3 * rope_axes_dim[2] : 3] = 2
        self.register_buffer("axis_of_slot", axis, persistent=False)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # float32 throughout: bf16 cannot tell positions apart beyond 256.
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:
            # `model.to(torch.bfloat16)` rounds buffers too (`from_pretrained(torch_dtype=...)` does not): a 0.2%
            # frequency error times a position in the hundreds is a phase error of radians. Recompute the init values.
            inv_freq = _inverse_frequencies(self.head_dim, self.rope_theta).to(position_ids.device)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids.float()[:, :, None] * inv_freq[None, None, :]  # [3, N, D/2]
        slot = torch.arange(freqs.shape[-1], device=freqs.device)
        freqs = freqs[self.axis_of_slot, :, slot].transpose(0, 1)  # [N, D/2], each slot from its own axis
        emb = torch.cat([freqs, freqs], dim=-1)  # [N, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _inverse_frequencies(head_dim: int, rope_theta: float) -> Tensor:
    return 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x `[N, h, D]`, cos/sin `[N, D]`."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Attention and decoder layer
# ---------------------------------------------------------------------------------------------------------------


class Cosmos3Attention(nn.Module):
    """Per-tower Q/K/V/O projections and q/k norms around the shared two-way attention."""

    def __init__(self, config, norm_kind: str):
        super().__init__()
        hidden, d = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        bias = config.attention_bias
        # und (text) tower
        self.to_q = nn.Linear(hidden, self.num_heads * d, bias=bias)
        self.to_k = nn.Linear(hidden, self.num_kv_heads * d, bias=bias)
        self.to_v = nn.Linear(hidden, self.num_kv_heads * d, bias=bias)
        self.to_out = nn.Linear(self.num_heads * d, hidden, bias=bias)
        if config.qk_norm_for_text:
            self.norm_q = _norm(norm_kind, d, config.rms_norm_eps)
            self.norm_k = _norm(norm_kind, d, config.rms_norm_eps)
        else:
            self.norm_q = nn.Identity()
            self.norm_k = nn.Identity()
        # Edge: text keys without their own norm get one when generated queries read them.
        self.k_norm_und_for_gen = (
            _norm(norm_kind, d, config.rms_norm_eps)
            if config.use_und_k_norm_for_gen and not config.qk_norm_for_text
            else None
        )
        # gen tower
        self.add_q_proj = nn.Linear(hidden, self.num_heads * d, bias=bias)
        self.add_k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=bias)
        self.add_v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=bias)
        self.to_add_out = nn.Linear(self.num_heads * d, hidden, bias=bias)
        self.norm_added_q = _norm(norm_kind, d, config.rms_norm_eps)
        self.norm_added_k = _norm(norm_kind, d, config.rms_norm_eps)

    def _norm_rope(self, norm: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # one method for the q/k chain, so cosmos3.kernels can fuse it by overriding this alone
        return apply_rope(norm(x), cos, sin)

    def _text_qkv(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Text-tower queries, keys, values, and the keys as generated tokens read them (all after norm and RoPE)."""
        cos, sin = rope
        q = self._norm_rope(self.norm_q, self.to_q(x).view(-1, self.num_heads, self.head_dim), cos, sin)  # [Nu, H, D]
        k_proj = self.to_k(x).view(-1, self.num_kv_heads, self.head_dim)  # [Nu, Hkv, D]
        k = self._norm_rope(self.norm_k, k_proj, cos, sin)
        v = self.to_v(x).view(-1, self.num_kv_heads, self.head_dim)  # [Nu, Hkv, D]
        if self.k_norm_und_for_gen is None:
            return q, k, v, k
        # the generation tower's extra key norm applies on top of the text key norm
        k_for_gen = self._norm_rope(self.k_norm_und_for_gen, self.norm_k(k_proj), cos, sin)
        return q, k, v, k_for_gen

    def forward_und(
        self, x: Tensor, rope: tuple[Tensor, Tensor], layout: Cosmos3Layout, backend: str
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Text self-attention. Returns the output `[Nu, hidden]` and the (key, value) generated tokens read."""
        q, k, v, k_for_gen = self._text_qkv(x, rope)
        out = und_attention(q, k, v, layout, backend)  # [Nu, H, D]
        return self.to_out(out.flatten(1)), (k_for_gen, v)

    def forward_text(
        self, x: Tensor, rope: tuple[Tensor, Tensor], past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Causal text self-attention of one sequence continuing `past` (the text tower's own keys/values), for
        autoregressive decoding. Returns the output `[n, hidden]` and the keys/values including the new tokens."""
        q, k, v, _ = self._text_qkv(x, rope)
        if past is not None:
            k, v = torch.cat([past[0], k]), torch.cat([past[1], v])  # [p + n, Hkv, D]
        n, total = q.shape[0], k.shape[0]
        # query i sits at position total - n + i and sees keys up to it; one new token sees everything
        mask = None if n == 1 else torch.arange(total, device=q.device) <= torch.arange(total - n, total,
                                                                                        device=q.device)[:, None]
        out = _sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask=mask)
        return self.to_out(out[0].transpose(0, 1).flatten(1)), (k, v)

    def forward_gen(
        self, x: Tensor, text_kv: tuple[Tensor, Tensor], rope: tuple[Tensor, Tensor], layout: Cosmos3Layout,
        backend: str,
    ) -> Tensor:
        """Generated tokens over `[text K/V ‖ gen K/V]` of their sample. Returns `[Ng, hidden]`."""
        cos, sin = rope
        q = self._norm_rope(self.norm_added_q, self.add_q_proj(x).view(-1, self.num_heads, self.head_dim), cos, sin)
        k = self._norm_rope(self.norm_added_k, self.add_k_proj(x).view(-1, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.add_v_proj(x).view(-1, self.num_kv_heads, self.head_dim)  # [Ng, Hkv, D]
        out = gen_attention(q, text_kv[0], text_kv[1], k, v, layout, backend)  # [Ng, H, D]
        return self.to_add_out(out.flatten(1))


class Cosmos3DecoderLayer(nn.Module):
    """One MoT layer: pre-norm attention and MLP, with separate weights for the text and generation towers."""

    def __init__(self, config):
        super().__init__()
        kind = "nemotron" if config.hidden_act == "relu2" else "rms"
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Cosmos3Attention(config, kind)
        self.mlp = Cosmos3MLP(hidden, config.intermediate_size, config.hidden_act)
        self.mlp_moe_gen = Cosmos3MLP(hidden, config.intermediate_size, config.hidden_act)
        self.input_layernorm = _norm(kind, hidden, eps)
        self.input_layernorm_moe_gen = _norm(kind, hidden, eps)
        self.post_attention_layernorm = _norm(kind, hidden, eps)
        self.post_attention_layernorm_moe_gen = _norm(kind, hidden, eps)

    def forward(
        self,
        und: Tensor | None,
        gen: Tensor | None,
        text_kv: tuple[Tensor, Tensor] | None,
        rope: tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None],
        layout: Cosmos3Layout,
        backend: str,
    ) -> tuple[Tensor | None, Tensor | None, tuple[Tensor, Tensor]]:
        """Advance the text stream `und` and/or the generation stream `gen` by one layer.

        `und=None` skips the text tower; the generation tower then reads the cached `text_kv` of this layer.
        `gen=None` runs the text tower only (building the cache). Returns `(und, gen, text_kv)`.
        """
        # 1. text tower: causal attention within each prompt, then MLP
        if und is not None:
            attn, text_kv = self.self_attn.forward_und(self.input_layernorm(und), rope[0], layout, backend)
            und = und + attn
            und = und + self.mlp(self.post_attention_layernorm(und))
        # 2. generation tower: attention over [text ‖ gen] of the same sample, then MLP
        if gen is not None:
            gen = gen + self.self_attn.forward_gen(self.input_layernorm_moe_gen(gen), text_kv, rope[1], layout, backend)
            gen = gen + self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(gen))
        return und, gen, text_kv

    def forward_text(
        self, hidden: Tensor, rope: tuple[Tensor, Tensor], past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The text tower for autoregressive decoding of one sequence (see `Cosmos3Transformer.text_logits`)."""
        attn, kv = self.self_attn.forward_text(self.input_layernorm(hidden), rope, past)
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), kv


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class Cosmos3Transformer(ModelMixin, ConfigMixin, CacheMixin):
    r"""The Cosmos 3 MoT backbone with its modality heads.

    Constructor arguments and parameter names are those of `diffusers.Cosmos3OmniTransformer`, so
    `Cosmos3Transformer.from_pretrained(folder)` reads a published `transformer/` folder and what we save loads
    into the reference. Build presets with `Cosmos3Transformer.from_preset("nano")`.

    Use:
        layout = model.build_layout([Cosmos3Sample(text_ids=ids, vision_shape=(T, H, W))])
        cache = model.encode_text(layout)            # once per prompt(s)
        out = model(layout, latents, timestep, text_kv_cache=cache).sample   # every denoising step

    `timestep` is in scheduler units (0..1000, multiplied by `timestep_scale`), one value per sample.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["Cosmos3DecoderLayer"]
    _repeated_blocks = ["Cosmos3DecoderLayer"]
    _skip_layerwise_casting_patterns = ["embed_tokens", "time_embedder", "norm"]
    _keep_in_fp32_modules = ["time_embedder"]
    # `dtype` appears in published configs as a load-time hint; the reference drops it from what it saves.
    ignore_for_config = ["dtype"]

    @register_to_config
    def __init__(
        self,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        dtype: str = "bfloat16",
        head_dim: int = 128,
        hidden_size: int = 4096,
        intermediate_size: int = 12288,
        base_fps: int = 24,
        enable_fps_modulation: bool = True,
        latent_channel: int = 48,
        unified_3d_mrope_reset_spatial_ids: bool = True,
        unified_3d_mrope_temporal_modality_margin: int = 15000,
        latent_patch_size: int = 2,
        num_attention_heads: int = 32,
        num_hidden_layers: int = 36,
        num_key_value_heads: int = 8,
        patch_latent_dim: int = 192,
        rms_norm_eps: float = 1e-6,
        rope_scaling: dict | None = None,
        rope_theta: float = 5000000.0,
        action_dim: int | None = None,
        action_gen: bool = False,
        num_embodiment_domains: int = 32,
        sound_dim: int | None = None,
        sound_gen: bool = False,
        sound_latent_fps: float = 25.0,
        timestep_scale: float = 0.001,
        vocab_size: int = 151936,
        hidden_act: str = "silu",
        qk_norm_for_text: bool = True,
        use_und_k_norm_for_gen: bool = False,
        rope_axes_dim: tuple[int, int, int] | list[int] | None = None,
    ):
        super().__init__()
        if rope_axes_dim is None:
            rope_axes_dim = (rope_scaling or {}).get("mrope_section", [24, 20, 20])
        self.register_to_config(rope_axes_dim=list(rope_axes_dim))
        _validate_config(self.config)

        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList([Cosmos3DecoderLayer(self.config) for _ in range(num_hidden_layers)])
        kind = "nemotron" if hidden_act == "relu2" else "rms"
        self.norm = _norm(kind, hidden_size, rms_norm_eps)
        self.norm_moe_gen = _norm(kind, hidden_size, rms_norm_eps)
        self.rotary_emb = Cosmos3RotaryEmbedding(head_dim, rope_theta, list(rope_axes_dim))

        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.proj_in = nn.Linear(patch_latent_dim, hidden_size)
        self.proj_out = nn.Linear(hidden_size, patch_latent_dim)
        self.time_embedder = Cosmos3TimestepEmbedding(hidden_size)
        if action_gen:
            self.action_proj_in = DomainAwareLinear(action_dim, hidden_size, num_embodiment_domains)
            self.action_proj_out = DomainAwareLinear(hidden_size, action_dim, num_embodiment_domains)
            self.action_modality_embed = nn.Parameter(torch.zeros(hidden_size))
        if sound_gen:
            self.audio_proj_in = nn.Linear(sound_dim, hidden_size)
            self.audio_proj_out = nn.Linear(hidden_size, sound_dim)
            self.audio_modality_embed = nn.Parameter(torch.zeros(hidden_size))

        self.gradient_checkpointing = False
        self.attention_backend = "native"

    # -------------------------------------------------------------------------------------------------------
    # Construction, loading, switches
    # -------------------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Cosmos3Transformer:
        """Build a named preset (`edge`, `nano`, `super`, `tiny`), e.g. under `torch.device("meta")` to size it."""
        if name not in COSMOS3_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; valid: {sorted(COSMOS3_PRESETS)}.")
        return cls(**{**COSMOS3_PRESETS[name], **overrides})

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        _check_config_keys(cls, config_dict)
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`ModelMixin.from_pretrained`, safetensors only, strict: a missing, unexpected or misshaped tensor fails.

        A local folder is checked before anything is loaded (the error lists the offending names); anything else
        (a Hub id resolved from the local cache) is checked from the loader's report.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("Cosmos3Transformer loads safetensors only (`use_safetensors=False` is not supported).")
        kwargs["use_safetensors"] = True
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if os.path.isdir(folder):
            _check_checkpoint_keys(cls, folder, kwargs.get("variant"))
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
        if problems:
            raise ValueError(f"Checkpoint {pretrained_model_name_or_path!r} does not match its config: {problems}.")
        return (model, info) if wants_info else model

    def set_attention_backend(self, backend: str) -> None:
        """Select the attention kernel: `native` (SDPA, default), `flex`, `flash_varlen` or `tiled` (CPU bfloat16
        inference); see cosmos3/models/attention.py."""
        self.attention_backend = resolve_backend(backend)

    def reset_attention_backend(self) -> None:
        self.attention_backend = "native"

    def build_layout(self, samples, *, temporal_compression: int = 4) -> Cosmos3Layout:
        """Lay out a batch of `Cosmos3Sample`s (static across denoising steps; build once per request)."""
        return Cosmos3Layout.build(samples, self.config, temporal_compression=temporal_compression)

    # -------------------------------------------------------------------------------------------------------
    # Forward
    # -------------------------------------------------------------------------------------------------------

    def _rope(self, layout: Cosmos3Layout, stream: str, dtype: torch.dtype, device: torch.device):
        positions = layout.und_position_ids if stream == "und" else layout.gen_position_ids
        key = ("rope", stream, dtype, self.config.rope_theta, tuple(self.config.rope_axes_dim))
        return layout.cached(key, device, lambda: self.rotary_emb(positions.to(device), dtype))

    def _layer(self, layer, und, gen, text_kv, rope, layout):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(layer.__call__, und, gen, text_kv, rope, layout,
                                                     self.attention_backend)
        return layer(und, gen, text_kv, rope, layout, self.attention_backend)

    def _embed_text(self, layout: Cosmos3Layout) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        device = self.embed_tokens.weight.device
        und = self.embed_tokens(layout.to_device("text_ids", device))  # [Nu, hidden]
        return und, self._rope(layout, "und", und.dtype, device)

    def encode_text(self, layout: Cosmos3Layout) -> Cosmos3TextKVCache:
        """Run the text tower over the layout's prompts; returns the keys/values the generation tower reads.

        The result depends on the prompts only: reuse it for every denoising step of the request.
        """
        und, und_rope = self._embed_text(layout)
        keys, values = [], []
        for layer in self.layers:
            und, _, (k, v) = self._layer(layer, und, None, None, (und_rope, None), layout)
            keys.append(k)
            values.append(v)
        return Cosmos3TextKVCache(
            keys=keys, values=values, text_ids=layout.text_ids, text_lengths=list(layout.text_lengths)
        )

    def text_logits(
        self, input_ids: Tensor, past: list[tuple[Tensor, Tensor]] | None = None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Next-token logits `[n, vocab]` of the understanding tower for tokens `input_ids` `[n]` of one sequence
        continuing `past` (per-layer keys/values returned by the previous call; None for a new sequence)."""
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 1 or input_ids.numel() == 0 or (
            input_ids.is_floating_point()
        ):
            raise ValueError(f"`input_ids` must be a non-empty 1-D integer tensor, got {input_ids!r}.")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"`input_ids` must lie in [0, vocab_size={self.config.vocab_size}).")
        if past is not None and len(past) != len(self.layers):
            raise ValueError(f"`past` has {len(past)} layers, the model {len(self.layers)}.")
        device = self.embed_tokens.weight.device
        start = 0 if past is None else past[0][0].shape[0]
        hidden = self.embed_tokens(input_ids.to(device))  # [n, hidden]
        # Text positions are the same on all three mRoPE axes: plain 1-D RoPE.
        positions = torch.arange(start, start + input_ids.numel(), device=device, dtype=torch.float32)
        rope = self.rotary_emb(positions[None].expand(3, -1), hidden.dtype)
        cache = []
        for i, layer in enumerate(self.layers):
            hidden, kv = layer.forward_text(hidden, rope, None if past is None else past[i])
            cache.append(kv)
        return self.lm_head(self.norm(hidden)), cache

    def forward(
        self,
        layout: Cosmos3Layout,
        vision: Tensor | list[Tensor],
        timestep: Tensor | float,
        *,
        sound: Tensor | list[Tensor | None] | None = None,
        action: Tensor | list[Tensor | None] | None = None,
        sound_timestep: Tensor | float | None = None,
        action_timestep: Tensor | float | None = None,
        text_kv_cache: Cosmos3TextKVCache | None = None,
        return_dict: bool = True,
    ) -> Cosmos3TransformerOutput | tuple:
        """One denoising step for every sample of `layout`.

        Args:
            layout: from `build_layout`; fixes prompts, shapes and which frames are clean.
            vision: latents `[B, C, T, H, W]`, or a list of `[C, T, H, W]` (shapes may differ per sample).
            timestep: scheduler timestep(s), a number or `[B]`; also used for sound/actions unless given.
            sound: sound latents `[B, C_s, T_s]` or a list (None entries for samples without sound).
            action: action tokens `[B, T_a, action_dim]` or a list (None entries for samples without actions).
            text_kv_cache: from `encode_text(layout)`; computed here when None (training, or a single call).
        """
        B = layout.batch_size
        dtype, device = self.proj_in.weight.dtype, self.proj_in.weight.device
        vision_list = _as_list("vision", vision, B)
        sound_list = _as_list("sound", sound, B) if sound is not None else [None] * B
        action_list = _as_list("action", action, B) if action is not None else [None] * B
        self._check_inputs(layout, vision_list, sound_list, action_list)
        t_vision = _per_sample_timestep("timestep", timestep, B, device)
        t_sound = _per_sample_timestep("sound_timestep", sound_timestep, B, device, default=t_vision)
        t_action = _per_sample_timestep("action_timestep", action_timestep, B, device, default=t_vision)
        if text_kv_cache is not None and (
            text_kv_cache.text_lengths != layout.text_lengths
            or len(text_kv_cache.keys) != len(self.layers)
            or not torch.equal(text_kv_cache.text_ids, layout.text_ids)
        ):
            raise ValueError(
                f"`text_kv_cache` was built for other prompts (lengths {text_kv_cache.text_lengths}, "
                f"{len(text_kv_cache.keys)} layers) than the layout's (lengths {layout.text_lengths}, "
                f"{len(self.layers)} layers); build it with `encode_text(layout)`."
            )

        # 1. Embed the generated modalities into the packed gen stream [Ng, hidden].
        gen_sample_ids = layout.to_device("gen_sample_ids", device)
        p = self.config.latent_patch_size
        patches = torch.cat([patchify(x.to(device, dtype), p) for x in vision_list])  # [Nv, p*p*C]
        vision_tokens = self.proj_in(patches)
        # The stream takes the dtype the projections produce (the weights', or autocast's).
        hidden = vision_tokens.new_zeros(sum(layout.gen_lengths), self.config.hidden_size)
        hidden[layout.to_device("vision_index", device)] = vision_tokens
        if layout.sound_index.numel():
            frames = torch.cat([s.to(device, dtype).T for s in sound_list if s is not None])  # [Ns, C_s]
            sound_tokens = self.audio_proj_in(frames) + self.audio_modality_embed
            hidden[layout.to_device("sound_index", device)] = sound_tokens.to(hidden.dtype)
        if layout.action_index.numel():
            tokens = torch.cat([a.to(device, dtype) for a in action_list if a is not None])  # [Na, action_dim]
            groups = layout.domain_groups("action_domain_ids", device)
            action_tokens = self.action_proj_in(tokens, groups) + self.action_modality_embed
            hidden[layout.to_device("action_index", device)] = action_tokens.to(hidden.dtype)

        # 2. Timestep embeddings on noisy tokens only (clean conditioning tokens carry none).
        for name, t in (("vision_noisy_index", t_vision), ("sound_noisy_index", t_sound),
                        ("action_noisy_index", t_action)):
            index = layout.to_device(name, device)
            if index.numel():
                hidden = self.time_embedder.add_to(hidden, t * self.config.timestep_scale, index, gen_sample_ids)

        # 3. The layers: the generation tower reads each layer's text keys/values, from the cache or computed
        #    alongside (training, or a one-off call).
        und, und_rope = self._embed_text(layout) if text_kv_cache is None else (None, None)
        rope = (und_rope, self._rope(layout, "gen", hidden.dtype, device))
        for i, layer in enumerate(self.layers):
            text_kv = None if text_kv_cache is None else (text_kv_cache.keys[i], text_kv_cache.values[i])
            und, hidden, _ = self._layer(layer, und, hidden, text_kv, rope, layout)
        hidden = self.norm_moe_gen(hidden)

        # 4. Heads on noisy tokens; clean frames and tokens come back as zeros.
        vision_pred = self.proj_out(hidden[layout.to_device("vision_noisy_index", device)])
        vision_out = self._unpatchify(vision_pred, layout, vision_list)
        sound_out = action_out = None
        if layout.sound_index.numel():
            sound_pred = self.audio_proj_out(hidden[layout.to_device("sound_noisy_index", device)])
            chunks = torch.split(sound_pred, [s.sound_length for s in layout.samples])
            sound_out = [chunk.T if x is not None else None for chunk, x in zip(chunks, sound_list)]
        if layout.action_index.numel():
            action_pred = self.action_proj_out(
                hidden[layout.to_device("action_noisy_index", device)],
                layout.domain_groups("action_noisy_domain_ids", device),
            )
            chunks = torch.split(action_pred, [len(n) for n in layout.action_noisy_tokens])
            action_out = []
            for chunk, noisy, x in zip(chunks, layout.action_noisy_tokens, action_list):
                if x is None:
                    action_out.append(None)
                    continue
                full = chunk.new_zeros(x.shape)
                full[layout.index_of(noisy, device)] = chunk
                action_out.append(full)

        if not isinstance(vision, list):
            vision_out = torch.stack(vision_out)
        if sound_out is not None and sound is not None and not isinstance(sound, list):
            sound_out = torch.stack(sound_out)
        if action_out is not None and action is not None and not isinstance(action, list):
            action_out = torch.stack(action_out)
        if not return_dict:
            return vision_out, sound_out, action_out
        return Cosmos3TransformerOutput(sample=vision_out, sound=sound_out, action=action_out)

    # -------------------------------------------------------------------------------------------------------
    # Unpatchify, checks
    # -------------------------------------------------------------------------------------------------------

    def _unpatchify(self, pred: Tensor, layout: Cosmos3Layout, vision: list[Tensor]) -> list[Tensor]:
        p = self.config.latent_patch_size
        outputs, start = [], 0
        for (T, h, w), noisy, x in zip(layout.vision_grids, layout.vision_noisy_frames, vision):
            C, _, H, W = x.shape
            n = len(noisy) * h * w
            full = pred.new_zeros(C, T, H, W)
            full[:, layout.index_of(noisy, pred.device)] = unpatchify(pred[start : start + n], (C, len(noisy), H, W), p)
            outputs.append(full)
            start += n
        return outputs

    def _check_inputs(self, layout, vision, sound, action) -> None:
        cfg = self.config
        modalities = (
            ("vision", vision, lambda s: (cfg.latent_channel, *s.vision_shape), "(C, T, H, W)", None),
            ("sound", sound, lambda s: (cfg.sound_dim, s.sound_length), "(C_s, T_s)", "sound_length"),
            ("action", action, lambda s: (s.action_length, cfg.action_dim), "(T_a, D)", "action_length"),
        )
        for name, values, shape_of, axes, length_field in modalities:
            for b, (s, x) in enumerate(zip(layout.samples, values)):
                if length_field is not None and getattr(s, length_field) == 0:
                    if x is not None:
                        raise ValueError(f"{name}[{b}] was given but samples[{b}].{length_field} is 0.")
                    continue
                expected = shape_of(s)
                if not isinstance(x, Tensor) or not x.is_floating_point() or tuple(x.shape) != expected:
                    got = f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, Tensor) else repr(x)
                    raise ValueError(f"{name}[{b}] must be a floating tensor of shape {expected} {axes}, got {got}.")


# ---------------------------------------------------------------------------------------------------------------
# Helpers: input normalization, config and checkpoint checks
# ---------------------------------------------------------------------------------------------------------------


def _as_list(name: str, value, batch_size: int) -> list:
    if isinstance(value, Tensor):
        value = list(value.unbind(0))
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"`{name}` must be a tensor with a leading batch dim or a list, got {type(value).__name__}.")
    if len(value) != batch_size:
        raise ValueError(f"`{name}` has {len(value)} samples but the layout has {batch_size}.")
    return list(value)


def _per_sample_timestep(name: str, value, batch_size: int, device, default: Tensor | None = None) -> Tensor:
    if value is None and default is not None:
        return default
    t = torch.as_tensor(value, device=device)
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"`{name}` must be a real number or tensor, got dtype {t.dtype}.")
    if t.ndim == 0:
        t = t.expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"`{name}` must be a scalar or shape ({batch_size},), got shape {tuple(t.shape)}.")
    return t.float()


def _validate_config(cfg) -> None:
    def fail(msg):
        raise ValueError(f"Invalid Cosmos3Transformer config: {msg}")

    if cfg.hidden_act not in ("silu", "relu2"):
        fail(f"`hidden_act` must be 'silu' or 'relu2', got {cfg.hidden_act!r}.")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        fail(f"`num_attention_heads`={cfg.num_attention_heads} must be a multiple of "
             f"`num_key_value_heads`={cfg.num_key_value_heads}.")
    if len(cfg.rope_axes_dim) != 3 or sum(cfg.rope_axes_dim) != cfg.head_dim // 2:
        fail(f"`rope_axes_dim`={list(cfg.rope_axes_dim)} must be 3 ints summing to head_dim/2={cfg.head_dim // 2}.")
    if cfg.patch_latent_dim != cfg.latent_channel * cfg.latent_patch_size**2:
        fail(f"`patch_latent_dim`={cfg.patch_latent_dim} must equal latent_channel * latent_patch_size**2 = "
             f"{cfg.latent_channel * cfg.latent_patch_size**2}.")
    if cfg.attention_dropout:
        fail(f"`attention_dropout`={cfg.attention_dropout} is not supported (Cosmos 3 trains without it).")
    if cfg.action_gen and not (isinstance(cfg.action_dim, int) and cfg.action_dim > 0):
        fail(f"`action_gen=True` needs a positive `action_dim`, got {cfg.action_dim!r}.")
    if cfg.sound_gen and not (isinstance(cfg.sound_dim, int) and cfg.sound_dim > 0):
        fail(f"`sound_gen=True` needs a positive `sound_dim`, got {cfg.sound_dim!r}.")


def _check_config_keys(cls, config_dict: dict) -> None:
    """Unknown keys are errors; published metadata keys are accepted when they describe this architecture."""
    init_keys = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(
        k for k in config_dict
        if not k.startswith("_") and k not in init_keys and k not in _CONFIG_METADATA_FREE
        and k not in _CONFIG_METADATA_REQUIRED and k != "quantization_config"
    )
    if unknown:
        raise ValueError(
            f"Unknown Cosmos3Transformer config keys {unknown}; valid keys are the constructor arguments "
            f"{sorted(init_keys)} plus metadata {sorted(_CONFIG_METADATA_FREE | set(_CONFIG_METADATA_REQUIRED))}."
        )
    for key, required in _CONFIG_METADATA_REQUIRED.items():
        if key in config_dict and config_dict[key] != required:
            raise ValueError(
                f"Config key `{key}`={config_dict[key]!r} is not implemented; Cosmos3Transformer supports {required!r}."
            )
    rope_scaling = config_dict.get("rope_scaling") or {}
    if rope_scaling.get("mrope_interleaved", True) is not True:
        raise ValueError("Config `rope_scaling.mrope_interleaved=False` is not supported (interleaved mRoPE only).")
    if rope_scaling.get("rope_type", "default") != "default":
        raise ValueError(
            f"Config `rope_scaling.rope_type`={rope_scaling['rope_type']!r} is not supported (only 'default')."
        )
    section, axes = rope_scaling.get("mrope_section"), config_dict.get("rope_axes_dim")
    if section is not None and axes is not None and list(section) != list(axes):
        raise ValueError(
            f"Config `rope_scaling.mrope_section`={list(section)} contradicts `rope_axes_dim`={list(axes)}."
        )


def _check_checkpoint_keys(cls, folder: str, variant: str | None = None) -> None:
    """Compare the safetensors files' names and shapes with the model the config builds; raise on any difference."""
    from safetensors import safe_open

    tag = f".{variant}" if variant else ""  # diffusers' variant naming: name.<variant>.safetensors
    index = os.path.join(folder, f"diffusion_pytorch_model.safetensors.index{tag}.json")
    single = os.path.join(folder, f"diffusion_pytorch_model{tag}.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, name) for name in files]
    elif os.path.exists(single):
        files = [single]
    else:
        raise FileNotFoundError(
            f"No `{os.path.basename(single)}` (or its index) in {folder}; Cosmos3Transformer loads safetensors only."
        )
    found: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    found[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # safetensors' own error type: a truncated or foreign file
            if isinstance(e, (MemoryError, KeyboardInterrupt)):
                raise
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    config = cls.load_config(folder)
    with torch.device("meta"):
        model = cls.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: checkpoint {found[k]} vs model {expected[k]}" for k in set(found) & set(expected)
                   if found[k] != expected[k])
    if missing or unexpected or wrong:
        def head(items):
            return f"{items[:8]}{' ...' if len(items) > 8 else ''} ({len(items)})"
        raise ValueError(
            f"Checkpoint in {folder} does not match its config.json: missing keys {head(missing)}, unexpected keys "
            f"{head(unexpected)}, shape mismatches {head(wrong)}."
        )
