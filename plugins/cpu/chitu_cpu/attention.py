"""Decode attention that walks only the blocks in use.

The generic decode gathers every sequence's blocks up to the block table's width,
so that a device never reads the context lengths back to the host (a sync, and
impossible inside a graph). The engine sizes that width for the longest context
it may hold (``max_model_len``): a 50-token context read 8192 positions a step.
Here the host is the device, so the longest context is read for free and the
table is cut to the blocks it covers before the generic op runs.
"""

from __future__ import annotations

import torch

from chitu_core.hookspecs import hookimpl
from chitu_core.ops import attention as generic


def _blocks_in_use(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int):
    """``block_tables[:, :n]`` where n blocks hold the longest context (at least one)."""
    longest = int(context_lens.max()) if context_lens.numel() else 0
    return block_tables[:, : max(1, -(-longest // block_size))]


@hookimpl
def chitu_paged_attention_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_paged_attention_decode``: q [B, Hq, D] ->
    [B, Hq, Dv] in q's dtype; the generic op over the blocks in use."""
    tables = _blocks_in_use(block_tables, context_lens, key_cache.shape[1])
    return generic.paged_attention_decode(q, key_cache, value_cache, tables, context_lens, scale)


@hookimpl
def chitu_mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_mla_decode``: the generic op over the blocks in use."""
    tables = _blocks_in_use(block_tables, context_lens, latent_cache.shape[1])
    return generic.mla_decode(q_latent, q_rope, latent_cache, tables, context_lens, scale)
