"""The timestep-embedding add of `Cosmos3Transformer.forward`: each noisy gen-stream token gets its sample's
embedding, in one pass.

Eagerly, `hidden.index_add(0, index, temb[gen_sample_ids[index]])` gathers a `[M, hidden]` copy of the embeddings
(one row per noisy token), copies the whole `[N, hidden]` stream, then reads the gathered rows again to add them.
Fused, the stream is read once and written once, and each token reads its sample's `[hidden]` row (B rows in all,
which stay in cache). Only a `[N]` per-token count is built on the side, which also keeps `index_add`'s meaning
for repeated rows (added once per occurrence).

The model performs this add in `Cosmos3TimestepEmbedding.add_to`, which `apply_fused_kernels` overrides with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import can_launch, cdiv, check_tensor, jit, next_power_of_2, round_to, tl

INDEX_DTYPES = (torch.int32, torch.int64)


def add_timestep_embedding_reference(hidden: Tensor, temb: Tensor, index: Tensor, sample_ids: Tensor) -> Tensor:
    """`hidden.index_add(0, index, temb[sample_ids[index]])`: row `index[i]` of the `[N, D]` stream gets the
    `[B, D]` embedding of its sample `sample_ids[index[i]]`."""
    return hidden.index_add(0, index, temb[sample_ids[index]])


@jit
def _add_timestep_kernel(
    hidden_ptr, temb_ptr, count_ptr, sample_ptr, out_ptr, n_rows, dim, stride_h, stride_t,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < dim)[None, :]
    count = tl.load(count_ptr + rows, mask=row_mask, other=0.0)
    sample = tl.load(sample_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    h = tl.load(hidden_ptr + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # Clean tokens (count 0) never touch the embedding table.
    t = tl.load(temb_ptr + sample[:, None] * stride_t + cols[None, :], mask=mask & (count != 0)[:, None], other=0.0)
    out_dtype = out_ptr.dtype.element_ty
    out = round_to(h + count[:, None] * t.to(tl.float32), out_dtype)
    tl.store(out_ptr + rows[:, None] * dim + cols[None, :], out.to(out_dtype), mask=mask)


def add_timestep_embedding(hidden: Tensor, temb: Tensor, index: Tensor, sample_ids: Tensor) -> Tensor:
    """Add each sample's timestep embedding to its noisy tokens of the packed gen stream (out of place).

    Args:
        hidden: the gen stream `[N, D]`, float32/bfloat16/float16.
        temb: per-sample embeddings `[B, D]`, in hidden's dtype (the model casts them first).
        index: `[M]` int32/int64 stream rows to add to (the layout's `*_noisy_index`).
        sample_ids: `[N]` int32/int64 sample of every stream row (the layout's `gen_sample_ids`), each in [0, B).

    Runs the Triton kernel on CUDA (or under `TRITON_INTERPRET=1`), the eager reference otherwise.
    """
    check_tensor("hidden", hidden, ndim=2)
    check_tensor("temb", temb, ndim=2, device=hidden.device)
    check_tensor("index", index, ndim=1, dtypes=INDEX_DTYPES, device=hidden.device)
    check_tensor("sample_ids", sample_ids, ndim=1, dtypes=INDEX_DTYPES, device=hidden.device)
    n, dim = hidden.shape
    if temb.shape[1] != dim:
        raise ValueError(f"`temb` must have shape (B, {dim}) for hidden of shape {tuple(hidden.shape)}, "
                         f"got {tuple(temb.shape)}.")
    if temb.dtype != hidden.dtype:
        raise TypeError(f"`temb` must have hidden's dtype {hidden.dtype}, got {temb.dtype}; cast it first.")
    if sample_ids.shape[0] != n:
        raise ValueError(f"`sample_ids` must have one entry per row of hidden ({n}), got {sample_ids.shape[0]}.")
    if not can_launch(_add_timestep_kernel, hidden):
        return add_timestep_embedding_reference(hidden, temb, index, sample_ids)

    out = torch.empty((n, dim), dtype=hidden.dtype, device=hidden.device)
    if n == 0 or dim == 0:
        return out
    # index_add also range-checks `index`, as the eager path would.
    count = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add_(
        0, index, torch.ones(index.shape[0], dtype=torch.float32, device=hidden.device)
    )
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    temb = temb if temb.stride(1) == 1 else temb.contiguous()
    block_d = min(next_power_of_2(dim), 1024)
    block_r = min(max(1, 4096 // block_d), next_power_of_2(n))
    _add_timestep_kernel[(cdiv(n, block_r), cdiv(dim, block_d))](
        hidden, temb, count, sample_ids.contiguous(), out, n, dim, hidden.stride(0), temb.stride(0),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return out
