"""Attention backends for the two-stream Cosmos 3 layout.

Two attention calls per layer, whatever the backend:

* `und_attention`: causal self-attention over each sample's text (the und stream);
* `gen_attention`: each sample's generated tokens attend, without a mask, to `[text K/V ‖ generated K/V]` of the
  same sample.

Tensors are packed `[tokens, heads, head_dim]` (axis legend: N tokens, H query heads, Hkv key/value heads, D
head_dim). Backends, chosen with `Cosmos3Transformer.set_attention_backend`:

* `native` (default): `torch.nn.functional.scaled_dot_product_attention`. One sample is a plain call; a batch is
  right-padded to `[B, H, max_len, D]`, with a key-padding mask only when lengths differ.
* `flex`: FlexAttention over the packed streams with a per-sample block mask (no padding at all).
* `flash_varlen`: FlashAttention varlen kernels over the packed streams with `cu_seqlens`, from the `flash_attn`
  package when importable, else PyTorch's own `torch.nn.attention.varlen.varlen_attn`. CUDA, fp16/bf16 only.
* `tiled`: for CPUs in bfloat16. PyTorch's CPU flash kernel does bfloat16 attention in float32 arithmetic (measured
  on an AVX512-BF16 EPYC: no faster than float32), so half of a bfloat16 video step went to it. Here the generated
  tokens' attention runs per sample as two bfloat16 GEMMs over tiles of query rows with the softmax in between,
  while a tile's scores are in cache (1.5x faster on that machine). Its scores are rounded to bfloat16 before the
  softmax, where flash kernels keep them in float32: 0.4-0.5% from exact attention against SDPA's 0.17%, within
  the rounding of a bfloat16 layer. For inference: a backward pass would keep every tile's probabilities, the whole
  `[H, Lq, Lk]` matrix per layer, where SDPA keeps one value per row. The text's causal attention (once per request
  with a text cache) stays on SDPA.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import Cosmos3Layout

ATTENTION_BACKENDS = ("native", "flex", "flash_varlen", "tiled")
_ALIASES = {"sdpa": "native", "torch": "native", "flash_attn_varlen": "flash_varlen"}


def resolve_backend(name: str) -> str:
    """Canonical backend name for `name`, or a ValueError that lists the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"attention backend must be a string, got {type(name).__name__}.")
    canonical = _ALIASES.get(name, name)
    if canonical not in ATTENTION_BACKENDS:
        raise ValueError(
            f"Unknown attention backend {name!r}; valid: {list(ATTENTION_BACKENDS)} (aliases: {sorted(_ALIASES)})."
        )
    if canonical == "flash_varlen" and not flash_varlen_available():
        raise ValueError(
            "attention backend 'flash_varlen' needs the `flash_attn` package or a PyTorch with "
            "`torch.nn.attention.varlen`; neither is available here. Use 'native' or 'flex'."
        )
    return canonical


def flash_varlen_available() -> bool:
    if importlib.util.find_spec("flash_attn") is not None:
        return True
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# native: scaled_dot_product_attention on padded batches
# ---------------------------------------------------------------------------------------------------------------


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None and q.is_cuda:
        # The fused CUDA kernels that take an arbitrary mask do not take GQA; without this, SDPA would fall back
        # to the unfused math kernel.
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def _to_padded(x: Tensor, layout: Cosmos3Layout, stream: str) -> Tensor:
    """`[N, h, D]` packed -> `[B, h, max_len, D]`; a view when all samples have the same length."""
    index, max_len = layout.padding(stream, x.device)
    B = layout.batch_size
    if index is None:
        return x.view(B, max_len, *x.shape[1:]).transpose(1, 2)
    buffer = x.new_zeros(B * max_len, *x.shape[1:])
    buffer[index] = x
    return buffer.view(B, max_len, *x.shape[1:]).transpose(1, 2)


def _from_padded(y: Tensor, layout: Cosmos3Layout, stream: str) -> Tensor:
    """`[B, h, max_len, D]` -> packed `[N, h, D]`."""
    index, max_len = layout.padding(stream, y.device)
    y = y.transpose(1, 2).reshape(layout.batch_size * max_len, *y.shape[1:2], y.shape[-1])
    return y if index is None else y[index]


