"""Decode steps replayed from captured device graphs, one graph per batch-size bucket.

A decode step launches a few kernels per layer on tiny tensors, so at batch 1 the
host's launch overhead, not the GPU, sets the pace. The backend's
``chitu_capture_graph`` records a whole decode forward once per bucket (1, 2, 4,
..., up to ``max_num_seqs``) over static input buffers; a step of ``B`` sequences
copies its batch into the buffers of the smallest bucket ``>= B``, pads the rest
and replays. Padding rows decode token 0 at position 0 into the reserved scratch
block 0 (slot 0) with a context of one token, so they touch no real sequence.

The block tables are captured at their full width (``max_model_len`` worth of
blocks): attention kernels bound their work by ``context_lens`` on the device,
so the width costs nothing per step.

Under pipeline parallelism every stage captures its own layers: a stage after
the first also gets a static buffer for the hidden states it receives (padding
rows zeroed), and a stage before the last returns hidden states, not logits. The
stage hands its output on with a blocking send, which orders the next replay
(that rewrites the output buffer) after the send on the device.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from chitu_core.models.base import ForwardBatch, LayerCache

logger = logging.getLogger(__name__)

GIB = 1 << 30


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: powers of two below ``max_num_seqs``, then it."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    buckets, size = [], 1
    while size < max_num_seqs:
        buckets.append(size)
        size *= 2
    return [*buckets, max_num_seqs]


class DecodeGraphs:
    """Captured decode forwards of ``model`` over ``kv_caches``, one per bucket.

    Args:
        model: a ``CausalLM`` (or one pipeline stage of it: logits from the last stage,
            hidden states ``[B, hidden_size]`` from the others).
        ops: the bound ``Ops`` (its ``capture_graph`` and ``memory_info`` are used).
        kv_caches: the caches the graphs read and write (their storage must not move).
        max_num_seqs: the largest bucket.
        max_blocks_per_seq: block-table width, ``ceil(max_model_len / block_size)``.
        dtype: the compute dtype of the hidden states a stage after the first receives.
    """

    def __init__(
        self,
        model: Any,
        ops: Any,
        device: torch.device,
        kv_caches: list[LayerCache],
        max_num_seqs: int,
        max_blocks_per_seq: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.ops, self.device, self.kv_caches = model, ops, device, kv_caches
        self.buckets = decode_buckets(max_num_seqs)
        self.max_batch = self.buckets[-1]
        self.width = max_blocks_per_seq
        n = self.max_batch

        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.input_ids = zeros(n, dtype=torch.int64)
        self.positions = zeros(n, dtype=torch.int64)
        self.slot_mapping = zeros(n, dtype=torch.int64)
        self.block_tables = zeros(n, self.width, dtype=torch.int32)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.last_token_indices = torch.arange(n, dtype=torch.int64, device=device)
        # A stage after the first reads the previous stage's hidden states [B, D].
        self.hidden: torch.Tensor | None = None
        parallel = getattr(model, "parallel", None)
        if parallel is not None and not parallel.is_first_stage:
            if dtype is None:
                raise ValueError("a pipeline stage after the first needs the hidden-state dtype")
            self.hidden = zeros(n, model.hidden_size, dtype=dtype)
        self._replays: dict[int, Any] = {}
        self.capture_s = 0.0
        self.capture_bytes = 0

    def _static_batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            context_lens=self.context_lens[:size],
            cu_seqlens_q=self.cu_seqlens_q[: size + 1],
            last_token_indices=self.last_token_indices[:size],
            is_decode=True,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (a shared memory pool then fits the rest)."""
        free_before, _ = self.ops.memory_info(self.device)
        start = time.perf_counter()
        for size in reversed(self.buckets):
            batch = self._static_batch(size)

            hidden = None if self.hidden is None else self.hidden[:size]

            def step(batch: ForwardBatch = batch, hidden=hidden) -> torch.Tensor:
                return self.model(batch, self.kv_caches, hidden)

            self._replays[size] = self.ops.capture_graph(step, self.device)
        self.ops.synchronize(self.device)
        self.capture_s = time.perf_counter() - start
        free_after, _ = self.ops.memory_info(self.device)
        self.capture_bytes = max(0, free_before - free_after)
        logger.info(
            "decode graphs: %d buckets (%s) captured in %.1f s, %.3f GiB",
            len(self.buckets),
            ", ".join(map(str, self.buckets)),
            self.capture_s,
            self.capture_bytes / GIB,
        )

    def bucket_for(self, batch: ForwardBatch) -> int | None:
        """The bucket that replays ``batch``, or None when it must run eagerly."""
        if not batch.is_decode or not self._replays:
            return None
        num_seqs = batch.num_seqs
        if num_seqs == 0 or num_seqs > self.max_batch or batch.block_tables.shape[1] > self.width:
            return None
        return next(size for size in self.buckets if size >= num_seqs)

    @torch.inference_mode()
    def replay(
        self, batch: ForwardBatch, size: int, hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, vocab]`` fp32 (or, before the last pipeline stage, hidden states
        ``[B, hidden_size]``) of a decode ``batch`` through the graph of bucket ``size``.
        ``hidden_states`` ``[B, hidden_size]``: the previous stage's output, for a stage
        after the first (None otherwise).

        The returned tensor is a view of the graph's output buffer: valid until the
        next replay.
        """
        num_seqs, width = batch.num_seqs, batch.block_tables.shape[1]
        if (hidden_states is None) != (self.hidden is None):
            raise ValueError(
                "hidden_states are the input of a pipeline stage after the first, and only of it"
            )
        self.input_ids[:num_seqs].copy_(batch.input_ids)
        self.positions[:num_seqs].copy_(batch.positions)
        self.slot_mapping[:num_seqs].copy_(batch.slot_mapping)
        self.context_lens[:num_seqs].copy_(batch.context_lens)
        self.block_tables[:num_seqs, :width].copy_(batch.block_tables)
        self.block_tables[:num_seqs, width:].zero_()
        if self.hidden is not None:
            self.hidden[:num_seqs].copy_(hidden_states)
        if num_seqs < size:  # padding rows: token 0 at position 0 into scratch slot 0
            self.input_ids[num_seqs:size].zero_()
            self.positions[num_seqs:size].zero_()
            self.slot_mapping[num_seqs:size].zero_()
            self.context_lens[num_seqs:size].fill_(1)
            self.block_tables[num_seqs:size].zero_()
            if self.hidden is not None:
                self.hidden[num_seqs:size].zero_()
        return self._replays[size]()[:num_seqs]
