"""Several processes for one generation request, applied to a built pipeline from outside the model.

`parallelize(pipe, cfg=2, ulysses=4, shard="fsdp")`, in every process `torchrun` started (the process group joined
first, e.g. with `cosmos3.training.init_distributed`), splits each denoising step of `pipe` over the ranks:

* **CFG-parallel** (`cfg=2`): the guided batch is `[samples..., negatives...]`; each rank of a cfg pair runs the
  text tower and every step on its half only (its own layout and text cache), and the halves' velocities are
  gathered once per step. Unguided batches split the same way when their size is even; an odd one runs whole on
  both ranks.
* **Ulysses sequence parallelism** (`ulysses=N`): the generation stream's tokens are sharded over N ranks for the
  generation tower's per-token layers (norms, projections, MLPs); around attention an all-to-all trades the token
  shard for a head shard, so each rank attends with every token of H/N query heads and Hkv/N key/value heads, and
  a second all-to-all trades back. The cached text keys/values are kept for those heads only (`encode_text` returns
  them so). The text tower (once per request) and the embeddings and heads around the layers run whole on each
  rank.
* **FSDP** (`shard="fsdp"`): FSDP2 `fully_shard` over all ranks, of each decoder layer (the text tower's projections
  and MLP as groups of their own, so that a denoising step gathers the generation tower only), the token
  embedding, the LM head and the rest of the transformer: each rank holds 1/world of the weights and gathers them
  a layer at a time. For inference: the transformer's parameters stop requiring grad.

The ranks form a `("replicate", "cfg", "ulysses")` DeviceMesh, Ulysses innermost, so that its all-to-alls (four per
layer: queries, keys, values, output) stay between neighbouring ranks (one node) and the cfg gather (one per step)
may cross nodes. Without FSDP, `cfg x ulysses` must be the world size; with it, any divisor of it (the other ranks
repeat the same computation while holding their share of the weights).

Every rank draws the same initial noise (give every rank the same seed), sees the same velocity at every step and
returns the same output, rank 0 included: write files from rank 0 only. Call `parallelize` once, after moving the
pipeline to this rank's device and after any other `model_step_factory` switch (CUDA graphs): the cfg split wraps
the step that was set. A step cache (`enable_step_cache`) combines with cfg alone: under Ulysses or FSDP every rank
must run every layer. The pipe is duck-typed (a Cosmos 3 pipeline: `transformer`, `vae`, `model_step_factory`);
pipelines with their own loop (transfer) get Ulysses and FSDP, which live on the transformer, but not the cfg split.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor

from .models.attention import gen_attention
from .models.transformer_cosmos3 import Cosmos3Transformer

SHARDING = (None, "fsdp")
# `all_gather_into_tensor` became `all_gather_single` in PyTorch 2.13 (the old name warns); 2.11 has the old one.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class ParallelPlan:
    """What `parallelize` set up: the degrees and the rank mesh (None in a single process)."""

    cfg: int = 1
    ulysses: int = 1
    shard: str | None = None
    mesh: object = None  # torch.distributed.device_mesh.DeviceMesh over ("replicate", "cfg", "ulysses")

    def model_step(self, inner, pipe, layout, inputs):
        """The pipeline's model step on this rank's half of the guided batch, the halves gathered every step."""
        B = layout.batch_size
        if B % 2:  # an odd unguided batch: no halves
            return inner(pipe, layout, inputs)
        part, n = self.mesh.get_local_rank("cfg"), B // 2
        rows = slice(part * n, (part + 1) * n)
        half = pipe.transformer.build_layout(
            layout.samples[rows], temporal_compression=int(pipe.vae.config.scale_factor_temporal))
        step = inner(pipe, half, tuple(None if x is None else x[rows] for x in inputs))
        group = self.mesh.get_group("cfg")

        def split_step(vision, t, sound, action):
            out = step(vision[rows], t, *(None if x is None else x[rows] for x in (sound, action)))
            return tuple(None if o is None else _all_gather(o, group) for o in out)

        return split_step


def parallelize(pipe, *, cfg: int = 1, ulysses: int = 1, shard: str | None = None) -> ParallelPlan:
    """Split `pipe`'s generation over the ranks of the process group (see the module docstring); returns the plan.

    `cfg`: 1 or 2 ranks per guided batch. `ulysses`: ranks sharing a batch's generated tokens (it must divide the
    attention and key/value head counts). `shard`: None or "fsdp". Without a process group the world is this one
    process: only `cfg=1, ulysses=1` fit, and there is nothing to shard.
    """
    if isinstance(cfg, bool) or cfg not in (1, 2):
        raise ValueError(f"`cfg` must be 1 or 2 (a guided batch has two halves: the samples and their negatives), "
                         f"got {cfg!r}.")
    if isinstance(ulysses, bool) or not isinstance(ulysses, int) or ulysses < 1:
        raise ValueError(f"`ulysses` must be an int >= 1 (ranks sharing one batch's tokens), got {ulysses!r}.")
    if shard not in SHARDING:
        raise ValueError(f"`shard` must be one of {list(SHARDING)}, got {shard!r}.")
    model = getattr(pipe, "transformer", None)
    if not isinstance(model, Cosmos3Transformer):
        raise TypeError(f"`pipe` must be a Cosmos 3 pipeline (a `transformer` that is a Cosmos3Transformer), got "
                        f"{type(pipe).__name__} with transformer {type(model).__name__}.")
    done = getattr(model, "_parallel_plan", None)
    if done is not None:
        raise ValueError(f"`pipe`'s transformer is already parallelized (cfg={done.cfg}, ulysses={done.ulysses}, "
                         f"shard={done.shard!r}); build a new pipeline to change the plan.")
    if model.is_cache_enabled and (ulysses > 1 or shard is not None):
        # A step cache skips layers per sample: FSDP ranks would disagree on which layers gather their weights (a
        # hang), and under Ulysses the layers hold a token shard, not whole samples.
        raise ValueError(f"`ulysses`={ulysses} / `shard`={shard!r} do not combine with the step cache enabled on "
                         "this transformer (`enable_step_cache`); disable it first, or use cfg alone.")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    ranks = cfg * ulysses
    if world % ranks:
        raise ValueError(f"`cfg` x `ulysses` = {cfg} x {ulysses} = {ranks} must divide the world size {world}.")
    if shard is None and ranks != world:
        raise ValueError(f"`cfg` x `ulysses` = {ranks} must equal the world size {world} without `shard`: the "
                         f"other ranks would only repeat the work. Launch {ranks} processes, or add shard='fsdp' "
                         "to spread the weights over all of them.")
    config = model.config
    if ulysses > 1 and (config.num_attention_heads % ulysses or config.num_key_value_heads % ulysses):
        raise ValueError(f"`ulysses`={ulysses} must divide the attention heads ({config.num_attention_heads}) and the "
                         f"key/value heads ({config.num_key_value_heads}): each rank attends with its share of both.")
    if world == 1:
        return ParallelPlan(cfg, ulysses, shard)

    from torch.distributed.device_mesh import init_device_mesh

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world // ranks, cfg, ulysses),
                            mesh_dim_names=("replicate", "cfg", "ulysses"))
    plan = ParallelPlan(cfg, ulysses, shard, mesh)
    if ulysses > 1:
        _Ulysses(model, mesh, ulysses).install()
    if shard == "fsdp":
        _fully_shard(model, init_device_mesh(device.type, (world,), mesh_dim_names=("shard",)))
    if cfg > 1:
        inner = pipe.model_step_factory or type(pipe).eager_model_step
        pipe.model_step_factory = partial(plan.model_step, inner)
    model._parallel_plan = plan
    return plan


def _all_gather(x: Tensor, group) -> Tensor:
    """`x` of every rank of `group`, stacked along dim 0 in rank order (equal shapes on every rank)."""
    x = x.contiguous()
    out = x.new_empty(group.size() * x.shape[0], *x.shape[1:])
    _all_gather_single(out, x, group=group)
    return out


def _fully_shard(model: Cosmos3Transformer, mesh) -> None:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # Frozen for inference; FSDP2 also accepts mixed dtypes in a group only when nothing trains (the time embedder
    # stays float32 in a bfloat16 model).
    model.requires_grad_(False)
    for layer in model.layers:
        # The text tower's projections and MLP in groups of their own: a denoising step runs the generation tower
        # only, and gathers only it (half of a layer's weights).
        attn = layer.self_attn
        for module in (attn.to_q, attn.to_k, attn.to_v, attn.to_out, layer.mlp):
            fully_shard(module, mesh=mesh)
        fully_shard(layer, mesh=mesh)
        register_fsdp_forward_method(layer, "forward_text")  # the text tower's decoding path (`text_logits`)
    # The embedding runs once per request and the LM head only for text: groups of their own, so a denoising
    # step does not gather them with the few small modules it uses around the layers.
    fully_shard(model.embed_tokens, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)
    # An explicit True: left to FSDP, the root keeps its gathered weights after forward, for a backward that
    # inference never runs.
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    for name in ("encode_text", "text_logits"):
        register_fsdp_forward_method(model, name)


class _Ulysses:
    """Ulysses on a transformer's generation tower, from outside the model: hooks on the decoder layers shard the
    generation stream (and its RoPE) by tokens at the first layer and gather it after the last, keep the text
    tower's keys/values for this rank's heads only, and each layer's `forward_gen` runs its attention on a head
    shard of every token between two all-to-alls."""

    def __init__(self, model: Cosmos3Transformer, mesh, degree: int):
        self.model, self.group = model, mesh.get_group("ulysses")
        self.degree, self.rank = degree, mesh.get_local_rank("ulysses")
        self.kv_heads = model.config.num_key_value_heads

    def install(self) -> None:
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            layer.register_forward_pre_hook(partial(self._enter, i == 0))
            layer.register_forward_hook(partial(self._leave, i == last))
            attn = layer.self_attn
            attn.forward_gen = partial(self._forward_gen, attn)

    # tokens <-> shards -------------------------------------------------------------------------------------

    def _shard(self, x: Tensor) -> Tensor:
        """This rank's rows of `x` `[N, ...]`: ceil(N / degree) of them, zero rows past the end."""
        size = -(-x.shape[0] // self.degree)
        part = x[self.rank * size : (self.rank + 1) * size]
        if part.shape[0] < size:  # the padding rows run through the per-token layers and are dropped at the end
            part = torch.cat([part, part.new_zeros(size - part.shape[0], *part.shape[1:])])
        return part

    def _to_heads(self, x: Tensor, tokens: int) -> Tensor:
        """`[S, h, D]` (this rank's tokens, all heads) -> `[tokens, h / degree, D]` (all tokens, this rank's heads)."""
        S, h, D = x.shape
        send = x.reshape(S, self.degree, h // self.degree, D).transpose(0, 1).contiguous()  # chunk j: rank j's heads
        recv = torch.empty_like(send)  # chunk i: rank i's tokens
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.view(self.degree * S, h // self.degree, D)[:tokens]

    def _to_tokens(self, y: Tensor, size: int) -> Tensor:
        """Inverse of `_to_heads`: `[tokens, h / degree, D]` -> `[size, h, D]`."""
        tokens, h, D = y.shape
        padded = y.new_zeros(self.degree * size, h, D)
        padded[:tokens] = y
        recv = torch.empty_like(padded)  # chunk j: this rank's tokens, rank j's heads
        dist.all_to_all_single(recv, padded, group=self.group)
        return recv.view(self.degree, size, h, D).transpose(0, 1).reshape(size, self.degree * h, D)

    def _heads(self, x: Tensor) -> Tensor:
        """This rank's key/value heads of text keys or values `[Nu, Hkv, D]` (as they are when already sharded)."""
        if x.shape[1] != self.kv_heads:
            return x
        n = self.kv_heads // self.degree
        return x[:, self.rank * n : (self.rank + 1) * n]

    # hooks -----------------------------------------------------------------------------------------------

    def _enter(self, first: bool, layer, args):
        und, gen, text_kv, rope, layout, backend = args  # as `Cosmos3Transformer._layer` calls a layer
        if gen is None:  # the text tower alone (`encode_text`)
            return None
        if torch.is_grad_enabled() and gen.requires_grad:
            # the all-to-alls are not differentiable: gradients would stop there without a word
            raise RuntimeError("Ulysses (`parallelize(ulysses=...)`) is for inference; run the model under "
                               "torch.no_grad().")
        gen_rope = tuple(self._shard(t) for t in rope[1])
        return und, self._shard(gen) if first else gen, text_kv, (rope[0], gen_rope), layout, backend

    def _leave(self, last: bool, layer, args, output):
        und, gen, text_kv = output
        if gen is None:  # building a text cache: made contiguous so that it holds only this rank's heads
            text_kv = tuple(self._heads(t).contiguous() for t in text_kv)
        elif last:
            gen = _all_gather(gen, self.group)[: sum(args[4].gen_lengths)]
        return und, gen, text_kv

    def _forward_gen(self, attn, x: Tensor, text_kv, rope, layout, backend: str) -> Tensor:
        """`Cosmos3Attention.forward_gen` on this rank's tokens `x` `[S, hidden]`. Its projections are repeated here
        because the values reach attention with no module call in between that could trade their shard."""
        cos, sin = rope
        q = attn._norm_rope(attn.norm_added_q, attn.add_q_proj(x).view(-1, attn.num_heads, attn.head_dim), cos, sin)
        k = attn._norm_rope(attn.norm_added_k, attn.add_k_proj(x).view(-1, attn.num_kv_heads, attn.head_dim), cos,
                            sin)
        v = attn.add_v_proj(x).view(-1, attn.num_kv_heads, attn.head_dim)
        tokens = sum(layout.gen_lengths)
        q, k, v = (self._to_heads(t, tokens) for t in (q, k, v))
        out = gen_attention(q, self._heads(text_kv[0]), self._heads(text_kv[1]), k, v, layout, backend)
        return attn.to_add_out(self._to_tokens(out, x.shape[0]).flatten(1))
