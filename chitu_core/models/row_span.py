"""FP8 block weights fused or split where their 128-row blocks do not fit: ``RowSpan``.

FP8 block checkpoints scale each 128x128 block of a weight with one number, so a
fused ``[gate; up]`` (or ``[q; k; v]``) weight or a tensor-parallel shard is only
expressible when its row boundaries fall on 128 blocks. Valid checkpoints do not
all oblige (``moe_intermediate_size`` 160, or 1408 split 4 ways = 352 rows).
Instead of refusing them, a rank loads the 128-aligned *covering* blocks of its
rows, zeroes the rows it does not own and pads the part with zero rows to a
multiple of 128, so parts fuse on block boundaries with their own scales. Zero
weights contribute exactly nothing: a SwiGLU's padded intermediate channels are
``silu(0) * 0 = 0`` and ``down_proj``'s matching (zeroed) columns multiply them;
attention cuts its q/k/v back out of the padded output. The result is the
unpadded layer's, at the cost of up to 2 x 127 idle rows per part. Dense (bf16)
checkpoints keep the exact shard and fuse as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from chitu_core.distributed.model_parallel import Shard
from chitu_core.quant import FP8_BLOCK_SIZE, QuantizedWeight


def _round_up(n: int) -> int:
    return -(-n // FP8_BLOCK_SIZE) * FP8_BLOCK_SIZE


@dataclass(frozen=True)
class RowSpan:
    """How this rank holds its rows ``keep`` of a weight dimension of ``size``.

    ``read`` is the range read from the checkpoint (``keep`` itself, or for FP8 its
    128-aligned covering); rows of ``read`` outside ``keep`` are zeroed, and the part
    is zero-padded to ``local_size`` rows (a multiple of 128 when ``padded``). The kept
    rows sit at ``offset`` in the loaded part.
    """

    size: int
    keep: Shard
    read: Shard
    local_size: int

    @property
    def padded(self) -> bool:
        return self.read != self.keep or self.local_size != self.keep.size

    @property
    def offset(self) -> int:
        return self.keep.start - self.read.start

    @classmethod
    def of(cls, size: int, keep: Shard, is_fp8: bool, fused: bool = True) -> RowSpan:
        """The span of rows ``keep`` of ``size``: exact unless FP8 blocks do not fit it.
        A ``fused`` part is followed by another, so it must also end on a block; a lone
        weight may end with the dimension's partial block."""
        ends_on_block = keep.stop % FP8_BLOCK_SIZE == 0 or (not fused and keep.stop == size)
        if not is_fp8 or (keep.start % FP8_BLOCK_SIZE == 0 and ends_on_block):
            return cls(size, keep, keep, keep.size)
        start = keep.start // FP8_BLOCK_SIZE * FP8_BLOCK_SIZE
        read = Shard(0, start, min(_round_up(keep.stop), size))
        return cls(size, keep, read, _round_up(read.size))

    def fit(self, weight: QuantizedWeight, dim: int) -> QuantizedWeight:
        """``weight`` read over ``read`` along ``dim`` (0 rows, 1 columns) -> zeroed outside
        ``keep`` and zero-padded to ``local_size``; the block scales stay as they are
        (``local_size`` has the read's block count)."""
        if not self.padded:
            return weight
        data = weight.weight
        lead = self.offset  # rows before keep stay zero, as do those after it
        shape = list(data.shape)
        shape[dim] = self.local_size
        out = torch.zeros(shape, dtype=data.dtype, device=data.device)
        out.narrow(dim, lead, self.keep.size).copy_(data.narrow(dim, lead, self.keep.size))
        return QuantizedWeight(out, weight.scale, weight.fmt)


def row_span(reader: Any, prefix: str, size: int, keep: Shard, fused: bool = True) -> RowSpan:
    """The span of rows ``keep`` (of ``size``) of ``prefix.weight`` as this rank loads it
    (``fused``: as a part of a fused weight, or of a SwiGLU whose gate/up are fused)."""
    return RowSpan.of(size, keep, reader.is_fp8(f"{prefix}.weight"), fused)


def fused_rows_weight(
    reader: Any, prefixes: list[str], spans: list[RowSpan], in_features: int
) -> QuantizedWeight:
    """``[N_0; N_1; ...]`` of this rank, part ``i`` being ``spans[i].local_size`` rows
    (``[sum, in_features]``, not yet prepared)."""
    shapes = [(span.size, in_features) for span in spans]
    if not any(span.padded for span in spans):
        return reader.fused_linear_weight(prefixes, shapes, [span.keep for span in spans])
    parts = [
        span.fit(reader.linear_weight(prefix, shape, shard=span.read), 0)
        for prefix, shape, span in zip(prefixes, shapes, spans, strict=True)
    ]
    return reader.concat(parts)


def padded_bias(bias: torch.Tensor, span: RowSpan) -> torch.Tensor:
    """A part's bias ``[keep.size]`` laid out like its padded rows: ``[local_size]``."""
    if not span.padded:
        return bias
    out = bias.new_zeros(span.local_size)
    out[span.offset : span.offset + span.keep.size] = bias
    return out


def gate_up_weight(reader: Any, gate: str, up: str, hidden: int, span: RowSpan) -> QuantizedWeight:
    """``[gate; up]`` of this rank: ``[2 * span.local_size, hidden]`` (not yet prepared)."""
    return fused_rows_weight(reader, [gate, up], [span, span], hidden)


def row_parallel_weight(
    reader: Any, prefix: str, out_features: int, span: RowSpan
) -> QuantizedWeight:
    """A row-parallel weight (``down_proj``, ``o_proj``) of this rank: its columns ``keep``
    as ``[out_features, span.local_size]``, matching its input laid out by ``span``."""
    read = Shard(1, span.read.start, span.read.stop)
    return span.fit(reader.linear_weight(prefix, (out_features, span.size), shard=read), 1)