def _key_padding_mask(layout: Cosmos3Layout, device: torch.device) -> Tensor | None:
    """`[B, 1, 1, L_max + G_max]` bool mask of real (not padding) keys, or None when nothing is padded."""

    def make():
        und_index, und_len = layout.padding("und", device)
        gen_index, gen_len = layout.padding("gen", device)
        if und_index is None and gen_index is None:
            return None
        lengths_u = torch.tensor(layout.text_lengths, device=device)
        lengths_g = torch.tensor(layout.gen_lengths, device=device)
        valid_u = torch.arange(und_len, device=device) < lengths_u[:, None]
        valid_g = torch.arange(gen_len, device=device) < lengths_g[:, None]
        return torch.cat([valid_u, valid_g], dim=1)[:, None, None, :]

    return layout.cached("key_padding_mask", device, make)


# ---------------------------------------------------------------------------------------------------------------
# flex: block masks over the packed streams
# ---------------------------------------------------------------------------------------------------------------

_compiled_flex = None


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    fn = flex_attention
    if q.is_cuda:
        # Eager flex materializes the scores; compiled flex is the fused kernel it exists for. Default (automatic)
        # dynamic shapes: one recompile for a new length, instead of one per length until the recompile limit.
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        fn = _compiled_flex
    # [N, h, D] -> [1, h, N, D]
    out = fn(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def _flex_masks(layout: Cosmos3Layout, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def make():
        und_ids = layout.to_device("und_sample_ids", device)
        gen_ids = layout.to_device("gen_sample_ids", device)
        key_ids = torch.cat([und_ids, gen_ids])
        nu, ng = und_ids.numel(), gen_ids.numel()

        def causal_same_sample(b, h, q_idx, kv_idx):
            return (und_ids[q_idx] == und_ids[kv_idx]) & (q_idx >= kv_idx)

        def same_sample(b, h, q_idx, kv_idx):
            return gen_ids[q_idx] == key_ids[kv_idx]

        # On GPU, build the masks with a compiled kernel: the eager path materializes a dense [Q, KV] bool mask.
        compile_mask = device.type == "cuda"
        und_mask = create_block_mask(causal_same_sample, None, None, nu, nu, device=device, _compile=compile_mask)
        gen_mask = create_block_mask(same_sample, None, None, ng, nu + ng, device=device, _compile=compile_mask)
        return und_mask, gen_mask

    return layout.cached("flex_masks", device, make)


# ---------------------------------------------------------------------------------------------------------------
# flash_varlen: cu_seqlens over the packed streams
# ---------------------------------------------------------------------------------------------------------------


def _varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool) -> Tensor:
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)
    from torch.nn.attention.varlen import varlen_attn

    q, k, v, kwargs = _varlen_arguments(varlen_attn, q, k, v, causal)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def _varlen_arguments(varlen_attn, q: Tensor, k: Tensor, v: Tensor, causal: bool):
    """`varlen_attn`'s keywords changed between PyTorch releases (`is_causal`, then `window_size`; `enable_gqa`
    came later): the arguments for the installed one. Without `enable_gqa`, K/V heads are repeated to match."""
    params = _parameters(varlen_attn)
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return q, k, v, kwargs


@functools.cache
def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _check_varlen_inputs(q: Tensor) -> None:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attention backend 'flash_varlen' runs on CUDA in float16/bfloat16, got device={q.device} "
            f"dtype={q.dtype}; use set_attention_backend('native') or 'flex' here."
        )


# ---------------------------------------------------------------------------------------------------------------
# tiled: query tiles over all keys, as GEMMs in the inputs' dtype
# ---------------------------------------------------------------------------------------------------------------

# One tile's scores [Hkv, rows, Lk]: small enough to stay in cache from the first GEMM through the softmax to the
# second (128 to 512 rows per head measured alike at 2,348 keys).
_TILE_BYTES = 4 << 20


