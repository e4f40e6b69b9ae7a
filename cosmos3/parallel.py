"""Several processes for one generation request, applied to a built pipeline from outside the model.

`parallelize(pipe, cfg=2, ulysses=4, shard="fsdp")`, in every process `torchrun` started (the process group joined
first, e.g. with `cosmos3.training.init_distributed`), splits each denoising step of `pipe` over the ranks:

* **CFG-parallel** (`cfg=2`): the guided batch is `[samples..., negatives...]`; each rank of a cfg pair runs the
  text tower and every step on its half only (its own layout and text cache), and the halves' velocities are
  gathered once per step. Any batch of B > 1 rows splits so (rank 0 of the pair the first ceil(B / 2) rows, rank 1
  the rest); a single sample runs whole on both ranks.
* **Ulysses sequence parallelism** (`ulysses=N`): the generation stream's tokens are sharded over N ranks for the
  generation tower's per-token layers (norms, projections, MLPs); around attention an all-to-all trades the token
  shard for a head shard, so each rank attends with every token of H/N query heads and Hkv/N key/value heads, and
  a second all-to-all trades back. The cached text keys/values are kept for those heads only (`encode_text` returns
  them so). The text tower (once per request) and the embeddings and heads around the layers run whole on each
  rank.
* **Ring attention** (`ulysses=N, sequence="ring"`, chosen by default when N does not divide the attention or
  key/value heads, e.g. GQA with 8 KV heads on 16 ranks): the same token shards, but attention stays sequence
  sharded: each rank's queries attend to the text keys/values (kept whole, all heads, on every rank) and to every
  rank's generated keys/values, passed around the group with send/recv (N - 1 hops per layer, the next chunk in
  flight while this one is attended), the partial results merged exactly with their log-sum-exp (online softmax).
* **FSDP** (`shard="fsdp"`): FSDP2 `fully_shard` over all ranks, of each decoder layer (the text tower's projections
  and MLP as groups of their own, so that a denoising step gathers the generation tower only), the token
  embedding, the LM head and the rest of the transformer: each rank holds 1/world of the weights and gathers them
  a layer at a time. For inference: the transformer's parameters stop requiring grad.
* **Tensor parallel** (`shard="tp"`): DTensor `ColwiseParallel`/`RowwiseParallel` over each layer's q/k/v/o
  projections and MLPs of both towers (each rank computes H/tp query and Hkv/tp key/value heads, its attention
  modules told their local head counts; the text cache holds those heads), the token embedding (vocabulary rows)
  and the LM head (vocabulary columns, logits gathered). The tp ranks are those of one cfg group: a `("cfg",
  "tp")` mesh, tp innermost (two all-reduces per tower and layer: keep a tp group inside a node), tp = world / cfg.
  Ulysses and ring split the same attention's heads or tokens and do not combine with tp (refused).
* **Parallel VAE decode** (`vae="frames"`): the Wan decoder's latent frames are split in contiguous chunks over
  all ranks. The decoder is causal in time with a bounded memory (each causal convolution caches its last two
  input frames), so a rank that starts `decoder_memory(vae)` latent frames before its chunk (fewer at the clip's
  start) rebuilds the causal cache exactly and decodes its frames as one process does; the pixel frames are
  gathered to every rank. The bound is 34 latent frames for the tiny test VAE and 44 for Wan 2.2's: the split
  saves decode time only for clips well over that many latent frames (long or chunked videos).

Without tp, the ranks form a `("replicate", "cfg", "ulysses")` DeviceMesh, Ulysses innermost, so that its
all-to-alls (four per layer: queries, keys, values, output) stay between neighbouring ranks (one node) and the cfg
gather (one per step) may cross nodes. Without FSDP, `cfg x ulysses` must be the world size; with it, any divisor
of it (the other ranks repeat the same computation while holding their share of the weights).

Every rank draws the same initial noise (give every rank the same seed), sees the same velocity at every step and
returns the same output, rank 0 included: write files from rank 0 only. Call `parallelize` once, after moving the
pipeline to this rank's device and after any other `model_step_factory` switch (CUDA graphs): the cfg split wraps
the step that was set. A step cache (`enable_step_cache`) combines with cfg alone: under Ulysses or FSDP every rank
must run every layer. The pipe is duck-typed (a Cosmos 3 pipeline: `transformer`, `vae`, `model_step_factory`);
transfer, which has its own loop, splits its branch batch (per sample: prompt with hints, without hints, negative)
through its `branch_step_factory` the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify as wan_unpatchify
from torch import Tensor

from .models.attention import gen_attention
from .models.transformer_cosmos3 import Cosmos3Transformer

SHARDING = (None, "fsdp", "tp")
SEQUENCE = (None, "ulysses", "ring")
VAE_SPLIT = (None, "frames")
# A ring attention chunk's float32 scores are computed this many bytes of query rows at a time.
_RING_TILE_BYTES = 256 << 20
# `all_gather_into_tensor` became `all_gather_single` in PyTorch 2.13 (the old name warns); 2.11 has the old one.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class ParallelPlan:
    """What `parallelize` set up: the degrees and the rank mesh (None in a single process)."""

    cfg: int = 1
    ulysses: int = 1
    shard: str | None = None
    mesh: object = None  # DeviceMesh over ("replicate", "cfg", "ulysses"), or ("cfg", "tp") with shard="tp"
    sequence: str | None = None  # "ulysses" or "ring" when ulysses > 1
    tp: int = 1
    vae: str | None = None

    def model_step(self, inner, pipe, layout, inputs):
        """The pipeline's model step on this rank's part of the batch, the parts gathered every step."""
        B = layout.batch_size
        if B == 1:  # nothing to split
            return inner(pipe, layout, inputs)
        n = -(-B // 2)
        parts = [slice(0, n), slice(n, B)]
        rows = parts[self.mesh.get_local_rank("cfg")]
        half = pipe.transformer.build_layout(
            layout.samples[rows], temporal_compression=int(pipe.vae.config.scale_factor_temporal))
        step = inner(pipe, half, tuple(None if x is None else x[rows] for x in inputs))
        group = self.mesh.get_group("cfg")

        def split_step(vision, t, sound, action):
            full = (vision, sound, action)
            mine, mine_sound, mine_action = (None if x is None else x[rows] for x in full)
            out = step(mine, t, mine_sound, mine_action)
            return tuple(None if o is None else _gather_rows(o, x, parts, group) for o, x in zip(out, full))

        return split_step


def parallelize(pipe, *, cfg: int = 1, ulysses: int = 1, shard: str | None = None, sequence: str | None = None,
                vae: str | None = None) -> ParallelPlan:
    """Split `pipe`'s generation over the ranks of the process group (see the module docstring); returns the plan.

    `cfg`: 1 or 2 ranks per guided batch. `ulysses`: ranks sharing a batch's generated tokens. `sequence`: how
    they attend, "ulysses" (head all-to-all; the degree must divide the attention and key/value heads) or "ring"
    (K/V passed around); None picks "ulysses" when the heads divide, else "ring". `shard`: None, "fsdp" or "tp".
    `vae`: None or "frames" (the VAE decode split by latent frames over all ranks). Without a process group the
    world is this one process: only `cfg=1, ulysses=1` fit, and there is nothing to shard or split.
    """
    if isinstance(cfg, bool) or cfg not in (1, 2):
        raise ValueError(f"`cfg` must be 1 or 2 (a guided batch has two halves: the samples and their negatives), "
                         f"got {cfg!r}.")
    if isinstance(ulysses, bool) or not isinstance(ulysses, int) or ulysses < 1:
        raise ValueError(f"`ulysses` must be an int >= 1 (ranks sharing one batch's tokens), got {ulysses!r}.")
    if shard not in SHARDING:
        raise ValueError(f"`shard` must be one of {list(SHARDING)}, got {shard!r}.")
    if sequence not in SEQUENCE:
        raise ValueError(f"`sequence` must be one of {list(SEQUENCE)}, got {sequence!r}.")
    if sequence is not None and ulysses == 1:
        raise ValueError(f"`sequence`={sequence!r} chooses how `ulysses` ranks attend; it needs `ulysses` > 1.")
    if vae not in VAE_SPLIT:
        raise ValueError(f"`vae` must be one of {list(VAE_SPLIT)}, got {vae!r}.")
    model = getattr(pipe, "transformer", None)
    if not isinstance(model, Cosmos3Transformer):
        raise TypeError(f"`pipe` must be a Cosmos 3 pipeline (a `transformer` that is a Cosmos3Transformer), got "
                        f"{type(pipe).__name__} with transformer {type(model).__name__}.")
    if vae is not None and not isinstance(pipe.vae, AutoencoderKLWan):
        raise TypeError(f"`vae`={vae!r} splits a diffusers AutoencoderKLWan decode; `pipe.vae` is "
                        f"{type(pipe.vae).__name__}.")
    done = getattr(model, "_parallel_plan", None)
    if done is not None:
        raise ValueError(f"`pipe`'s transformer is already parallelized (cfg={done.cfg}, ulysses={done.ulysses}, "
                         f"shard={done.shard!r}); build a new pipeline to change the plan.")
    if model.is_cache_enabled and (ulysses > 1 or shard is not None):
        # A step cache skips layers per sample: FSDP ranks would disagree on which layers gather their weights (a
        # hang), and under Ulysses the layers hold a token shard, not whole samples.
        raise ValueError(f"`ulysses`={ulysses} / `shard`={shard!r} do not combine with the step cache enabled on "
                         "this transformer (`enable_step_cache`); disable it first, or use cfg alone.")
    if shard == "tp" and ulysses > 1:
        raise ValueError(f"`shard`='tp' splits the attention heads over the ranks of a cfg group, and `ulysses`="
                         f"{ulysses} the same attention's tokens or heads: they do not combine. Use tp with cfg, "
                         "or ulysses with fsdp.")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    ranks = cfg * ulysses
    if world % ranks:
        raise ValueError(f"`cfg` x `ulysses` = {cfg} x {ulysses} = {ranks} must divide the world size {world}.")
    if shard is None and ranks != world:
        raise ValueError(f"`cfg` x `ulysses` = {ranks} must equal the world size {world} without `shard`: the "
                         f"other ranks would only repeat the work. Launch {ranks} processes, or add shard='fsdp' "
                         "to spread the weights over all of them.")
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if ulysses > 1:
        divides = not (heads % ulysses or kv_heads % ulysses)
        sequence = sequence or ("ulysses" if divides else "ring")
        if sequence == "ulysses" and not divides:
            raise ValueError(f"`ulysses`={ulysses} must divide the attention heads ({heads}) and the key/value "
                             f"heads ({kv_heads}) with sequence='ulysses': each rank attends with its share of both. "
                             "sequence='ring' (or None) takes any degree.")
    tp = world // cfg if shard == "tp" else 1
    if tp > 1:
        for name, size in (("attention heads", heads), ("key/value heads", kv_heads),
                           ("MLP width (intermediate_size)", config.intermediate_size)):
            if size % tp:
                raise ValueError(f"`shard`='tp' over {tp} ranks (world {world} / cfg {cfg}) must divide the "
                                 f"{name} ({size}).")
    if world == 1:
        return ParallelPlan(cfg, ulysses, shard, sequence=sequence, vae=vae)

    from torch.distributed.device_mesh import init_device_mesh

    device = next(model.parameters()).device
    if shard == "tp":
        mesh = init_device_mesh(device.type, (cfg, tp), mesh_dim_names=("cfg", "tp"))
    else:
        mesh = init_device_mesh(device.type, (world // ranks, cfg, ulysses),
                                mesh_dim_names=("replicate", "cfg", "ulysses"))
    plan = ParallelPlan(cfg, ulysses, shard, mesh, sequence, tp, vae)
    if ulysses > 1:
        _Sequence(model, mesh, ulysses, sequence).install()
    if shard == "fsdp":
        _fully_shard(model, init_device_mesh(device.type, (world,), mesh_dim_names=("shard",)))
    if shard == "tp":
        _tensor_parallel(model, mesh["tp"], tp)
    if cfg > 1:
        inner = pipe.model_step_factory or type(pipe).eager_model_step
        pipe.model_step_factory = partial(plan.model_step, inner)
        if hasattr(pipe, "branch_step_factory"):  # transfer: its own loop over a batch of guidance branches
            inner = pipe.branch_step_factory or type(pipe).eager_model_step
            pipe.branch_step_factory = partial(plan.model_step, inner)
    if vae == "frames":
        pipe.vae.decode = _FrameDecode(pipe.vae, dist.group.WORLD)
    model._parallel_plan = plan
    return plan


def _all_gather(x: Tensor, group) -> Tensor:
    """`x` of every rank of `group`, stacked along dim 0 in rank order (equal shapes on every rank)."""
    x = x.contiguous()
    out = x.new_empty(group.size() * x.shape[0], *x.shape[1:])
    _all_gather_single(out, x, group=group)
    return out


def _gather_flat(pieces: list[Tensor], shapes: list[list[tuple]], group) -> list[Tensor]:
    """Every rank's `pieces` (rank r's of `shapes[r]`, known on every rank; at least one on each), in rank order:
    one all-gather of the flattened pieces, padded to the longest rank's."""
    sizes = [sum(math.prod(s) for s in rank) for rank in shapes]
    flat = torch.cat([p.reshape(-1) for p in pieces])
    buffer = flat.new_zeros(max(sizes))
    buffer[: flat.numel()] = flat
    gathered = _all_gather(buffer[None], group)  # [ranks, max]
    out = []
    for r, rank in enumerate(shapes):
        start = 0
        for shape in rank:
            n = math.prod(shape)
            out.append(gathered[r, start : start + n].view(shape))
            start += n
    return out


