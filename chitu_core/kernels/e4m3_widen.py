"""Widen e4m3fn bits (uint8) to floating values inside Triton kernels, exactly.

No hardware FP8 conversion is used, so kernels that call these helpers compile
for sm_80/sm_86 (Ampere) and HIP targets. The trap with the obvious trick
(shift the bits into bf16 position, multiply by 2^120): e4m3 subnormals
(exponent field 0, codes 1-7) become bf16 subnormals, which some paths flush
to zero (the Triton CPU interpreter does), and NaN (0x7F/0xFF) becomes a
finite +-480.

The trick used here: e4m3 and fp16 both have IEEE subnormals, and an e4m3
code placed bit for bit into an fp16 (sign to bit 15, exponent+mantissa to
bits 7..13) keeps its exponent field, so it reads as ``value * 2^-8`` for
EVERY code, subnormals included (an e4m3 subnormal lands on an fp16
subnormal of the same mantissa, and fp16 subnormals are never flushed). The
missing factor 256 is a power of two: callers fold it into the block or
channel scale, so nothing rounds. NaN: codes 0x7F/0xFF read as +-1.875,
the only magnitude above 448/256 = 1.75; they are turned into NaN by
``t = v * 36864`` (1.75 * 36864 = 64512 is finite in fp16, 1.875 * 36864
overflows to inf) and ``fma(t, 0, v)``, which is ``v`` for finite ``t``
(signed zeros kept) and NaN for infinite ``t``.

Two implementations of the same function:

* ``_e4m3_to_f16_portable``: plain ``tl`` integer ops and one ``tl.where``;
  runs everywhere, including ``TRITON_INTERPRET=1`` and HIP.
* ``_e4m3_to_f16_ptx``: NVIDIA inline PTX over 4 codes per 32-bit register:
  per pair of codes one prmt (code in the low byte of each half, its sign
  replicated over the high byte), shl 7 and one and (sign to bit 15,
  exponent+mantissa to bits 13..7), then the NaN fix in f16x2: 2.5
  instructions per element.
  Any sm_53+ target (sm_80/86 included).

The NaN fix is a third of the fp16 widening's instructions and half of the
bf16 one's, for codes that real checkpoints do not contain. ``NAN=False``
drops it: every other code still widens exactly, while 0x7F/0xFF read as
+-480 instead of NaN. Callers pass ``NAN=False`` only for weights checked
at load to hold no NaN code (``PackedWeight.has_nan_codes``), so the
result is exact for every weight.

FLOPs/bytes: none of memory; about 2.5 (fp16, PTX), 3 (bf16, PTX) or 8 (portable) ops per
element with the NaN fix, 1.5 (fp16) and 2 (bf16) without.
``e4m3_to_bf16`` gives the exact value as bf16 (no 2^-8 factor): what a bf16 MMA wants,
without the fp16 -> bf16 conversion (F2F, a quarter-rate instruction per element).
``e4m3_scaled_to_bf16`` widens and multiplies by a block scale in the same pass
(2.5 instructions per element, NVIDIA only), for kernels that fold the scale into the
MMA operand instead of scaling each partial sum.
"""

from __future__ import annotations

import re

import triton
import triton.language as tl

# The factor callers must multiply in (into the scale): widened = e4m3 * 2^-8.
WIDEN_SCALE_FIX = 256.0


def _ptx_widen(shift: int, mask: str, regs: str, setup: str, tail: str) -> tl.constexpr:
    """Inline PTX widening the 4 e4m3 codes of ``$2`` into two 16-bit pairs ``$0``, ``$1``.

    Per pair of codes: one prmt (each code in the low byte of a 16-bit half, its sign
    replicated over the high byte), a shift and a mask into ``g0``/``g1``; then ``tail``
    (which reads ``g0``/``g1`` and writes the outputs). ``regs``/``setup``: the tail's
    extra registers and their constants.
    """
    return tl.constexpr(
        "{\n"
        f"    .reg .b32 h<2>, g<2>{regs};\n{setup}"
        "    prmt.b32 h0, $2, 0, 0x9180;\n"
        "    prmt.b32 h1, $2, 0, 0xB3A2;\n"
        f"    shl.b32 g0, h0, {shift};\n"
        f"    shl.b32 g1, h1, {shift};\n"
        f"    and.b32 g0, g0, {mask};\n"
        f"    and.b32 g1, g1, {mask};\n"
        f"{tail}}}\n"
    )