def _tiled(q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> Tensor:
    """Attention of one sample, no mask: q `[Lq, H, D]`, k/v `[Lk, Hkv, D]` -> `out` `[Lq, H, D]`.

    The query heads that share a K/V head are stacked as rows, so one GEMM per K/V head serves its whole group."""
    Lq, H, D = q.shape
    Lk, Hkv, _ = k.shape
    G = H // Hkv
    k_t = (k * D**-0.5).permute(1, 2, 0).contiguous()  # [Hkv, D, Lk], the scale folded into K (fewer than Q)
    v_h = v.transpose(0, 1).contiguous()  # [Hkv, Lk, D]
    tokens = max(1, _TILE_BYTES // (H * Lk * q.element_size()))  # query tokens per tile
    for start in range(0, Lq, tokens):
        t = min(tokens, Lq - start)
        q_tile = q[start:start + t].reshape(t, Hkv, G, D).permute(1, 0, 2, 3).reshape(Hkv, t * G, D)
        p = torch.softmax(torch.bmm(q_tile, k_t), dim=-1)  # [Hkv, t*G, Lk]
        o = torch.bmm(p, v_h)  # [Hkv, t*G, D]
        out[start:start + t].view(t, Hkv, G, D).copy_(o.view(Hkv, t, G, D).permute(1, 0, 2, 3))
    return out


def _tiled_gen(q: Tensor, k_und: Tensor, v_und: Tensor, k_gen: Tensor, v_gen: Tensor, layout: Cosmos3Layout) -> Tensor:
    """Per sample, so no padding and no mask (batching buys a compute-bound CPU nothing)."""
    out = torch.empty_like(q)
    u0 = g0 = 0
    for text, gen in zip(layout.text_lengths, layout.gen_lengths):
        u1, g1 = u0 + text, g0 + gen
        k = torch.cat([k_und[u0:u1], k_gen[g0:g1]])  # [L_b + G_b, Hkv, D]
        v = torch.cat([v_und[u0:u1], v_gen[g0:g1]])
        _tiled(q[g0:g1], k, v, out[g0:g1])
        u0, g0 = u1, g1
    return out


# ---------------------------------------------------------------------------------------------------------------
# The two calls a layer makes
# ---------------------------------------------------------------------------------------------------------------


# Not traced by torch.compile: the dispatch branches on the layout's Python metadata (lengths, padding), which
# would specialize a compiled layer to each prompt length. A compiled layer breaks its graph here and fuses what
# is around (`Cosmos3Transformer.compile_repeated_blocks()`).
@torch.compiler.disable
def und_attention(q: Tensor, k: Tensor, v: Tensor, layout: Cosmos3Layout, backend: str = "native") -> Tensor:
    """Causal attention within each sample's text. q `[Nu, H, D]`, k/v `[Nu, Hkv, D]` -> `[Nu, H, D]`."""
    if backend in ("native", "tiled"):
        # Right padding: a real query never reaches the padded keys behind it, so causal needs no extra mask.
        out = _sdpa(_to_padded(q, layout, "und"), _to_padded(k, layout, "und"), _to_padded(v, layout, "und"),
                    causal=True)
        return _from_padded(out, layout, "und")
    if backend == "flex":
        return _flex(q, k, v, _flex_masks(layout, q.device)[0])
    if backend == "flash_varlen":
        _check_varlen_inputs(q)
        cu = layout.to_device("cu_seqlens_und", q.device)
        n = max(layout.text_lengths)
        return _varlen_kernel(q, k, v, cu, cu, n, n, causal=True)
    raise ValueError(f"Unknown attention backend {backend!r}; valid: {list(ATTENTION_BACKENDS)}.")


@torch.compiler.disable
def gen_attention(
    q: Tensor, k_und: Tensor, v_und: Tensor, k_gen: Tensor, v_gen: Tensor, layout: Cosmos3Layout,
    backend: str = "native",
) -> Tensor:
    """Generated tokens attend to `[und ‖ gen]` keys of their own sample. q `[Ng, H, D]` -> `[Ng, H, D]`."""
    if backend == "native":
        q_pad = _to_padded(q, layout, "gen")  # [B, H, G, D]
        k_pad = torch.cat([_to_padded(k_und, layout, "und"), _to_padded(k_gen, layout, "gen")], dim=2)
        v_pad = torch.cat([_to_padded(v_und, layout, "und"), _to_padded(v_gen, layout, "gen")], dim=2)
        out = _sdpa(q_pad, k_pad, v_pad, mask=_key_padding_mask(layout, q.device))
        return _from_padded(out, layout, "gen")
    if backend == "tiled":
        return _tiled_gen(q, k_und, v_und, k_gen, v_gen, layout)
    if backend == "flex":
        return _flex(q, torch.cat([k_und, k_gen]), torch.cat([v_und, v_gen]), _flex_masks(layout, q.device)[1])
    if backend == "flash_varlen":
        _check_varlen_inputs(q)
        order = layout.joint_key_index(q.device)
        k = torch.cat([k_und, k_gen])[order]
        v = torch.cat([v_und, v_gen])[order]
        cu_q = layout.to_device("cu_seqlens_gen", q.device)
        cu_k = layout.cached(
            "cu_seqlens_joint", q.device, lambda: (layout.cu_seqlens_und + layout.cu_seqlens_gen).to(q.device)
        )
        max_k = max(u + g for u, g in zip(layout.text_lengths, layout.gen_lengths))
        return _varlen_kernel(q, k, v, cu_q, cu_k, max(layout.gen_lengths), max_k, causal=False)
    raise ValueError(f"Unknown attention backend {backend!r}; valid: {list(ATTENTION_BACKENDS)}.")
