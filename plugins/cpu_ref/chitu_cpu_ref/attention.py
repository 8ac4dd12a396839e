"""Paged attention: ``chitu_store_kv``, MHA/GQA prefill and decode, MLA prefill and decode.

Every variant reduces to one formula, ``_causal_attention``, applied one
sequence at a time to that sequence's context gathered from the paged cache
into a contiguous copy. MLA in absorbed form is the same formula with one kv
head whose key is ``[c, k_pe]`` and whose value is ``c``.
"""

from __future__ import annotations

import torch

from chitu_core.hookspecs import hookimpl

QUERIES_PER_CHUNK = 256


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence: ``[length, Hkv, D]`` (a copy)."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = block_table[:num_blocks].long()
    return cache[blocks].flatten(0, 1)[:length]


def _causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of the last ``n`` positions of a context over all of it, in fp64.

    q ``[n, Hq, D]``, k ``[L, Hkv, D]``, v ``[L, Hkv, Dv]`` with ``n <= L``; query
    ``i`` sits at position ``L - n + i`` and sees keys ``0..`` that position.
    Query head ``h`` reads kv head ``h // (Hq // Hkv)``. Returns ``[n, Hq, Dv]`` fp64.
    """
    num_queries, num_heads, head_dim = q.shape
    context_len, num_kv_heads = k.shape[:2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not share {num_kv_heads} kv heads evenly")
    # Head h = kv * group + g reads kv head h // group; the view says so without
    # materialising repeated keys.
    group = num_heads // num_kv_heads
    q = q.double().view(num_queries, num_kv_heads, group, head_dim)
    scores = torch.einsum("qhgd,khd->hgqk", q, k.double()) * scale  # [Hkv, group, n, L]
    query_pos = torch.arange(context_len - num_queries, context_len)
    key_pos = torch.arange(context_len)
    is_visible = key_pos[None, :] <= query_pos[:, None]  # [n, L]
    scores = scores.masked_fill(~is_visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hgqk,khd->qhgd", probs, v.double())  # [n, Hkv, group, Dv]
    return out.reshape(num_queries, num_heads, -1)


def _varlen(q, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, scale, dv, dtype):
    """Shared body of every attention hook: q ``[T, Hq, D]`` -> ``[T, Hq, dv]`` in ``dtype``.

    ``value_cache`` None means the values are the keys' leading ``dv`` channels (MLA).
    """
    out = torch.empty(q.shape[0], q.shape[1], dv, dtype=dtype, device=q.device)
    starts, lengths = cu_seqlens_q.tolist(), context_lens.tolist()
    for b, context_len in enumerate(lengths):
        begin, end = starts[b], starts[b + 1]
        if end - begin > context_len:
            raise ValueError(
                f"sequence {b}: {end - begin} new tokens but context_lens is {context_len}; "
                "store the new tokens' keys first and count them in context_lens"
            )
        k = _gather_context(key_cache, block_tables[b], context_len)
        v = k if value_cache is None else _gather_context(value_cache, block_tables[b], context_len)
        # Queries in chunks bound the fp64 scores of a long prefill; a chunk
        # needs the context only up to its last query's position.
        first_pos = context_len - (end - begin)
        for i in range(begin, end, QUERIES_PER_CHUNK):
            stop = min(i + QUERIES_PER_CHUNK, end)
            num_visible = first_pos + (stop - begin)
            attended = _causal_attention(q[i:stop], k[:num_visible], v[:num_visible, :, :dv], scale)
            out[i:stop] = attended.to(dtype)
    return out


def _one_query_each(batch: int) -> torch.Tensor:
    """Decode as prefill: cu_seqlens_q ``[B + 1]`` of one query per sequence."""
    return torch.arange(batch + 1, dtype=torch.int32)


@hookimpl
def chitu_store_kv(
    key: torch.Tensor,
    value: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token ``t`` to flat slot ``slot_mapping[t]`` of the caches, in place."""
    slots = slot_mapping.long()
    # view (not reshape) fails loudly rather than writing into a copy.
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key.to(key_cache.dtype)
    if value is not None:
        value_cache.view(-1, *value_cache.shape[2:])[slots] = value.to(value_cache.dtype)


@hookimpl
def chitu_paged_attention_prefill(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal varlen attention, q ``[T, Hq, D]`` -> ``[T, Hq, Dv]`` (see the spec)."""
    dv = value_cache.shape[-1]
    return _varlen(
        q, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, scale, dv, q.dtype
    )


@hookimpl
def chitu_paged_attention_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence, q ``[B, Hq, D]`` -> ``[B, Hq, Dv]`` (see the spec)."""
    cu_seqlens_q = _one_query_each(q.shape[0])
    dv = value_cache.shape[-1]
    return _varlen(
        q, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, scale, dv, q.dtype
    )


def _mla(q_latent, q_rope, latent_cache, block_tables, cu_seqlens_q, context_lens, scale):
    """MLA as attention with one kv head: key ``[c, k_pe]``, value ``c``."""
    rank, rope_dim = q_latent.shape[-1], q_rope.shape[-1]
    q = torch.cat([q_latent.double(), q_rope.double()], dim=-1)  # [T, Hq, R + P]
    keys = latent_cache[..., : rank + rope_dim]
    return _varlen(
        q, keys, None, block_tables, cu_seqlens_q, context_lens, scale, rank, q_latent.dtype
    )


@hookimpl
def chitu_mla_prefill(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA, causal varlen: ``[T, Hq, R]`` latent-space output (see the spec)."""
    return _mla(q_latent, q_rope, latent_cache, block_tables, cu_seqlens_q, context_lens, scale)


@hookimpl
def chitu_mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA decode: ``[B, Hq, R]`` latent-space output (see the spec)."""
    cu_seqlens_q = _one_query_each(q_latent.shape[0])
    return _mla(q_latent, q_rope, latent_cache, block_tables, cu_seqlens_q, context_lens, scale)