# fp16: << 7, & 0xBF80 put the sign at bit 15 and exponent+mantissa at bits 13..7: the
# fp16 ``value * 2^-8`` (module doc). NaN fix: fp16 36864 = 0x7880 in both halves:
# 1.75 * 36864 finite, 1.875 * 36864 -> inf, and fma(t, 0, v) is v or NaN.
_PTX_E4M3X4_TO_F16X4 = _ptx_widen(
    7, "0xBF80BF80", ", b<2>, big, zero",
    "    mov.b32 big, 0x78807880;\n    mov.b32 zero, 0;\n",
    "    mul.rn.f16x2 b0, g0, big;\n    mul.rn.f16x2 b1, g1, big;\n"
    "    fma.rn.f16x2 $0, b0, zero, g0;\n    fma.rn.f16x2 $1, b1, zero, g1;\n",
)  # fmt: skip

# bf16 (values, not scaled): << 4 and & 0x87F0 leave the sign at bit 15 and
# exponent+mantissa at bits 10..4, i.e. the bf16 ``value * 2^-120`` (a bf16 subnormal for
# e4m3 subnormals); fma by 2^120 (0x7B80, addend -0 so signed zeros survive) makes it a
# normal bf16, exactly (bf16 fma keeps subnormal inputs). NaN: 448 * 1.0703125 * 2^119
# rounds to a finite bf16, 480 * that to inf, and fma(t, 0, v) is v for finite t and NaN
# for inf t. 6 instructions per 2 codes, no F2F.
_BF16_SETUP = "    mov.b32 two120, 0x7B807B80;\n    mov.b32 mzero, 0x80008000;\n"
_PTX_E4M3X4_TO_BF16X4 = _ptx_widen(
    4, "0x87F087F0", ", v<2>, t<2>, two120, big, mzero, zero",
    _BF16_SETUP + "    mov.b32 big, 0x7B097B09;\n    mov.b32 zero, 0;\n",
    "    fma.rn.bf16x2 v0, g0, two120, mzero;\n    fma.rn.bf16x2 v1, g1, two120, mzero;\n"
    "    fma.rn.bf16x2 t0, v0, big, mzero;\n    fma.rn.bf16x2 t1, v1, big, mzero;\n"
    "    fma.rn.bf16x2 $0, t0, zero, v0;\n    fma.rn.bf16x2 $1, t1, zero, v1;\n",
)  # fmt: skip

# The same two widenings without the NaN fix (for weights with no 0x7F/0xFF code):
# fp16 3 instructions per 2 codes, bf16 4 (the fma by 2^120 stays: it makes subnormals exact).
_PTX_E4M3X4_TO_F16X4_NO_NAN = _ptx_widen(
    7, "0xBF80BF80", "", "", "    mov.b32 $0, g0;\n    mov.b32 $1, g1;\n"
)
_PTX_E4M3X4_TO_BF16X4_NO_NAN = _ptx_widen(
    4, "0x87F087F0", ", two120, mzero", _BF16_SETUP,
    "    fma.rn.bf16x2 $0, g0, two120, mzero;\n    fma.rn.bf16x2 $1, g1, two120, mzero;\n",
)  # fmt: skip


