"""Model runner: owns the paged KV cache tensors and turns a scheduled batch into a forward pass."""

from __future__ import annotations

import logging
from typing import Any

import torch

from chitu_core.distributed.step_sync import patch_input_ids, payload_values, unpack
from chitu_core.engine.decode_graphs import DecodeGraphs
from chitu_core.engine.host_copy import to_device_async
from chitu_core.models.base import ForwardBatch, LayerCache

logger = logging.getLogger(__name__)

GIB = 1 << 30


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
        self.graphs: DecodeGraphs | None = None

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> DecodeGraphs:
        """Capture decode graphs for batch buckets up to ``max_num_seqs``; decode steps that
        fit a bucket replay them from then on (see ``decode_graphs.py``)."""
        width = -(-max_model_len // self.block_size)
        graphs = DecodeGraphs(
            self.model, self.ops, self.device, self.kv_caches, max_num_seqs, width, self.dtype
        )
        graphs.capture()
        self.graphs = graphs
        return graphs

    def build_batch(
        self,
        seqs: list[Any],
        num_new_tokens: list[int],
        input_ids_on_device: torch.Tensor | None = None,
    ) -> ForwardBatch:
        """ForwardBatch for computing ``num_new_tokens[i]`` tokens of ``seqs[i]`` from its
        ``num_computed_tokens`` on; blocks must already be allocated.

        ``input_ids_on_device``: ``[T]`` int64 on the device, the step's input tokens when
        the host does not have them yet (a decode step queued behind the step that samples
        them); otherwise they are read from the sequences."""
        payload, sizes = self.host_payload(seqs, num_new_tokens, input_ids_on_device is not None)
        return self.batch_from_payload(payload, sizes, input_ids_on_device)

    def host_payload(
        self, seqs: list[Any], num_new_tokens: list[int], ids_on_device: bool = False
    ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """The step as one int64 payload on the host (``step_sync`` layout) and its
        ``(T, B, max_blocks, is_decode)``; with ``ids_on_device`` the input ids are
        placeholders (zeros), to be patched on the device."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        cu_seqlens = [0]
        bs = self.block_size
        for seq, count in zip(seqs, num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            end = start + count
            if not ids_on_device:
                input_ids += seq.token_slice(start, end)
            span = range(start, end)
            positions += span
            slots += [seq.block_ids[p // bs] * bs + p % bs for p in span]
            context_lens.append(end)
            cu_seqlens.append(cu_seqlens[-1] + count)
        max_blocks = max(len(seq.block_ids) for seq in seqs)
        # Unused table entries point at the reserved scratch block 0.
        tables = [seq.block_ids + [0] * (max_blocks - len(seq.block_ids)) for seq in seqs]
        is_decode = all(c == 1 for c in num_new_tokens)
        last = [c - 1 for c in cu_seqlens[1:]]
        num_tokens = cu_seqlens[-1]
        if ids_on_device:
            input_ids = [0] * num_tokens
        values = payload_values(
            input_ids, positions, slots, tables, context_lens, cu_seqlens, last, is_decode
        )
        sizes = (num_tokens, len(seqs), max_blocks, int(is_decode))
        return torch.tensor(values, dtype=torch.int64), sizes

    def batch_from_payload(
        self,
        payload: torch.Tensor,
        sizes: tuple[int, int, int, int],
        input_ids_on_device: torch.Tensor | None = None,
    ) -> ForwardBatch:
        """The ForwardBatch of a host payload: one host-to-device copy (the fields are views
        of it), then the input ids patched in on the device where they are given."""
        device_payload = to_device_async(payload, self.device)
        if input_ids_on_device is not None:
            num_tokens = sizes[0]
            if input_ids_on_device.shape != (num_tokens,):
                raise ValueError(
                    f"input_ids_on_device has shape {tuple(input_ids_on_device.shape)}; "
                    f"the step computes {num_tokens} tokens"
                )
            patch_input_ids(device_payload, input_ids_on_device)
        [batch] = unpack(device_payload, 1, sizes=sizes)
        return batch

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The model on ``batch`` over this rank's caches: logits ``[B, vocab]`` fp32 (last
        pipeline stage) or hidden states ``[T, hidden]`` (earlier stages). Decode batches
        that fit a captured graph bucket replay it."""
        if self.graphs is not None:
            bucket = self.graphs.bucket_for(batch)
            if bucket is not None:
                return self.graphs.replay(batch, bucket, hidden_states)
        return self.model(batch, self.kv_caches, hidden_states)

    def execute(
        self,
        seqs: list[Any],
        num_new_tokens: list[int],
        input_ids_on_device: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run one step; returns logits ``[B, vocab]`` fp32 of each sequence's last new token
        (``input_ids_on_device``: see ``build_batch``)."""
        return self.forward(self.build_batch(seqs, num_new_tokens, input_ids_on_device))
