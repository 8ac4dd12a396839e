"""Weights and GeMM: ``chitu_prepare_weight`` and ``chitu_linear``.

The handle is a ``chitu_core.quant.QuantizedWeight`` kept as loaded (FP8 stays
one byte per element). ``dense_weight`` widens it to fp64 by the spec's own
formula, ``W[n, k] = e4m3(weight[n, k]) * scale[...]``: every e4m3 value times an
fp32 scale is exact in fp64, so the oracle's weights carry no rounding at all.
"""

from __future__ import annotations

import torch

from chitu_core.hookspecs import hookimpl
from chitu_core.quant import (
    FORMAT_FP8_BLOCK128,
    FORMAT_FP8_CHANNEL,
    FORMAT_UNQUANTIZED,
    QuantizedWeight,
    e4m3_bits_to_float,
)

BLOCK = 128  # DeepSeek-V3 block edge, restated here so the oracle reads alone
# Output rows dequantized at a time: bounds the fp64 copy of a large weight
# (an lm_head is ~130k rows) without changing any result.
ROWS_PER_CHUNK = 4096  # a multiple of 128: chunks hold whole block rows


def dense_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """Exact dense weight in fp64.

    weight: ``[..., N, K]`` (float8_e4m3fn or its uint8 view for FP8 formats);
    scale: ``[..., ceil(N/128), ceil(K/128)]`` (block), ``[..., N]`` (channel) or
    None. Returns ``[..., N, K]`` float64.
    """
    if fmt == FORMAT_UNQUANTIZED:
        return weight.double()
    values = e4m3_bits_to_float(weight).double()
    n, k = weight.shape[-2:]
    if fmt == FORMAT_FP8_BLOCK128:
        # W[n, k] = value[n, k] * scale[n // 128, k // 128]: pad to whole blocks, then broadcast.
        nb, kb = -(-n // BLOCK), -(-k // BLOCK)
        padded = torch.nn.functional.pad(values, (0, kb * BLOCK - k, 0, nb * BLOCK - n))
        blocks = padded.view(*values.shape[:-2], nb, BLOCK, kb, BLOCK)
        dense = (blocks * scale.double()[..., :, None, :, None]).view(
            *values.shape[:-2], nb * BLOCK, kb * BLOCK
        )
        return dense[..., :n, :k]
    if fmt == FORMAT_FP8_CHANNEL:
        return values * scale.double()[..., :, None]  # scale[n]
    raise ValueError(f"cpu_ref: unknown weight format {fmt!r}")


def check_handle(handle: QuantizedWeight) -> None:
    """Raise TypeError unless ``handle`` came from ``chitu_prepare_weight``."""
    if not isinstance(handle, QuantizedWeight):
        raise TypeError(
            f"cpu_ref expects weight handles from its chitu_prepare_weight "
            f"(QuantizedWeight), got {type(handle).__name__}"
        )


@hookimpl
def chitu_prepare_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str):
    """Wrap the loaded weight unchanged (QuantizedWeight validates it); see the spec."""
    return QuantizedWeight(weight=weight, scale=scale, fmt=fmt)


def _dense_rows(handle: QuantizedWeight, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a ``[N, K]`` handle as dense fp64; ``start % 128 == 0``."""
    scale = handle.scale
    if handle.fmt == FORMAT_FP8_BLOCK128:
        scale = scale[start // BLOCK : -(-stop // BLOCK)]
    elif handle.fmt == FORMAT_FP8_CHANNEL:
        scale = scale[start:stop]
    return dense_weight(handle.weight[start:stop], scale, handle.fmt)


@hookimpl
def chitu_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``y = x @ W^T + bias``. x ``[M, K]``, W ``[N, K]`` handle, bias ``[N]`` or None.

    Returns ``[M, N]`` in ``x.dtype``, computed in fp64 and rounded once.
    """
    check_handle(weight)
    x64 = x.double()
    num_rows = weight.out_features
    y = x64.new_empty(x.shape[0], num_rows)
    for start in range(0, num_rows, ROWS_PER_CHUNK):
        stop = min(start + ROWS_PER_CHUNK, num_rows)
        y[:, start:stop] = x64 @ _dense_rows(weight, start, stop).T
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)
