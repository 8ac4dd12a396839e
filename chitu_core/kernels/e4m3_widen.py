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
* ``_e4m3_to_f16_ptx``: NVIDIA inline PTX over 4 codes per 32-bit register
  (prmt, lop3, shr, then the NaN fix in f16x2): 3 instructions per element.
  Any sm_53+ target (sm_80/86 included).

FLOPs/bytes: none of memory; about 3 (PTX) or 8 (portable) ALU ops per element.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The factor callers must multiply in (into the scale): widened = e4m3 * 2^-8.
WIDEN_SCALE_FIX = 256.0

# fp16 36864 = 0x7880 in both halves: 1.75 * 36864 finite, 1.875 * 36864 -> inf.
_PTX_E4M3X4_TO_F16X4 = tl.constexpr("""
{
    .reg .b32 a<2>, b<2>, c<2>, big, zero;
    mov.b32 big, 0x78807880;
    mov.b32 zero, 0;
    prmt.b32 a0, 0, $2, 0x5040;
    prmt.b32 a1, 0, $2, 0x7060;
    and.b32 b0, a0, 0x7fff7fff;
    and.b32 b1, a1, 0x7fff7fff;
    shr.b32 b0, b0, 1;
    shr.b32 b1, b1, 1;
    lop3.b32 c0, b0, 0x80008000, a0, 0xf8;
    lop3.b32 c1, b1, 0x80008000, a1, 0xf8;
    mul.rn.f16x2 b0, c0, big;
    mul.rn.f16x2 b1, c1, big;
    fma.rn.f16x2 $0, b0, zero, c0;
    fma.rn.f16x2 $1, b1, zero, c1;
}
""")


@triton.jit
def _e4m3_to_f16_portable(bits):
    """bits: uint8 tensor of e4m3fn codes -> fp16 tensor of ``e4m3 * 2^-8`` (NaN kept)."""
    b = bits.to(tl.int32)
    # sign to bit 15, exponent+mantissa to bits 7..13 (no rebias: see module doc)
    h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    v = h.to(tl.int16).to(tl.float16, bitcast=True)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def _e4m3_to_f16_ptx(bits):
    """Same function as ``_e4m3_to_f16_portable``, inline PTX, 4 codes per register."""
    return tl.inline_asm_elementwise(
        asm=_PTX_E4M3X4_TO_F16X4,
        constraints="=r,=r,r",
        args=[bits],
        dtype=tl.float16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def e4m3_to_f16_x256(bits, USE_PTX: tl.constexpr):
    """Widen e4m3fn codes to fp16 holding ``value / 256`` exactly (all 256 codes).

    bits: uint8 tensor (any shape). Returns an fp16 tensor of the same shape.
    Multiply by ``WIDEN_SCALE_FIX`` (fold it into the scale) for the true value;
    ``.to(tl.float32)``/``.to(tl.bfloat16)`` of the result is exact.
    USE_PTX selects the NVIDIA inline-PTX version (not for HIP or the interpreter).
    """
    if USE_PTX:
        return _e4m3_to_f16_ptx(bits)
    else:
        return _e4m3_to_f16_portable(bits)


@triton.jit
def e4m3_widen_kernel(
    bits_ptr,
    out_ptr,
    num_elements,
    USE_PTX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[i] = e4m3(bits[i]) in out's dtype (fp32 or bf16): the widening on its own, for tests."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_elements
    bits = tl.load(bits_ptr + offs, mask=mask, other=0)
    v = e4m3_to_f16_x256(bits, USE_PTX).to(tl.float32) * 256.0  # WIDEN_SCALE_FIX
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def e4m3_widen(bits, dtype=None, use_ptx: bool = False):
    """Widen a uint8 (or float8_e4m3fn) tensor of any shape to ``dtype`` (default fp32).

    Runs the Triton widening alone (tests and debugging). Returns a new tensor on
    the same device.
    """
    import torch

    if bits.dtype != torch.uint8:
        bits = bits.view(torch.uint8)
    flat = bits.contiguous().reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype or torch.float32, device=bits.device)
    block = 1024
    grid = (triton.cdiv(flat.numel(), block),)
    if flat.numel():
        e4m3_widen_kernel[grid](flat, out, flat.numel(), USE_PTX=use_ptx, BLOCK=block)
    return out.reshape(bits.shape)