def _gather_rows(o, x, parts: list[slice], group):
    """The model output `o` for this rank's rows of the batch input `x`, completed with the other ranks' rows: a
    tensor (rows along dim 0) or, for list inputs, a list with one tensor per row (the input's shapes)."""
    if isinstance(o, Tensor):
        shapes = [[(p.stop - p.start, *o.shape[1:])] for p in parts]
        return torch.cat(_gather_flat([o], shapes, group))
    shapes = [[tuple(t.shape) for t in x[p]] for p in parts]
    return _gather_flat(list(o), shapes, group)


def _tensor_parallel(model: Cosmos3Transformer, mesh, degree: int) -> None:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model.requires_grad_(False)  # for inference, as FSDP
    for layer in model.layers:
        plan = {f"self_attn.{name}": ColwiseParallel()
                for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
        plan |= {"self_attn.to_out": RowwiseParallel(), "self_attn.to_add_out": RowwiseParallel()}
        for mlp in ("mlp", "mlp_moe_gen"):
            plan |= {f"{mlp}.up_proj": ColwiseParallel(), f"{mlp}.down_proj": RowwiseParallel()}
            if model.config.hidden_act == "silu":
                plan[f"{mlp}.gate_proj"] = ColwiseParallel()
        parallelize_module(layer, mesh, plan)
        # The column-sharded projections return this rank's heads (local tensors): the attention reshapes them
        # with its local head counts; q/k norms act per head, so they stay whole.
        attn = layer.self_attn
        attn.num_heads //= degree
        attn.num_kv_heads //= degree
    # Vocabulary-sharded: the embedding's rows (its outputs summed over the ranks), the LM head's columns (the
    # logits gathered).
    parallelize_module(model, mesh, {"embed_tokens": RowwiseParallel(input_layouts=Replicate()),
                                     "lm_head": ColwiseParallel(output_layouts=Replicate())})


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


class _Sequence:
    """Sequence parallelism on a transformer's generation tower, from outside the model: hooks on the decoder layers
    shard the generation stream (and its RoPE) by tokens at the first layer and gather it after the last. Each
    layer's `forward_gen` then attends either on a head shard of every token between two all-to-alls (Ulysses;
    the text tower's keys/values kept for this rank's heads only) or on this rank's query tokens over every rank's
    keys/values passed around the group (ring; the text keys/values kept whole)."""

    def __init__(self, model: Cosmos3Transformer, mesh, degree: int, mode: str):
        self.model, self.group, self.mode = model, mesh.get_group("ulysses"), mode
        self.degree, self.rank = degree, mesh.get_local_rank("ulysses")
        self.kv_heads = model.config.num_key_value_heads
        ranks = dist.get_process_group_ranks(self.group)  # the ring's neighbours, as global ranks
        self.send_to, self.receive_from = ranks[(self.rank + 1) % degree], ranks[(self.rank - 1) % degree]

    def install(self) -> None:
        last = len(self.model.layers) - 1
        forward = self._forward_gen if self.mode == "ulysses" else self._forward_ring
        for i, layer in enumerate(self.model.layers):
            layer.register_forward_pre_hook(partial(self._enter, i == 0))
            layer.register_forward_hook(partial(self._leave, i == last))
            attn = layer.self_attn
            attn.forward_gen = partial(forward, attn)

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
        """This rank's key/value heads of text keys or values `[Nu, Hkv, D]` (as they are when already sharded, and
        all of them for the ring)."""
        if self.mode == "ring" or x.shape[1] != self.kv_heads:
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

    def _forward_ring(self, attn, x: Tensor, text_kv, rope, layout, backend: str) -> Tensor:
        """`Cosmos3Attention.forward_gen` on this rank's tokens `x` `[S, hidden]` with ring attention: every head,
        the other ranks' generated keys/values received one rank's shard at a time. `backend` is not used: the
        chunks attend through `_attend_chunk` (a mask per chunk, float32 scores, the log-sum-exp returned)."""
        cos, sin = rope
        q = attn._norm_rope(attn.norm_added_q, attn.add_q_proj(x).view(-1, attn.num_heads, attn.head_dim), cos, sin)
        k = attn._norm_rope(attn.norm_added_k, attn.add_k_proj(x).view(-1, attn.num_kv_heads, attn.head_dim), cos,
                            sin)
        v = attn.add_v_proj(x).view(-1, attn.num_kv_heads, attn.head_dim)
        S, device = x.shape[0], x.device
        # the sample of each generated token, -1 for the padding rows of the last shard (attending to nothing)
        gen_ids = layout.to_device("gen_sample_ids", device)
        gen_ids = torch.cat([gen_ids, gen_ids.new_full((self.degree * S - gen_ids.numel(),), -1)])
        q_ids = gen_ids[self.rank * S : (self.rank + 1) * S]
        acc = _attend_chunk(q, text_kv[0], text_kv[1], q_ids, layout.to_device("und_sample_ids", device))
        chunk = torch.cat([k, v], dim=1).contiguous()  # [S, 2 Hkv, D]: one message per hop
        for hop in range(self.degree):
            requests = []
            if hop < self.degree - 1:  # the next chunk travels while this one is attended
                incoming = torch.empty_like(chunk)
                requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, chunk, self.send_to, self.group),
                                                   dist.P2POp(dist.irecv, incoming, self.receive_from, self.group)])
            owner = (self.rank - hop) % self.degree  # whose tokens `chunk` holds
            h = chunk.shape[1] // 2
            acc = _merge(acc, _attend_chunk(q, chunk[:, :h], chunk[:, h:], q_ids,
                                            gen_ids[owner * S : (owner + 1) * S]))
            for request in requests:
                request.wait()
            if requests:
                chunk = incoming
        return attn.to_add_out(acc[0].to(q.dtype).flatten(1))


