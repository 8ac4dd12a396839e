"""Generic attention over the paged KV cache: gather, mask, fp32 softmax.

Both MHA/GQA and MLA go through one masked-attention core. MLA in the
absorbed form is multi-query attention with a single kv "head": the query is
``[q_latent, q_rope]``, the key is the cached ``[c, k_pe]`` row and the value
is ``c``, so ``q_latent . c + q_rope . k_pe`` is one dot product.

Scores, softmax and the value product are computed in fp32 (the inputs are
widened) so that the generic path is as close to the fp32 reference as the
inputs allow; the result is rounded once to the query dtype.
"""

from __future__ import annotations

import torch

# Upper bound on the fp32 score elements of one prefill chunk (1 GiB): long
# prompts are processed in query chunks instead of one [n, Hq, L] tensor.
_MAX_SCORE_ELEMENTS = 1 << 28


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor,
) -> None:
    """See ``chitu_core.hookspecs.chitu_store_kv``. One indexed write per cache."""
    if (value is None) != (value_cache is None):
        raise ValueError("value and value_cache must both be given or both be None")
    block_size = key_cache.shape[1]
    slots = slot_mapping.long()
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key.to(key_cache.dtype)
    if value is not None:
        value_cache[blocks, offsets] = value.to(value_cache.dtype)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked GQA attention, fp32 throughout.

    q: [B, S, Hq, D]; k: [B, L, Hkv, D]; v: [B, L, Hkv, Dv]; allowed: [B, S, L]
    bool (True where query s may see key l). Returns [B, S, Hq, Dv] fp32.
    Query head h reads kv head h // (Hq // Hkv).
    """
    batch, num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})"
        )
    group = num_heads // num_kv_heads
    qg = q.float().reshape(batch, num_q, num_kv_heads, group, head_dim)
    scores = torch.einsum("bskgd,blkd->bkgsl", qg, k.float()) * scale  # [B, Hkv, G, S, L]
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bkgsl,blkd->bskgd", probs, v.float())  # [B, S, Hkv, G, Dv]
    return out.reshape(batch, num_q, num_heads, v.shape[-1])


def paged_attention_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_paged_attention_decode``.

    Every sequence's blocks are gathered into a padded [B, max_blocks *
    block_size, Hkv, D] view (the table width bounds the length, so nothing
    is read on the host) and positions >= context_lens are masked.
    """
    block_size = key_cache.shape[1]
    max_len = block_tables.shape[1] * block_size
    lens = context_lens.long()[:, None]  # [B, 1]
    # Table entries past a sequence's end are "ignored" by the spec, so they
    # may hold anything; point them at block 0 so the gather stays in range.
    block_starts = torch.arange(block_tables.shape[1], device=q.device) * block_size
    tables = torch.where(block_starts < lens, block_tables.long(), 0)  # [B, max_blocks]
    k = key_cache[tables].flatten(1, 2)  # [B, max_len, Hkv, D]
    v = value_cache[tables].flatten(1, 2)  # [B, max_len, Hkv, Dv]
    allowed = (torch.arange(max_len, device=q.device) < lens)[:, None]  # [B, 1, max_len]
    out = _attend(q[:, None], k, v, allowed, scale)  # [B, 1, Hq, Dv]
    return out[:, 0].to(q.dtype)


def paged_attention_prefill(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_paged_attention_prefill``.

    A loop over sequences (their lengths are read on the host, the one sync
    of this op): each gathers its own context and attends causally, in query
    chunks that keep the fp32 score tensor under 1 GiB.
    """
    num_tokens, num_heads = q.shape[:2]
    block_size = key_cache.shape[1]
    out = q.new_empty(num_tokens, num_heads, value_cache.shape[-1])
    cu_seqlens = cu_seqlens_q.tolist()
    ctx_lens = context_lens.tolist()
    for b, ctx_len in enumerate(ctx_lens):
        q_start, q_end = cu_seqlens[b], cu_seqlens[b + 1]
        if q_end == q_start:
            continue
        num_blocks = -(-ctx_len // block_size)
        blocks = block_tables[b, :num_blocks].long()
        k = key_cache[blocks].flatten(0, 1)[None, :ctx_len]  # [1, L, Hkv, D]
        v = value_cache[blocks].flatten(0, 1)[None, :ctx_len]  # [1, L, Hkv, Dv]
        key_pos = torch.arange(ctx_len, device=q.device)
        first_pos = ctx_len - (q_end - q_start)  # position of this sequence's first query
        chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, ctx_len * num_heads))
        for s in range(q_start, q_end, chunk):
            e = min(s + chunk, q_end)
            q_pos = torch.arange(s - q_start, e - q_start, device=q.device) + first_pos
            allowed = (key_pos[None, :] <= q_pos[:, None])[None]  # [1, S, L]
            out[s:e] = _attend(q[None, s:e], k, v, allowed, scale)[0].to(q.dtype)
    return out


def _mla_as_mqa(
    q_latent: torch.Tensor, q_rope: torch.Tensor, latent_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query [.., Hq, R+P], key cache [.., 1, R+P], value cache view [.., 1, R])."""
    rank, rope_dim = q_latent.shape[-1], q_rope.shape[-1]
    q = torch.cat([q_latent, q_rope.to(q_latent.dtype)], dim=-1)
    return q, latent_cache[..., : rank + rope_dim], latent_cache[..., :rank]


def mla_prefill(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_mla_prefill``. Paged prefill with one kv head."""
    q, keys, values = _mla_as_mqa(q_latent, q_rope, latent_cache)
    return paged_attention_prefill(q, keys, values, block_tables, cu_seqlens_q, context_lens, scale)


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_mla_decode``. Paged decode with one kv head."""
    q, keys, values = _mla_as_mqa(q_latent, q_rope, latent_cache)
    return paged_attention_decode(q, keys, values, block_tables, context_lens, scale)
