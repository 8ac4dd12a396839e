"""RowSpan: the covering 128-row blocks a rank loads for FP8 parts off the block grid."""

from __future__ import annotations

import pytest
import torch

from chitu_core.distributed.model_parallel import Shard
from chitu_core.models.row_span import RowSpan, padded_bias
from chitu_core.quant import dequantize_block_fp8, quantize_fp8


@pytest.mark.parametrize(
    ("size", "keep", "is_fp8", "fused", "read", "local_size"),
    [
        (160, (0, 160), False, True, (0, 160), 160),  # dense: always the exact rows
        (256, (128, 256), True, True, (128, 256), 128),  # on the blocks: exact
        (160, (0, 160), True, False, (0, 160), 160),  # a lone weight may end on a partial block
        (160, (0, 160), True, True, (0, 160), 256),  # issue 24: a fused part is padded
        (160, (80, 160), True, True, (0, 160), 256),  # TP rank 1 of 2: covering blocks
        (1408, (352, 704), True, True, (256, 768), 512),  # GLM-4.5-Air's experts at TP=4
    ],
)
def test_span_of(size, keep, is_fp8, fused, read, local_size) -> None:
    span = RowSpan.of(size, Shard(0, *keep), is_fp8, fused)
    assert (span.read.start, span.read.stop, span.local_size) == (*read, local_size)
    assert span.padded == (read != keep or local_size != keep[1] - keep[0])
    assert span.offset == keep[0] - read[0]


def test_fit_keeps_only_the_owned_rows_and_the_scales() -> None:
    """Rows [80, 160) of a 160-row FP8 weight: the covering blocks, the other rank's rows and
    the padding zero, the scales as read; its product equals the owned rows' product."""
    gen = torch.Generator().manual_seed(0)
    whole = quantize_fp8(torch.randn(160, 200, generator=gen))
    span = RowSpan.of(160, Shard(0, 80, 160), is_fp8=True)
    fitted = span.fit(whole, 0)
    assert fitted.weight.shape == (256, 200) and torch.equal(fitted.scale, whole.scale)
    dense = dequantize_block_fp8(fitted.weight, fitted.scale, torch.float32)
    expected = dequantize_block_fp8(whole.weight, whole.scale, torch.float32)[80:]
    assert torch.equal(dense[80:160], expected)
    assert not dense[:80].any() and not dense[160:].any()
    columns = span.fit(quantize_fp8(torch.randn(64, 160, generator=gen)), 1)
    assert columns.weight.shape == (64, 256) and not columns.weight[:, :80].float().any()
    assert padded_bias(torch.ones(80), span).tolist() == [0.0] * 80 + [1.0] * 80 + [0.0] * 96
