"""Per-output-channel FP8: scales, round-trip error, experts, specials."""

from __future__ import annotations

import math

import pytest
import torch

from chitu_core.quant import (
    channel_scale_shape,
    dequantize_channel_fp8,
    e4m3_bits_to_float,
    quantize_channel_fp8,
)


@pytest.mark.parametrize("shape", [(300, 200), (1, 1), (3, 130, 260)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_error_bound_and_shapes(shape, dtype):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    weight, scale = quantize_channel_fp8(w)
    assert weight.shape == w.shape and weight.dtype == torch.float8_e4m3fn
    assert scale.dtype == torch.float32 and tuple(scale.shape) == channel_scale_shape(w.shape)
    torch.testing.assert_close(scale, w.float().abs().amax(-1) / 448.0, rtol=0, atol=0)
    deq = dequantize_channel_fp8(weight, scale)
    # Same bound as block FP8 (see test_block_fp8): half an e4m3 ulp is 2^-4
    # relative in the normal range, 2^-10 * scale absolute in the subnormal one.
    s = scale.unsqueeze(-1)
    bound = torch.maximum(2.0**-4 * w.float().abs(), 2.0**-10 * s) * (1 + 2.0**-16)
    assert torch.all((deq - w.float()).abs() <= bound)


def test_row_max_maps_to_448_and_zero_row_is_exact():
    w = torch.randn(64, 100, generator=torch.Generator().manual_seed(1))
    w[3] = 0
    weight, scale = quantize_channel_fp8(w)
    codes = e4m3_bits_to_float(weight.view(torch.uint8)).abs()
    assert torch.all(codes.amax(-1)[torch.arange(64) != 3] == 448.0)
    assert scale[3] == 1.0
    deq = dequantize_channel_fp8(weight, scale)
    assert torch.all(deq[3] == 0) and not torch.isnan(deq).any()


def test_e4m3_values_with_448_are_exact():
    codes = torch.randint(0, 0x7F, (16, 40), generator=torch.Generator().manual_seed(2))
    codes = codes.to(torch.uint8)
    codes[:, 0] = 0x7E
    codes[::2] |= 0x80  # negative rows, -448 included
    w = e4m3_bits_to_float(codes)
    weight, scale = quantize_channel_fp8(w)
    assert torch.all(scale == 1.0)
    assert torch.equal(dequantize_channel_fp8(weight, scale), w)


def test_nan_poisons_only_its_row():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    w[5, 2] = math.nan
    weight, scale = quantize_channel_fp8(w)
    deq = dequantize_channel_fp8(weight, scale)
    assert torch.isnan(scale[5]) and torch.isnan(deq[5]).all()
    assert torch.isfinite(deq[torch.arange(8) != 5]).all()


def test_uint8_view_and_dtype():
    w = torch.randn(3, 10, 20, generator=torch.Generator().manual_seed(4))
    weight, scale = quantize_channel_fp8(w)
    via_fp8 = dequantize_channel_fp8(weight, scale)
    assert torch.equal(via_fp8, dequantize_channel_fp8(weight.view(torch.uint8), scale))
    assert torch.equal(via_fp8, weight.float() * scale.unsqueeze(-1))
    out = dequantize_channel_fp8(weight, scale, dtype=torch.float16)
    assert out.dtype == torch.float16 and torch.equal(out, via_fp8.half())


def test_shape_mismatch_raises():
    weight, scale = quantize_channel_fp8(torch.randn(30, 20))
    with pytest.raises(ValueError, match=r"shape \(29,\) but weight \(30, 20\) needs \(30,\)"):
        dequantize_channel_fp8(weight, scale[:29])
    with pytest.raises(ValueError, match="squeezed"):
        dequantize_channel_fp8(weight, scale.unsqueeze(-1))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequantize_channel_fp8(torch.randn(30, 20), scale)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        quantize_channel_fp8(torch.randn(2, 3, 4, 5))