# Widen and scale in one: ``$0``/``$1`` = bf16(e4m3 * s) for 4 codes, s given as bf16 pairs
# s_hi (``$3``, ``$4``) + s_lo (``$5``, ``$6``), both already multiplied by 2^120 / FOLD_FIX
# (the exponent fix of the bf16 widening, less FOLD_FIX, which the caller multiplies back
# once at the end). Per pair of codes: the widening (``g``, ``value * 2^-120``), then
# fma(g, s_hi, g * s_lo): one rounding of a product that carries s to 16 significant
# bits. 5 instructions per 2 codes; no NaN fix.
_SCALED_TAIL = (
    "    fma.rn.bf16x2 t0, g0, $5, mzero;\n    fma.rn.bf16x2 t1, g1, $6, mzero;\n"
    "    fma.rn.bf16x2 $0, g0, $3, t0;\n    fma.rn.bf16x2 $1, g1, $4, t1;\n"
)
_PTX_E4M3X4_SCALED_TO_BF16X4_NO_NAN = _ptx_widen(
    4, "0x87F087F0", ", t<2>, mzero", "    mov.b32 mzero, 0x80008000;\n", _SCALED_TAIL
)
# With the NaN fix: the unscaled value v (as ``_PTX_E4M3X4_TO_BF16X4``) times ``big`` is inf
# only for the NaN codes, and fma(inf, 0, r) is NaN (r finite otherwise, fma(t, 0, r) = r).
_PTX_E4M3X4_SCALED_TO_BF16X4 = _ptx_widen(
    4, "0x87F087F0", ", t<2>, r<2>, v<2>, two120, big, mzero, zero",
    _BF16_SETUP + "    mov.b32 big, 0x7B097B09;\n    mov.b32 zero, 0;\n",
    _SCALED_TAIL.replace("$0,", "r0,").replace("$1,", "r1,")
    + "    fma.rn.bf16x2 v0, g0, two120, mzero;\n    fma.rn.bf16x2 v1, g1, two120, mzero;\n"
    "    fma.rn.bf16x2 v0, v0, big, mzero;\n    fma.rn.bf16x2 v1, v1, big, mzero;\n"
    "    fma.rn.bf16x2 $0, v0, zero, r0;\n    fma.rn.bf16x2 $1, v1, zero, r1;\n",
)  # fmt: skip

# The scaled widening's result is ``e4m3 * s / FOLD_FIX``: s * 2^120 would overflow bf16
# for s >= 2^7, so 2^32 of it is left for the caller. Scales s with
# FOLD_SCALE_MIN <= |s| < FOLD_SCALE_MAX (or 0) keep every product a normal bf16.
FOLD_FIX = 2.0**32
FOLD_SCALE_MIN = 2.0**-85
FOLD_SCALE_MAX = 2.0**39


@triton.jit
def _e4m3_to_f16_portable(bits, NAN: tl.constexpr = True):
    """bits: uint8 tensor of e4m3fn codes -> fp16 tensor of ``e4m3 * 2^-8`` (NaN kept
    when NAN, else 0x7F/0xFF read as +-480/256)."""
    b = bits.to(tl.int32)
    # sign to bit 15, exponent+mantissa to bits 7..13 (no rebias: see module doc)
    h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    v = h.to(tl.int16).to(tl.float16, bitcast=True)
    if NAN:
        v = tl.where((b & 0x7F) == 0x7F, float("nan"), v)
    return v


