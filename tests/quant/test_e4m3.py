"""e4m3fn encode/decode against torch.float8_e4m3fn, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from chitu_core.quant import (
    E4M3_MAX,
    as_float8,
    e4m3_bits_to_float,
    float_to_e4m3_bits,
    to_e4m3_bits,
)

ALL_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)
NAN_CODES = (0x7F, 0xFF)


def torch_encode(x: torch.Tensor) -> torch.Tensor:
    """The reference our encoder must equal: torch's own float8 cast."""
    return x.float().to(torch.float8_e4m3fn).view(torch.uint8)


def f32_bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def test_decode_all_codes_bit_exact_vs_torch():
    ours = e4m3_bits_to_float(ALL_CODES)
    ref = ALL_CODES.view(torch.float8_e4m3fn).float()
    assert ours.dtype == torch.float32
    # fp32 bit patterns, so -0.0 vs 0.0 and NaN payloads count too.
    assert torch.equal(f32_bits(ours), f32_bits(ref))


def test_decode_float8_tensor_equals_uint8_view():
    as_fp8 = ALL_CODES.view(torch.float8_e4m3fn)
    assert torch.equal(
        f32_bits(e4m3_bits_to_float(as_fp8)), f32_bits(e4m3_bits_to_float(ALL_CODES))
    )


def test_encode_every_code_value_vs_torch_and_roundtrip():
    values = e4m3_bits_to_float(ALL_CODES)
    codes = float_to_e4m3_bits(values)
    assert torch.equal(codes, torch_encode(values))
    finite = torch.tensor([c not in NAN_CODES for c in range(256)])
    assert torch.equal(codes[finite], ALL_CODES[finite])  # every value is its own code
    assert codes[0x7F].item() == 0x7F and codes[0xFF].item() == 0xFF


@pytest.mark.parametrize(
    "code, value",
    [
        (0x7E, 448.0),
        (0xFE, -448.0),
        (0x01, 2.0**-9),  # smallest subnormal
        (0x81, -(2.0**-9)),
        (0x07, 0.875 * 2.0**-6),  # largest subnormal
        (0x08, 2.0**-6),  # smallest normal
        (0x38, 1.0),
        (0x00, 0.0),
        (0x80, -0.0),
    ],
)
def test_special_values_both_directions(code, value):
    decoded = e4m3_bits_to_float(torch.tensor([code], dtype=torch.uint8)).item()
    assert decoded == value
    assert math.copysign(1.0, decoded) == math.copysign(1.0, value)  # sign of zero
    assert float_to_e4m3_bits(torch.tensor([value])).item() == code
    assert E4M3_MAX == 448.0


@pytest.mark.parametrize("code", NAN_CODES)
def test_nan_codes(code):
    decoded = e4m3_bits_to_float(torch.tensor([code], dtype=torch.uint8))
    assert torch.isnan(decoded).item()
    assert torch.signbit(decoded).item() == bool(code & 0x80)


def test_midpoints_round_to_even_and_match_torch():
    # Consecutive positive finite codes a, a+1 (0x00..0x7E); their values'
    # midpoint has a 5-bit significand, so it is exact in fp32.
    low = torch.arange(0x7E, dtype=torch.int32).to(torch.uint8)
    high = low + 1
    mid = (e4m3_bits_to_float(low) + e4m3_bits_to_float(high)) / 2
    even = torch.where(low % 2 == 0, low, high)
    for sign in (1.0, -1.0):
        x = sign * mid
        sign_bit = 0x80 if sign < 0 else 0
        assert torch.equal(float_to_e4m3_bits(x), even | sign_bit)
        assert torch.equal(float_to_e4m3_bits(x), torch_encode(x))
        # One fp32 ulp off the tie decides it the other way.
        above = torch.nextafter(x, x * 2)
        below = torch.nextafter(x, torch.zeros_like(x))
        assert torch.equal(float_to_e4m3_bits(above), high | sign_bit)
        assert torch.equal(float_to_e4m3_bits(below), low | sign_bit)
        assert torch.equal(float_to_e4m3_bits(above), torch_encode(above))
        assert torch.equal(float_to_e4m3_bits(below), torch_encode(below))


