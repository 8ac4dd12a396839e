"""DeepSeek-V3 block-128 FP8: scales, round-trip error, tails, experts, specials."""

from __future__ import annotations

import math

import pytest
import torch

from chitu_core.quant import (
    FP8_BLOCK_SIZE,
    block_scale_shape,
    dequantize_block_fp8,
    e4m3_bits_to_float,
    quantize_block_fp8,
)

B = FP8_BLOCK_SIZE


def reference_scales(w: torch.Tensor) -> torch.Tensor:
    """amax/448 per block by explicit slicing, independent of the reshape trick."""
    n, k = w.shape
    out = torch.empty(math.ceil(n / B), math.ceil(k / B))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            amax = w[i * B : (i + 1) * B, j * B : (j + 1) * B].float().abs().max()
            out[i, j] = amax / 448.0 if amax > 0 else 1.0
    return out


def expand(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return scale.repeat_interleave(B, -2)[..., :n, :].repeat_interleave(B, -1)[..., :k]


def assert_within_e4m3_error(w: torch.Tensor, deq: torch.Tensor, scale_inv: torch.Tensor):
    # e4m3 keeps 3 mantissa bits, so round-to-nearest is off by at most half an
    # ulp = 2^-4 of the value's leading power of two, hence <= 2^-4 * |w| for
    # values whose scaled magnitude |w / s| is in the normal range (>= 2^-6).
    # Below that the spacing is the fixed subnormal step 2^-9, so the error is
    # at most 2^-10 * s. The slack covers the two fp32 roundings (w / s, q * s).
    w = w.float()
    s = expand(scale_inv, *w.shape[-2:])
    bound = torch.maximum(2.0**-4 * w.abs(), 2.0**-10 * s) * (1 + 2.0**-16)
    err = (deq - w).abs()
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize(
    "shape", [(300, 200), (1, 1), (128, 128), (256, 384), (129, 127), (3, 130, 260)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_error_bound_and_shapes(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    weight, scale_inv = quantize_block_fp8(w)
    assert weight.shape == w.shape and weight.dtype == torch.float8_e4m3fn
    assert scale_inv.dtype == torch.float32
    assert tuple(scale_inv.shape) == block_scale_shape(w.shape)
    deq = dequantize_block_fp8(weight, scale_inv)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    assert_within_e4m3_error(w, deq, scale_inv)


@pytest.mark.parametrize("shape", [(300, 200), (1, 1), (129, 257)])
def test_scales_are_block_amax_over_448(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    _, scale_inv = quantize_block_fp8(w)
    torch.testing.assert_close(scale_inv, reference_scales(w), rtol=0, atol=0)


def test_block_max_maps_to_448():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(2))
    weight, _ = quantize_block_fp8(w)
    codes = e4m3_bits_to_float(weight.view(torch.uint8)).abs()
    padded = torch.nn.functional.pad(codes, (0, 56, 0, 84))  # to 384 x 256
    block_max = padded.reshape(3, B, 2, B).amax(dim=(1, 3))
    assert torch.all(block_max == 448.0)


def test_stacked_experts_equal_per_expert():
    w = torch.randn(3, 130, 260, generator=torch.Generator().manual_seed(3))
    weight, scale_inv = quantize_block_fp8(w)
    assert scale_inv.shape == (3, 2, 3)
    for e in range(3):
        we, se = quantize_block_fp8(w[e])
        assert torch.equal(weight[e].view(torch.uint8), we.view(torch.uint8))
        assert torch.equal(scale_inv[e], se)
    deq = dequantize_block_fp8(weight, scale_inv)
    assert torch.equal(deq[1], dequantize_block_fp8(weight[1], scale_inv[1]))


def test_zero_blocks_give_scale_one_and_exact_zeros():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(4))
    w[:B, :B] = 0
    w[2 * B :, B:] = 0  # the partial corner block
    weight, scale_inv = quantize_block_fp8(w)
    assert scale_inv[0, 0] == 1.0 and scale_inv[2, 1] == 1.0
    deq = dequantize_block_fp8(weight, scale_inv)
    assert torch.all(deq[:B, :B] == 0) and torch.all(deq[2 * B :, B:] == 0)
    assert not torch.isnan(deq).any()
    weight, scale_inv = quantize_block_fp8(torch.zeros(5, 7))
    assert torch.all(scale_inv == 1.0)
    assert torch.all(dequantize_block_fp8(weight, scale_inv) == 0)


def test_underflowing_scale_is_treated_as_zero_block():
    # amax / 448 underflows to 0 in fp32; without the guard 0/0 gives NaN.
    w = torch.full((4, 4), 1e-44)
    weight, scale_inv = quantize_block_fp8(w)
    assert scale_inv.item() == 1.0
    assert not torch.isnan(dequantize_block_fp8(weight, scale_inv)).any()


def test_e4m3_valued_blocks_with_448_are_exact():
    # Every block holds +-448, so its scale is exactly 1 and every e4m3 value
    # survives unchanged.
    codes = torch.randint(0, 256, (300, 200), generator=torch.Generator().manual_seed(5))
    codes = codes.to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E  # no NaN codes
    codes[::B, ::B] = 0xFE  # -448 in every block
    w = e4m3_bits_to_float(codes)
    weight, scale_inv = quantize_block_fp8(w)
    assert torch.all(scale_inv == 1.0)
    assert torch.equal(weight.view(torch.uint8), codes)
    assert torch.equal(dequantize_block_fp8(weight, scale_inv), w)
    w448 = torch.full((130, 3), 448.0)
    w448[::2] = -448.0
    weight, scale_inv = quantize_block_fp8(w448)
    assert torch.equal(dequantize_block_fp8(weight, scale_inv), w448)


def test_nan_poisons_only_its_block():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(6))
    w[B + 5, 7] = math.nan  # block (1, 0)
    weight, scale_inv = quantize_block_fp8(w)
    assert torch.isnan(scale_inv[1, 0])
    assert torch.isfinite(scale_inv).sum() == 5
    deq = dequantize_block_fp8(weight, scale_inv)
    assert torch.isnan(deq[B : 2 * B, :B]).all()
    others = torch.ones_like(deq, dtype=torch.bool)
    others[B : 2 * B, :B] = False
    assert torch.isfinite(deq[others]).all()


def test_inf_makes_its_block_nan():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(7))
    w[0, 0] = math.inf
    weight, scale_inv = quantize_block_fp8(w)
    assert math.isinf(scale_inv[0, 0].item())
    deq = dequantize_block_fp8(weight, scale_inv)
    assert torch.isnan(deq[:B, :B]).all()  # 0 * inf
    assert torch.isfinite(deq[B:]).all() and torch.isfinite(deq[:, B:]).all()


def test_uint8_view_path_equals_float8_path():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(8))
    weight, scale_inv = quantize_block_fp8(w)
    via_fp8 = dequantize_block_fp8(weight, scale_inv)
    via_u8 = dequantize_block_fp8(weight.view(torch.uint8), scale_inv)
    assert torch.equal(via_fp8, via_u8)
    # ...and both equal torch's own float8 decode times the expanded scale.
    assert torch.equal(via_fp8, weight.float() * expand(scale_inv, 300, 200))


def test_output_dtype_is_cast_from_fp32():
    w = torch.randn(130, 260, generator=torch.Generator().manual_seed(9))
    weight, scale_inv = quantize_block_fp8(w)
    out = dequantize_block_fp8(weight, scale_inv, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, dequantize_block_fp8(weight, scale_inv).to(torch.bfloat16))


def test_shape_mismatch_raises():
    weight, scale_inv = quantize_block_fp8(torch.randn(300, 200))
    with pytest.raises(ValueError, match=r"shape \(2, 2\) but weight \(300, 200\) needs \(3, 2\)"):
        dequantize_block_fp8(weight, scale_inv[:2])
    with pytest.raises(ValueError, match="needs"):
        dequantize_block_fp8(weight, scale_inv.t())
    with pytest.raises(ValueError, match=r"\[N, K\] or \[E, N, K\]"):
        dequantize_block_fp8(weight.reshape(-1), scale_inv)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequantize_block_fp8(torch.randn(4, 4), torch.ones(1, 1))
    with pytest.raises(ValueError, match="floating"):
        quantize_block_fp8(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        quantize_block_fp8(torch.randn(4))
