"""FP8 formats: e4m3fn encode/decode, block-128 and per-channel weights, the weight handle."""

from __future__ import annotations

from chitu_core.quant.block_fp8 import (
    FP8_BLOCK_SIZE,
    block_scale_shape,
    dequantize_block_fp8,
    quantize_block_fp8,
)
from chitu_core.quant.channel_fp8 import (
    channel_scale_shape,
    dequantize_channel_fp8,
    quantize_channel_fp8,
)
from chitu_core.quant.e4m3 import (
    E4M3_MAX,
    as_float8,
    e4m3_bits_to_float,
    float_to_e4m3_bits,
    to_e4m3_bits,
)
from chitu_core.quant.weight import (
    FORMAT_FP8_BLOCK128,
    FORMAT_FP8_CHANNEL,
    FORMAT_UNQUANTIZED,
    WEIGHT_FORMATS,
    QuantizedWeight,
    quantize_fp8,
)

__all__ = [
    "E4M3_MAX",
    "FORMAT_FP8_BLOCK128",
    "FORMAT_FP8_CHANNEL",
    "FORMAT_UNQUANTIZED",
    "FP8_BLOCK_SIZE",
    "WEIGHT_FORMATS",
    "QuantizedWeight",
    "as_float8",
    "block_scale_shape",
    "channel_scale_shape",
    "dequantize_block_fp8",
    "dequantize_channel_fp8",
    "e4m3_bits_to_float",
    "float_to_e4m3_bits",
    "quantize_block_fp8",
    "quantize_channel_fp8",
    "quantize_fp8",
    "to_e4m3_bits",
]
