"""Model runner: owns the paged KV cache tensors and turns a scheduled batch into a forward pass."""

from __future__ import annotations

import logging
from typing import Any

import torch

from chitu_core.models.base import ForwardBatch, KVCacheLayout, LayerCache

logger = logging.getLogger(__name__)

GIB = 1 << 30
# Host memory is shared with everything else on the machine: take a modest share.
CPU_KV_CACHE_FRACTION = 0.25
CPU_KV_CACHE_MAX_BYTES = 4 * GIB


def choose_num_blocks(
    ops: Any,
    device: torch.device,
    layout: KVCacheLayout,
    dtype: torch.dtype,
    block_size: int,
    num_blocks: int | None = None,
    kv_cache_gb: float | None = None,
    memory_utilization: float = 0.9,
    max_useful_blocks: int | None = None,
) -> int:
    """Number of KV blocks: explicit, from a byte budget, or from the device's free memory.

    On accelerators the budget is ``free * memory_utilization`` after the weights are
    loaded; on the host a quarter of available RAM, at most 4 GiB. A budget is never
    turned into more than ``max_useful_blocks`` (every sequence at full length).
    """
    bytes_per_block = layout.bytes_per_token(dtype) * block_size
    if num_blocks is not None:
        chosen = num_blocks
    else:
        if kv_cache_gb is not None:
            budget = int(kv_cache_gb * GIB)
        else:
            free, _total = ops.memory_info(device)
            if device.type == "cpu":
                budget = min(int(free * CPU_KV_CACHE_FRACTION), CPU_KV_CACHE_MAX_BYTES)
            else:
                budget = int(free * memory_utilization)
        chosen = budget // bytes_per_block
        if max_useful_blocks is not None:
            chosen = min(chosen, max_useful_blocks)
    if chosen < 2:
        raise ValueError(
            f"KV cache too small: {chosen} blocks of {bytes_per_block} bytes "
            "(raise --kv-cache-gb or --num-blocks; block 0 is reserved)"
        )
    return chosen


class ModelRunner:
    """Allocates every layer's cache and runs the model on scheduled sequences."""

    def __init__(
        self,
        model: Any,
        ops: Any,
        device: torch.device,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
    ) -> None:
        self.model, self.ops, self.device, self.dtype = model, ops, device, dtype
        self.block_size = block_size
        layout = model.kv_cache_layout()
        self.kv_caches: list[LayerCache] = []
        for _ in range(layout.num_layers):
            key = ops.allocate_kv_cache(
                num_blocks, block_size, layout.num_kv_heads, layout.key_dim, dtype, device
            )
            value = None
            if layout.value_dim is not None:
                value = ops.allocate_kv_cache(
                    num_blocks, block_size, layout.num_kv_heads, layout.value_dim, dtype, device
                )
            self.kv_caches.append((key, value))
        logger.info(
            "KV cache: %d blocks x %d tokens, %.3f GiB",
            num_blocks,
            block_size,
            num_blocks * block_size * layout.bytes_per_token(dtype) / GIB,
        )

    def build_batch(self, seqs: list[Any], num_new_tokens: list[int]) -> ForwardBatch:
        """ForwardBatch for computing ``num_new_tokens[i]`` tokens of ``seqs[i]`` from its
        ``num_computed_tokens`` on; blocks must already be allocated."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        cu_seqlens = [0]
        bs = self.block_size
        for seq, count in zip(seqs, num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            end = start + count
            input_ids += seq.token_ids[start:end]
            span = range(start, end)
            positions += span
            slots += [seq.block_ids[p // bs] * bs + p % bs for p in span]
            context_lens.append(end)
            cu_seqlens.append(cu_seqlens[-1] + count)
        max_blocks = max(len(seq.block_ids) for seq in seqs)
        # Unused table entries point at the reserved scratch block 0.
        tables = [seq.block_ids + [0] * (max_blocks - len(seq.block_ids)) for seq in seqs]
        device = self.device

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return ForwardBatch(
            input_ids=tensor(input_ids, torch.int64),
            positions=tensor(positions, torch.int64),
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(tables, torch.int32),
            context_lens=tensor(context_lens, torch.int32),
            cu_seqlens_q=tensor(cu_seqlens, torch.int32),
            last_token_indices=tensor([c - 1 for c in cu_seqlens[1:]], torch.int64),
            is_decode=all(c == 1 for c in num_new_tokens),
        )

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The model on ``batch`` over this rank's caches: logits ``[B, vocab]`` fp32 (last
        pipeline stage) or hidden states ``[T, hidden]`` (earlier stages)."""
        return self.model(batch, self.kv_caches, hidden_states)

    def execute(self, seqs: list[Any], num_new_tokens: list[int]) -> torch.Tensor:
        """Run one step; returns logits ``[B, vocab]`` fp32 of each sequence's last new token."""
        return self.forward(self.build_batch(seqs, num_new_tokens))