@triton.jit
def _e4m3_to_f16_ptx(bits, NAN: tl.constexpr = True):
    """Same function as ``_e4m3_to_f16_portable``, inline PTX, 4 codes per register."""
    return tl.inline_asm_elementwise(
        asm=_PTX_E4M3X4_TO_F16X4 if NAN else _PTX_E4M3X4_TO_F16X4_NO_NAN,
        constraints="=r,=r,r",
        args=[bits],
        dtype=tl.float16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def e4m3_to_f16_x256(bits, USE_PTX: tl.constexpr, NAN: tl.constexpr = True):
    """Widen e4m3fn codes to fp16 holding ``value / 256`` exactly (all 256 codes).

    bits: uint8 tensor (any shape). Returns an fp16 tensor of the same shape.
    Multiply by ``WIDEN_SCALE_FIX`` (fold it into the scale) for the true value;
    ``.to(tl.float32)``/``.to(tl.bfloat16)`` of the result is exact.
    USE_PTX selects the NVIDIA inline-PTX version (not for HIP or the interpreter).
    NAN=False: no NaN fix, only for codes known to hold no 0x7F/0xFF (module doc).
    """
    if USE_PTX:
        return _e4m3_to_f16_ptx(bits, NAN)
    else:
        return _e4m3_to_f16_portable(bits, NAN)


@triton.jit
def _e4m3_to_bf16_ptx(bits, NAN: tl.constexpr = True):
    return tl.inline_asm_elementwise(
        asm=_PTX_E4M3X4_TO_BF16X4 if NAN else _PTX_E4M3X4_TO_BF16X4_NO_NAN,
        constraints="=r,=r,r",
        args=[bits],
        dtype=tl.bfloat16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def e4m3_to_bf16(bits, USE_PTX: tl.constexpr, NAN: tl.constexpr = True):
    """Widen e4m3fn codes to bf16 holding the exact value (all 256 codes, NaN kept).

    Unlike ``e4m3_to_f16_x256`` no 2^-8 factor: the result is the value itself.
    USE_PTX: NVIDIA inline PTX (sm_80+: bf16x2 fma); else via the portable fp16 route.
    NAN=False: no NaN fix, only for codes known to hold no 0x7F/0xFF (module doc).
    """
    if USE_PTX:
        return _e4m3_to_bf16_ptx(bits, NAN)
    else:
        return (_e4m3_to_f16_portable(bits, NAN).to(tl.float32) * 256.0).to(tl.bfloat16)


@triton.jit
def e4m3_scaled_to_bf16(bits, scale, NAN: tl.constexpr = True):
    """bf16(e4m3(bits) * scale) / FOLD_FIX in one inline-PTX pass (NVIDIA, sm_80+).

    bits: uint8 tensor of codes; scale: fp32 tensor broadcastable to it, each
    FOLD_SCALE_MIN <= |scale| < FOLD_SCALE_MAX or 0 (else products overflow or leave
    the normal range). The result is within 0.5 bf16 ulp (plus 2^-16 relative) of
    ``e4m3 * scale / FOLD_FIX``; multiply FOLD_FIX back in fp32. NAN=False: no NaN
    fix (codes known NaN-free).
    """
    sf = scale * 309485009821345068724781056.0  # 2^120 / FOLD_FIX = 2^88, exact
    s_hi = sf.to(tl.bfloat16)
    s_lo = (sf - s_hi.to(tl.float32)).to(tl.bfloat16)
    s_hi = tl.broadcast_to(s_hi, bits.shape)
    s_lo = tl.broadcast_to(s_lo, bits.shape)
    return tl.inline_asm_elementwise(
        asm=_PTX_E4M3X4_SCALED_TO_BF16X4 if NAN else _PTX_E4M3X4_SCALED_TO_BF16X4_NO_NAN,
        constraints="=r,=r,r,r,r,r,r",
        args=[bits, s_hi, s_lo],
        dtype=tl.bfloat16,
        is_pure=True,
        pack=4,
    )


def _split_outputs(asm: str) -> tl.constexpr:
    """The scaled widening rewritten for one int32 of 4 codes in and 4 bf16 out: the same
    instructions, results unpacked into four 16-bit outputs (``$0``..``$3``: codes 0..3 of
    the word), the word in ``$4`` and the scale pairs in ``$5`` (hi) and ``$6`` (lo), each
    the same row scale in both halves."""
    regs = {"0": "o0", "1": "o1", "2": "$4", "3": "$5", "4": "$5", "5": "$6", "6": "$6"}
    body = re.sub(r"\$(\d)", lambda m: regs[m.group(1)], asm.value)
    body = body.replace("{\n", "{\n    .reg .b32 o<2>;\n", 1)
    return tl.constexpr(
        body.rstrip()[:-1] + "    mov.b32 {$0, $1}, o0;\n    mov.b32 {$2, $3}, o1;\n}\n"
    )


_PTX_WORD_SCALED_TO_BF16 = _split_outputs(_PTX_E4M3X4_SCALED_TO_BF16X4)
_PTX_WORD_SCALED_TO_BF16_NO_NAN = _split_outputs(_PTX_E4M3X4_SCALED_TO_BF16X4_NO_NAN)


@triton.jit
def e4m3_word_scaled_to_bf16(words, scale, NAN: tl.constexpr = True):
    """``e4m3_scaled_to_bf16`` of the 4 codes packed in each int32 of ``words`` (code j in
    bits 8j..8j+7), NVIDIA inline PTX: returns 4 bf16 tensors of ``words``' shape, code 0
    to 3, each ``bf16(e4m3 * scale) / FOLD_FIX``. scale: fp32, one per row of ``words``
    (shape ``[rows]``), in the range of ``e4m3_scaled_to_bf16``. Unlike that helper, the
    codes need no gathering into registers: one 32-bit load feeds one widening."""
    sf = scale * 309485009821345068724781056.0  # 2^120 / FOLD_FIX = 2^88, exact
    s_hi = sf.to(tl.bfloat16)
    s_lo = (sf - s_hi.to(tl.float32)).to(tl.bfloat16)
    b_hi = s_hi.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    b_lo = s_lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi2 = tl.broadcast_to((b_hi | (b_hi << 16))[:, None], words.shape)
    lo2 = tl.broadcast_to((b_lo | (b_lo << 16))[:, None], words.shape)
    return tl.inline_asm_elementwise(
        asm=_PTX_WORD_SCALED_TO_BF16 if NAN else _PTX_WORD_SCALED_TO_BF16_NO_NAN,
        constraints="=h,=h,=h,=h,r,r,r",
        args=[words, hi2, lo2],
        dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=1,
    )


@triton.jit
def e4m3_widen_kernel(
    bits_ptr,
    out_ptr,
    num_elements,
    USE_PTX: tl.constexpr,
    BLOCK: tl.constexpr,
    BF16: tl.constexpr = False,
    NAN: tl.constexpr = True,
):
    """out[i] = e4m3(bits[i]) in out's dtype (fp32 or bf16): the widening on its own, for tests.
    BF16: through ``e4m3_to_bf16`` instead of the fp16 widening; NAN: with the NaN fix."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_elements
    bits = tl.load(bits_ptr + offs, mask=mask, other=0)
    if BF16:
        v = e4m3_to_bf16(bits, USE_PTX, NAN).to(tl.float32)
    else:
        v = e4m3_to_f16_x256(bits, USE_PTX, NAN).to(tl.float32) * 256.0  # WIDEN_SCALE_FIX
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def e4m3_widen(bits, dtype=None, use_ptx: bool = False, bf16: bool = False, nan: bool = True):
    """Widen a uint8 (or float8_e4m3fn) tensor of any shape to ``dtype`` (default fp32).

    Runs the Triton widening alone (tests and debugging). Returns a new tensor on
    the same device. nan=False: the widening without the NaN fix (0x7F/0xFF -> +-480).
    """
    import torch

    if bits.dtype != torch.uint8:
        bits = bits.view(torch.uint8)
    flat = bits.contiguous().reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype or torch.float32, device=bits.device)
    block = 1024
    grid = (triton.cdiv(flat.numel(), block),)
    if flat.numel():
        e4m3_widen_kernel[grid](
            flat, out, flat.numel(), USE_PTX=use_ptx, BLOCK=block, BF16=bf16, NAN=nan
        )
    return out.reshape(bits.shape)
