"""FP8 e4m3fn encode/decode by integer bit manipulation.

OCP "fn" variant: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; no
infinities, only 0x7F/0xFF are NaN; max normal 448, min normal 2^-6, min
subnormal 2^-9.

Why not just ``tensor.to(torch.float8_e4m3fn)``: several backends (Ascend,
Hygon DCU, Ampere through some torch builds) have no float8 dtype on the
device, and the weights travel there as a uint8 view. These functions work on
any device from that view, and they are bit-exact with torch's own
conversions (tests/quant/test_e4m3.py checks every code and millions of
random floats), so the CPU oracle and the device agree to the bit.
"""

from __future__ import annotations

import functools

import torch

E4M3_MAX = 448.0

# torch builds without float8 have no such attribute; only as_float8 needs it.
_FLOAT8_E4M3FN = getattr(torch, "float8_e4m3fn", None)

# fp32 bit patterns of the encoder's decision points (fp32 bits of non-negative
# floats order like the floats themselves, so integer compares suffice).
_F32_MIN_E4M3_NORMAL = 121 << 23  # 2^-6: below it the result is subnormal
_F32_E4M3_OVERFLOW = 1087 << 20  # 480.0: the first magnitude past 0x7E
_F32_INF = 0x7F800000
_EXP_REBIAS = (7 - 127) << 23  # fp32 exponent bias -> e4m3 exponent bias


@functools.cache
def _decode_table(device: torch.device) -> torch.Tensor:
    """fp32 value of each of the 256 codes: [256] float32 on `device`."""
    code = torch.arange(256, dtype=torch.int32)
    sign = (code >> 7) << 31
    exp = (code >> 3) & 0xF
    mant = code & 0x7
    # Normal: rebias the exponent (7 -> 127) and left-align the mantissa.
    normal = ((exp + 120) << 23) | (mant << 20)
    # Subnormal (exp == 0): value = mant * 2^-9. Normalise it: p is the index
    # of mant's leading one, so the value is 2^(p-9) * 1.(rest of mant).
    p = (mant >= 2).int() + (mant >= 4).int()
    subnormal = ((p + 127 - 9) << 23) | ((mant - (1 << p)) << (23 - p))
    magnitude = torch.where(exp == 0, subnormal, normal)
    magnitude = torch.where((code & 0x7F) == 0, 0, magnitude)  # +0 and -0
    # NaN: all-ones exponent and mantissa. The fp32 payload (0x7FF00000) is
    # what torch's own float8 -> float32 conversion produces.
    magnitude = torch.where((code & 0x7F) == 0x7F, _F32_INF | (0x7 << 20), magnitude)
    return (sign | magnitude).view(torch.float32).to(device)


def e4m3_bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """Decode e4m3fn codes to float32, bit-exact.

    bits: any shape, uint8 (or a float8_e4m3fn tensor, which is viewed as
    uint8). Returns the same shape, float32, on the same device. 0x7F/0xFF
    decode to NaN (keeping the sign, as torch does).
    """
    bits = to_e4m3_bits(bits)
    if _has_native_float8(bits.device):
        # torch's own conversion is exact (it defines the reference) and ~10x faster.
        return bits.view(torch.float8_e4m3fn).float()
    return decode_with_table(bits)


def decode_with_table(bits: torch.Tensor) -> torch.Tensor:
    """The same decode by integer bit manipulation, for devices whose torch has no float8."""
    # Gather from a 256-entry table; int32 indices keep the temporary at 4
    # bytes per element instead of int64's 8.
    return _decode_table(bits.device)[to_e4m3_bits(bits).int()]


@functools.cache
def _has_native_float8(device: torch.device) -> bool:
    if not hasattr(torch, "float8_e4m3fn"):
        return False
    try:
        probe = torch.tensor([0x38, 0x01, 0x7F], dtype=torch.uint8, device=device)
        values = probe.view(torch.float8_e4m3fn).float().cpu()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return values[0].item() == 1.0 and values[1].item() == 2.0**-9 and values[2].isnan().item()