def test_out_of_range_saturates_like_torch():
    # torch 2.13 saturates finite overflow and inf to +-448 (it does not give
    # NaN), including [464, 480) which rounds onto the NaN pattern.
    big = torch.tensor([448.5, 463.9, 464.0, 479.9, 480.0, 481.0, 1e6, 3e38, math.inf])
    assert float_to_e4m3_bits(big).tolist() == [0x7E] * len(big)
    assert float_to_e4m3_bits(-big).tolist() == [0xFE] * len(big)
    assert torch.equal(float_to_e4m3_bits(big), torch_encode(big))
    assert torch.equal(float_to_e4m3_bits(-big), torch_encode(-big))
    nan = torch.tensor([math.nan])
    assert float_to_e4m3_bits(nan).item() == 0x7F
    assert float_to_e4m3_bits(-nan).item() == 0xFF
    assert torch.equal(float_to_e4m3_bits(-nan), torch_encode(-nan))


def test_tiny_values_flush_with_sign():
    tiny = torch.tensor([2.0**-11, 2.0**-10, 1e-30, 1e-45])  # 2^-10 ties to even: 0
    assert float_to_e4m3_bits(tiny).tolist() == [0, 0, 0, 0]
    assert float_to_e4m3_bits(-tiny).tolist() == [0x80] * 4
    assert float_to_e4m3_bits(torch.tensor([2.0**-10 * 1.5])).item() == 0x01


def test_random_fp32_bit_patterns_match_torch():
    # Uniform bit patterns cover every exponent: NaN, inf, fp32 subnormals, huge.
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31, (2_000_000,), dtype=torch.int64, generator=gen)
    x = bits.to(torch.int32).view(torch.float32)
    assert torch.equal(float_to_e4m3_bits(x), torch_encode(x))


def test_random_in_range_floats_match_torch():
    # Dense sampling where e4m3 is interesting: magnitudes 2^-12 .. 2^10.
    gen = torch.Generator().manual_seed(1)
    n = 2_000_000
    scale = torch.exp2(torch.randint(-12, 10, (n,), generator=gen).float())
    x = torch.randn(n, generator=gen) * scale
    assert torch.equal(float_to_e4m3_bits(x), torch_encode(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_input_matches_torch(dtype):
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    assert torch.equal(float_to_e4m3_bits(x), torch_encode(x))


def test_shapes_and_non_contiguous():
    x = torch.randn(4, 6, 8)[:, ::2, 1:]
    out = float_to_e4m3_bits(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, torch_encode(x))
    assert e4m3_bits_to_float(out).shape == x.shape
    scalar = float_to_e4m3_bits(torch.tensor(1.0))
    assert scalar.shape == () and scalar.item() == 0x38
    assert e4m3_bits_to_float(scalar).item() == 1.0


def test_encode_rejects_integer_input():
    with pytest.raises(ValueError, match="floating"):
        float_to_e4m3_bits(torch.arange(4))


def test_views_share_storage():
    fp8 = torch.randn(16).to(torch.float8_e4m3fn)
    bits = to_e4m3_bits(fp8)
    assert bits.dtype == torch.uint8 and bits.data_ptr() == fp8.data_ptr()
    assert to_e4m3_bits(bits) is bits
    back = as_float8(bits)
    assert back.dtype == torch.float8_e4m3fn and back.data_ptr() == fp8.data_ptr()
    assert as_float8(fp8) is fp8
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        to_e4m3_bits(torch.zeros(4))
    with pytest.raises(ValueError, match="uint8"):
        as_float8(torch.zeros(4, dtype=torch.int8))


def test_table_decode_equals_native_decode_for_all_codes():
    from chitu_core.quant.e4m3 import decode_with_table

    table = decode_with_table(ALL_CODES)
    native = ALL_CODES.view(torch.float8_e4m3fn).float()
    assert torch.equal(table.view(torch.int32), native.view(torch.int32))
