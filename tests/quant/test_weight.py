"""QuantizedWeight validation, properties, dequantize and quantize_fp8."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chitu_core.quant import (
    FORMAT_FP8_BLOCK128,
    FORMAT_FP8_CHANNEL,
    FORMAT_UNQUANTIZED,
    WEIGHT_FORMATS,
    QuantizedWeight,
    dequantize_block_fp8,
    dequantize_channel_fp8,
    quantize_block_fp8,
    quantize_fp8,
)


def test_formats():
    assert WEIGHT_FORMATS == ("unquantized", "fp8_block128", "fp8_channel")


def test_unquantized():
    w = torch.randn(300, 200, dtype=torch.bfloat16)
    qw = QuantizedWeight(w, None, FORMAT_UNQUANTIZED)
    assert (qw.out_features, qw.in_features, qw.num_experts) == (300, 200, None)
    assert torch.equal(qw.dequantize(), w.float())
    assert qw.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", [FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL])
@pytest.mark.parametrize("shape", [(300, 200), (3, 130, 260)])
def test_quantize_fp8_roundtrip(fmt, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    qw = quantize_fp8(w, fmt)
    assert qw.fmt == fmt and qw.weight.dtype == torch.float8_e4m3fn
    assert qw.out_features == shape[-2] and qw.in_features == shape[-1]
    assert qw.num_experts == (shape[0] if len(shape) == 3 else None)
    deq = qw.dequantize()
    undo = dequantize_block_fp8 if fmt == FORMAT_FP8_BLOCK128 else dequantize_channel_fp8
    assert torch.equal(deq, undo(qw.weight, qw.scale))
    # Half an e4m3 ulp relative (2^-4), plus an absolute floor for the few
    # values that land in the subnormal range of their block/row.
    torch.testing.assert_close(deq, w.float(), rtol=2.0**-4, atol=2.0**-10 * qw.scale.max().item())


def test_uint8_weight_accepted():
    weight, scale = quantize_block_fp8(torch.randn(130, 260))
    qw = QuantizedWeight(weight.view(torch.uint8), scale, FORMAT_FP8_BLOCK128)
    assert torch.equal(qw.dequantize(), dequantize_block_fp8(weight, scale))


def test_default_format_is_block128():
    assert quantize_fp8(torch.randn(4, 4)).fmt == FORMAT_FP8_BLOCK128


def test_frozen():
    qw = QuantizedWeight(torch.randn(2, 2), None, FORMAT_UNQUANTIZED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        qw.fmt = FORMAT_FP8_CHANNEL


def test_validation_errors():
    w = torch.randn(300, 200)
    fp8, scale_inv = quantize_block_fp8(w)
    cases = [
        ((w, None, "int4"), "unknown weight format 'int4'"),
        ((w, torch.ones(300), FORMAT_UNQUANTIZED), "takes no scale"),
        ((fp8, None, FORMAT_UNQUANTIZED), "bf16/fp16/fp32"),
        ((w.reshape(-1), None, FORMAT_UNQUANTIZED), r"\[N, K\] or \[E, N, K\]"),
        ((fp8, None, FORMAT_FP8_BLOCK128), "needs a scale"),
        ((w, scale_inv, FORMAT_FP8_BLOCK128), "quantize_fp8"),
        ((fp8, scale_inv[:2], FORMAT_FP8_BLOCK128), r"needs \(3, 2\)"),
        ((fp8, scale_inv, FORMAT_FP8_CHANNEL), r"needs \(300,\)"),
        ((fp8, torch.ones(300, dtype=torch.int32), FORMAT_FP8_CHANNEL), "floating"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            QuantizedWeight(*args)


def test_quantize_fp8_rejects_other_formats():
    with pytest.raises(ValueError, match="QuantizedWeight"):
        quantize_fp8(torch.randn(4, 4), FORMAT_UNQUANTIZED)