def float_to_e4m3_bits(x: torch.Tensor) -> torch.Tensor:
    """Encode floats to e4m3fn codes with round-to-nearest-even.

    x: any shape, a floating dtype (fp32, bf16, fp16; wider ones are first
    rounded to fp32). Returns the same shape, uint8, on the same device,
    identical to ``x.float().to(torch.float8_e4m3fn).view(torch.uint8)`` in
    torch 2.13, including out-of-range inputs:

    - finite |x| > 448 and +-inf saturate to +-448 (0x7E / 0xFE): torch's
      conversion saturates, it does not produce NaN;
    - NaN stays NaN, 0x7F or 0xFF after the input's sign bit;
    - -0.0 encodes to 0x80, and magnitudes that round to zero keep their sign.
    """
    if not x.is_floating_point():
        raise ValueError(f"float_to_e4m3_bits needs a floating tensor, got {x.dtype}")
    f_bits = x.float().view(torch.int32)
    sign = (f_bits < 0).to(torch.int32) << 7
    a_bits = f_bits & 0x7FFFFFFF  # |x| as fp32 bits

    # Normal range: drop 20 mantissa bits, rounding to nearest even by adding
    # 0x7FFFF plus the lowest kept bit, then shift. A carry out of the mantissa
    # correctly bumps the exponent. Never overflows int32: a_bits < 2^31 and
    # the rebias is negative.
    mant_odd = (a_bits >> 20) & 1
    normal = (a_bits + (_EXP_REBIAS + 0x7FFFF) + mant_odd) >> 20
    # Rounding up from just under 480 lands on the NaN pattern: saturate.
    normal = torch.where(normal == 0x7F, 0x7E, normal)

    # Subnormal range (|x| < 2^-6): the code is |x| in units of 2^-9, rounded
    # half to even (torch.round does ties-to-even). Scaling by 512 is exact;
    # non-subnormal lanes are zeroed first so inf/NaN never reach the int cast.
    is_subnormal = a_bits < _F32_MIN_E4M3_NORMAL
    tiny = torch.where(is_subnormal, a_bits, 0).view(torch.float32)
    subnormal = torch.round(tiny * 512.0).to(torch.int32)  # 0..8; 8 == 2^-6 exactly

    code = torch.where(is_subnormal, subnormal, normal)
    code = torch.where(a_bits >= _F32_E4M3_OVERFLOW, 0x7E, code)  # saturate, incl. inf
    code = torch.where(a_bits > _F32_INF, 0x7F, code)  # NaN
    return (code | sign).to(torch.uint8)


def to_e4m3_bits(t: torch.Tensor) -> torch.Tensor:
    """uint8 view of e4m3fn data: a float8_e4m3fn tensor is viewed (no copy),
    a uint8 tensor is returned as is. Same shape and device."""
    if t.dtype == torch.uint8:
        return t
    if _FLOAT8_E4M3FN is not None and t.dtype == _FLOAT8_E4M3FN:
        return t.view(torch.uint8)
    raise ValueError(f"expected float8_e4m3fn or its uint8 view, got {t.dtype}")


def as_float8(t: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn view of e4m3fn data (the reverse of to_e4m3_bits): a uint8
    tensor is viewed (no copy), a float8_e4m3fn tensor is returned as is.

    Raises RuntimeError where this torch build has no float8_e4m3fn dtype.
    """
    if _FLOAT8_E4M3FN is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no float8_e4m3fn dtype; keep FP8 data "
            "as a uint8 view (to_e4m3_bits) and decode with e4m3_bits_to_float"
        )
    if t.dtype == _FLOAT8_E4M3FN:
        return t
    if t.dtype == torch.uint8:
        return t.view(_FLOAT8_E4M3FN)
    raise ValueError(f"expected uint8 e4m3fn codes or float8_e4m3fn, got {t.dtype}")