def _attend_chunk(q: Tensor, k: Tensor, v: Tensor, q_ids: Tensor, k_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Attention of queries `q` `[S, H, D]` over one chunk of keys/values `[K, Hkv, D]`, each query to the keys of
    its own sample (`q_ids` `[S]`, `k_ids` `[K]`; -1 matches nothing). Returns the float32 output `[S, H, D]` and
    log-sum-exp `[S, H]` (-inf and a zero output for a query with no key here)."""
    S, H, D = q.shape
    K, Hkv, _ = k.shape
    G = H // Hkv
    k_t = (k.float() * D**-0.5).permute(1, 2, 0)  # [Hkv, D, K]
    v_h = v.float().transpose(0, 1)  # [Hkv, K, D]
    out, lse = q.new_zeros(S, H, D, dtype=torch.float32), q.new_full((S, H), -math.inf, dtype=torch.float32)
    tokens = max(1, _RING_TILE_BYTES // (4 * H * max(K, 1)))
    for start in range(0, S, tokens):
        t = min(tokens, S - start)
        keep = (q_ids[start : start + t, None] == k_ids[None, :]) & (k_ids[None, :] >= 0)  # [t, K]
        # the G query heads of a key/value head as rows (query head h reads key/value head h // G)
        rows = q[start : start + t].float().reshape(t, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * t, D)
        scores = torch.bmm(rows, k_t).masked_fill(~keep.repeat(G, 1), -math.inf)  # [Hkv, G t, K]
        m = torch.logsumexp(scores, dim=-1)  # [Hkv, G t]
        p = torch.exp(scores - torch.where(torch.isinf(m), 0.0, m)[..., None])
        o = torch.bmm(p, v_h)  # [Hkv, G t, D]
        out[start : start + t] = o.view(Hkv, G, t, D).permute(2, 0, 1, 3).reshape(t, H, D)
        lse[start : start + t] = m.view(Hkv, G, t).permute(2, 0, 1).reshape(t, H)
    return out, lse


def _merge(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Two partial attentions of the same queries over disjoint keys, as one: weighted by their softmax masses."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    out = out_a * torch.exp(lse_a - safe)[..., None] + out_b * torch.exp(lse_b - safe)[..., None]
    return out, lse


# ---------------------------------------------------------------------------------------------------------------
# Parallel VAE decode
# ---------------------------------------------------------------------------------------------------------------


def decoder_memory(vae: AutoencoderKLWan) -> int:
    """How many latent frames back a Wan VAE decoder's output can depend on (an upper bound): each causal
    convolution looks back its temporal padding in frames of its own rate, a temporal upsampler doubles the rate."""
    rate, frames, upsamplers = 1, 0, set()
    for module in vae.decoder.modules():  # registration order is the decoder's order of execution
        if isinstance(module, WanResample) and module.mode == "upsample3d":
            frames += math.ceil(module.time_conv._padding[4] / rate)
            upsamplers.add(module.time_conv)
            rate *= 2
        elif isinstance(module, WanCausalConv3d) and module not in upsamplers and module._padding[4]:
            frames += math.ceil(module._padding[4] / rate)
    return frames


def decode_frames(vae: AutoencoderKLWan, x: Tensor, start: int, stop: int, warmup: int) -> Tensor:
    """The decoder's output `[B, C, t, H, W]` for latent frames `[start, stop)` of `x` (after `post_quant_conv`),
    its causal cache rebuilt from the `warmup` frames before `start` (all of them from the clip's start, as
    `AutoencoderKLWan` decodes, when `warmup` >= `start` or >= `decoder_memory(vae)`)."""
    begin = max(0, start - warmup)
    cache = [None] * vae._cached_conv_counts["decoder"]
    outs = []
    for i in range(begin, stop):
        out = vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == begin)
        if i >= start:
            outs.append(out)
    return torch.cat(outs, dim=2)


class _FrameDecode:
    """`AutoencoderKLWan.decode` with the latent frames split over the ranks of `group` (the VAE instance's
    `decode`): balanced contiguous chunks, each rank warming its causal cache on the `decoder_memory` frames
    before its own, the pixel frames gathered. A tiled decode, or fewer latent frames than ranks, runs whole."""

    def __init__(self, vae: AutoencoderKLWan, group):
        self.vae, self.group, self.whole = vae, group, vae.decode
        self.warmup = decoder_memory(vae)

    @torch.no_grad()
    def __call__(self, z: Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DecoderOutput

        vae, ranks, T = self.vae, self.group.size(), z.shape[2]
        if vae.use_tiling or ranks > T:
            return self.whole(z, return_dict=return_dict)
        rank = self.group.rank()
        counts = [T // ranks + (r < T % ranks) for r in range(ranks)]
        starts = [sum(counts[:r]) for r in range(ranks)]
        start = starts[rank]
        begin = max(0, start - self.warmup)
        x = vae.post_quant_conv(z[:, :, begin : start + counts[rank]])  # a 1x1x1 convolution: per frame
        mine = decode_frames(vae, x, start - begin, x.shape[2], self.warmup)
        tf = int(vae.config.scale_factor_temporal)
        # pixel frames per rank: the clip's first latent frame decodes to one, every other to `tf`
        frames = [tf * n - (tf - 1 if s == 0 else 0) for n, s in zip(counts, starts)]
        rest = tuple(mine.shape[3:])
        shapes = [[(mine.shape[0], mine.shape[1], n, *rest)] for n in frames]
        out = torch.cat(_gather_flat([mine], shapes, self.group), dim=2)
        if vae.config.patch_size is not None:
            out = wan_unpatchify(out, patch_size=vae.config.patch_size)
        out = out.clamp(-1.0, 1.0)
        return DecoderOutput(sample=out) if return_dict else (out,)
