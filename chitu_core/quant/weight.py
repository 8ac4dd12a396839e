"""QuantizedWeight: the weight handle the loader builds and the engine passes on.

The loader wraps every linear/expert weight in one of these, whatever its
format, and hands it to the backend's ``prepare_weight`` hook, which may
repack it. Validation happens here, once, so a backend can trust the shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chitu_core.quant.block_fp8 import (
    check_block_scale,
    dequantize_block_fp8,
    quantize_block_fp8,
)
from chitu_core.quant.channel_fp8 import (
    check_channel_scale,
    dequantize_channel_fp8,
    quantize_channel_fp8,
)

# bf16 / fp16 / fp32 weight, no scale
FORMAT_UNQUANTIZED = "unquantized"
# DeepSeek-V3: e4m3 weight + weight_scale_inv [ceil(N/128), ceil(K/128)] fp32
FORMAT_FP8_BLOCK128 = "fp8_block128"
# e4m3 weight + weight_scale [N] fp32
FORMAT_FP8_CHANNEL = "fp8_channel"
WEIGHT_FORMATS = (FORMAT_UNQUANTIZED, FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL)

_DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# getattr: a torch build without float8 can still hold FP8 data as uint8.
_FP8_STORAGE_DTYPES = tuple(
    d for d in (getattr(torch, "float8_e4m3fn", None), torch.uint8) if d is not None
)


# eq=False: dataclass equality would compare tensors elementwise and fail on
# bool(); two handles are the same only if they are the same object.
@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight in one of WEIGHT_FORMATS, validated at construction.

    weight: [N, K] or stacked experts [E, N, K]. For FORMAT_UNQUANTIZED a
        floating tensor (bf16/fp16/fp32); for the FP8 formats float8_e4m3fn or
        its uint8 view (devices without a float8 dtype).
    scale: None for FORMAT_UNQUANTIZED; for FORMAT_FP8_BLOCK128 the
        weight_scale_inv [ceil(N/128), ceil(K/128)] (or [E, ...]) fp32; for
        FORMAT_FP8_CHANNEL the weight_scale [N] (or [E, N]) fp32.
    fmt: one of WEIGHT_FORMATS.

    Raises ValueError on an unknown format, a missing or unexpected scale, a
    wrong dtype or a scale whose shape does not fit the weight.
    """

    weight: torch.Tensor
    scale: torch.Tensor | None
    fmt: str

    def __post_init__(self) -> None:
        if self.fmt not in WEIGHT_FORMATS:
            raise ValueError(
                f"unknown weight format {self.fmt!r}; expected one of {WEIGHT_FORMATS}"
            )
        if self.weight.dim() not in (2, 3):
            raise ValueError(
                f"weight must be [N, K] or [E, N, K], got shape {tuple(self.weight.shape)}"
            )
        if self.fmt == FORMAT_UNQUANTIZED:
            if self.scale is not None:
                raise ValueError(
                    "an unquantized weight takes no scale; pass scale=None, or "
                    f"fmt={FORMAT_FP8_BLOCK128!r}/{FORMAT_FP8_CHANNEL!r} for FP8 data"
                )
            if self.weight.dtype not in _DENSE_DTYPES:
                raise ValueError(
                    f"an unquantized weight must be bf16/fp16/fp32, got {self.weight.dtype}"
                )
            return
        if self.scale is None:
            raise ValueError(f"format {self.fmt!r} needs a scale tensor, got None")
        if self.weight.dtype not in _FP8_STORAGE_DTYPES:
            raise ValueError(
                f"format {self.fmt!r} needs a float8_e4m3fn (or uint8 view) weight, got "
                f"{self.weight.dtype}; use quantize_fp8() to quantize a bf16 weight"
            )
        if not self.scale.is_floating_point():
            raise ValueError(f"scale must be floating (fp32), got {self.scale.dtype}")
        if self.fmt == FORMAT_FP8_BLOCK128:
            check_block_scale(self.weight, self.scale)
        else:
            check_channel_scale(self.weight, self.scale)

    @property
    def out_features(self) -> int:
        """N, the number of output rows."""
        return self.weight.shape[-2]

    @property
    def in_features(self) -> int:
        """K, the reduction dimension."""
        return self.weight.shape[-1]

    @property
    def num_experts(self) -> int | None:
        """E for stacked expert weights [E, N, K]; None for a plain [N, K] weight."""
        return self.weight.shape[0] if self.weight.dim() == 3 else None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense tensor: weight's shape, `dtype` (computed in fp32)."""
        if self.fmt == FORMAT_FP8_BLOCK128:
            return dequantize_block_fp8(self.weight, self.scale, dtype)
        if self.fmt == FORMAT_FP8_CHANNEL:
            return dequantize_channel_fp8(self.weight, self.scale, dtype)
        return self.weight.to(dtype)


def quantize_fp8(weight: torch.Tensor, fmt: str = FORMAT_FP8_BLOCK128) -> QuantizedWeight:
    """Quantize a dense weight at load time (``--quantize fp8``).

    weight: [N, K] or [E, N, K], bf16/fp16/fp32. fmt: FORMAT_FP8_BLOCK128 or
    FORMAT_FP8_CHANNEL. Returns a QuantizedWeight with a float8_e4m3fn weight
    and its fp32 scale (see quantize_block_fp8 / quantize_channel_fp8).
    """
    if fmt == FORMAT_FP8_BLOCK128:
        return QuantizedWeight(*quantize_block_fp8(weight), fmt)
    if fmt == FORMAT_FP8_CHANNEL:
        return QuantizedWeight(*quantize_channel_fp8(weight), fmt)
    raise ValueError(
        f"quantize_fp8 takes fmt {FORMAT_FP8_BLOCK128!r} or {FORMAT_FP8_CHANNEL!r}, got "
        f"{fmt!r}; an unquantized weight is QuantizedWeight(weight, None, {FORMAT_UNQUANTIZED!r})"
    )
