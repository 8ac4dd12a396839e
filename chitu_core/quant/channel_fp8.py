"""Per-output-channel FP8: e4m3fn weights with one fp32 scale per row.

A weight ``w: [N, K]`` is stored as ``weight: [N, K] float8_e4m3fn`` and
``weight_scale: [N] fp32`` with ``w ~= weight * weight_scale[:, None]``;
stacked experts ``[E, N, K]`` carry ``[E, N]`` scales.
"""

from __future__ import annotations

import torch

from chitu_core.quant.e4m3 import E4M3_MAX, e4m3_bits_to_float, to_e4m3_bits


def channel_scale_shape(weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """Expected weight_scale shape for a weight of shape [N, K] or [E, N, K]."""
    return tuple(weight_shape[:-1])


def check_channel_scale(weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    """Raise ValueError unless weight is [N, K] or [E, N, K] and the scale fits it."""
    if weight.dim() not in (2, 3):
        raise ValueError(
            f"channel FP8 weight must be [N, K] or [E, N, K], got shape {tuple(weight.shape)}"
        )
    expected = channel_scale_shape(weight.shape)
    if tuple(weight_scale.shape) != expected:
        raise ValueError(
            f"weight_scale has shape {tuple(weight_scale.shape)} but weight "
            f"{tuple(weight.shape)} needs {expected}: one scale per output row; a "
            "[N, 1] scale must be squeezed to [N] before building the weight"
        )


def quantize_channel_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to per-output-channel FP8.

    w: [N, K] or stacked experts [E, N, K], any floating dtype.
    Returns (weight, weight_scale): weight has w's shape, float8_e4m3fn;
    weight_scale is [N] (or [E, N]) fp32, equal to amax(|row|) / 448.

    An all-zero row gets scale 1.0 (0/0 would make it NaN). NaN or inf in a
    row makes that row dequantize to NaN, as for block FP8; it does not raise.
    """
    if not w.is_floating_point():
        raise ValueError(f"quantize_channel_fp8 needs a floating weight, got {w.dtype}")
    if w.dim() not in (2, 3):
        raise ValueError(f"weight must be [N, K] or [E, N, K], got shape {tuple(w.shape)}")
    wf = w.float()
    scale = wf.abs().amax(dim=-1) / E4M3_MAX  # [..., N]
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    weight = (wf / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    return weight, scale


def dequantize_channel_fp8(
    weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize per-channel FP8: w = e4m3(weight) * weight_scale[..., None].

    weight: [N, K] or [E, N, K], float8_e4m3fn or its uint8 view (any device).
    weight_scale: [N] or [E, N], floating. Returns weight's shape in `dtype`,
    computed in fp32 and cast once at the end.
    """
    bits = to_e4m3_bits(weight)
    check_channel_scale(bits, weight_scale)
    w = e4m3_bits_to_float(bits) * weight_scale.float().unsqueeze(-1)
    return w.to(dtype)
