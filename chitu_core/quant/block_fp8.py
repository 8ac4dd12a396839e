"""DeepSeek-V3 block FP8: e4m3fn weights with one fp32 scale per 128x128 block.

A weight ``w: [N, K]`` is stored as ``weight: [N, K] float8_e4m3fn`` and
``weight_scale_inv: [ceil(N/128), ceil(K/128)] fp32`` with
``w ~= weight * weight_scale_inv`` broadcast over each block (the name is
DeepSeek's: it is the factor that undoes the quantization scale). Stacked
MoE experts ``[E, N, K]`` carry ``[E, ceil(N/128), ceil(K/128)]`` scales.
When N or K is not a multiple of 128 the last block row/column is partial;
its scale covers only the elements that exist.
"""

from __future__ import annotations

import torch

from chitu_core.quant.e4m3 import E4M3_MAX, e4m3_bits_to_float, to_e4m3_bits

FP8_BLOCK_SIZE = 128


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def block_scale_shape(weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """Expected weight_scale_inv shape for a weight of shape [N, K] or [E, N, K]."""
    *lead, n, k = weight_shape
    return (*lead, _ceil_div(n, FP8_BLOCK_SIZE), _ceil_div(k, FP8_BLOCK_SIZE))


def check_block_scale(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> None:
    """Raise ValueError unless weight is [N, K] or [E, N, K] and the scale fits it."""
    if weight.dim() not in (2, 3):
        raise ValueError(
            f"block FP8 weight must be [N, K] or [E, N, K], got shape {tuple(weight.shape)}"
        )
    expected = block_scale_shape(weight.shape)
    if tuple(weight_scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(weight_scale_inv.shape)} but weight "
            f"{tuple(weight.shape)} needs {expected}: one scale per "
            f"{FP8_BLOCK_SIZE}x{FP8_BLOCK_SIZE} block, the last block partial when N or K "
            f"is not a multiple of {FP8_BLOCK_SIZE}; check the checkpoint pairs each "
            "weight with its own weight_scale_inv"
        )


def _expand_blocks(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[..., Nb, Kb] -> [..., n, k]: each block's value repeated over its block."""
    full = scale.repeat_interleave(FP8_BLOCK_SIZE, dim=-2)[..., :n, :]
    return full.repeat_interleave(FP8_BLOCK_SIZE, dim=-1)[..., :k]


def quantize_block_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to DeepSeek-V3 block FP8.

    w: [N, K] or stacked experts [E, N, K], any floating dtype.
    Returns (weight, weight_scale_inv): weight has w's shape, float8_e4m3fn;
    weight_scale_inv is [ceil(N/128), ceil(K/128)] (or [E, ...]) fp32, equal
    to amax(|block|) / 448 so each block's largest magnitude maps to 448.

    An all-zero block gets scale 1.0 rather than 0: 0/0 would make its values
    NaN; any nonzero scale gives exact zeros. The same applies when amax is so
    small (< 448 * 2^-149) that amax / 448 underflows to 0.

    NaN in a block makes that block's scale NaN (amax propagates NaN), so the
    whole block quantizes to NaN codes and dequantizes to NaN; other blocks
    are unaffected. An inf makes the scale inf: the block's finite values
    quantize to 0 and the inf to NaN, and since 0 * inf is NaN the whole block
    dequantizes to NaN too. Neither raises: a bad block shows up in the output
    (and in conformance) instead of crashing the load.
    """
    if not w.is_floating_point():
        raise ValueError(f"quantize_block_fp8 needs a floating weight, got {w.dtype}")
    if w.dim() not in (2, 3):
        raise ValueError(f"weight must be [N, K] or [E, N, K], got shape {tuple(w.shape)}")
    *lead, n, k = w.shape
    nb, kb = _ceil_div(n, FP8_BLOCK_SIZE), _ceil_div(k, FP8_BLOCK_SIZE)
    wf = w.float()
    # Zero-pad to whole blocks so one reshape exposes them: padding adds |0|
    # to each block's amax, which changes nothing.
    padded = torch.nn.functional.pad(wf, (0, kb * FP8_BLOCK_SIZE - k, 0, nb * FP8_BLOCK_SIZE - n))
    blocks = padded.reshape(*lead, nb, FP8_BLOCK_SIZE, kb, FP8_BLOCK_SIZE)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale_inv = amax / E4M3_MAX
    scale_inv = torch.where(scale_inv == 0, torch.ones_like(scale_inv), scale_inv)
    # torch's float8 cast rounds to nearest even and saturates, bit-identical
    # to float_to_e4m3_bits (tested) but one fused op.
    weight = (wf / _expand_blocks(scale_inv, n, k)).to(torch.float8_e4m3fn)
    return weight, scale_inv


def dequantize_block_fp8(
    weight: torch.Tensor, weight_scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize DeepSeek-V3 block FP8: w = e4m3(weight) * weight_scale_inv per block.

    weight: [N, K] or [E, N, K], float8_e4m3fn or its uint8 view (any device).
    weight_scale_inv: [ceil(N/128), ceil(K/128)] (or [E, ...]), floating.
    Returns weight's shape in `dtype`; the product is computed in fp32 and
    cast once at the end, so fp32 output is exact up to one fp32 rounding.
    """
    bits = to_e4m3_bits(weight)
    check_block_scale(bits, weight_scale_inv)
    *lead, n, k = bits.shape
    scale = weight_scale_inv.float()
    if n % FP8_BLOCK_SIZE or k % FP8_BLOCK_SIZE:
        w = e4m3_bits_to_float(bits) * _expand_blocks(scale, n, k)
        return w.to(dtype)
    # Whole blocks: a broadcast over a block view, no [N, K] scale temporary.
    nb, kb = n // FP8_BLOCK_SIZE, k // FP8_BLOCK_SIZE
    blocks = e4m3_bits_to_float(bits).view(*lead, nb, FP8_BLOCK_SIZE, kb, FP8_BLOCK_SIZE)
    w = blocks * scale[..., :, None, :, None]
    return w.view(*lead, n, k).to(dtype)
