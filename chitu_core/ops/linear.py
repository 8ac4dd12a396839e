"""Generic weight preparation and GEMM: dequantize, then a dense matmul.

The generic handle is the loader's ``QuantizedWeight`` itself. ``linear``
widens it to the activation dtype on every call (exactly the e4m3 value times
its scale, via ``chitu_core.quant``), so FP8 weights keep 1 byte per element
in memory and cost one temporary dense copy per call: correct everywhere,
fast nowhere. Backends replace it with a fused kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from chitu_core.quant import QuantizedWeight


def prepare_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> QuantizedWeight:
    """See ``chitu_core.hookspecs.chitu_prepare_weight``. Returns the weight unchanged, validated."""
    return QuantizedWeight(weight, scale, fmt)


def check_handle(weight: Any, op: str) -> QuantizedWeight:
    """Raise TypeError unless ``weight`` is a generic handle (shared with ``fused_moe``)."""
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(
            f"generic {op} needs a chitu_core.quant.QuantizedWeight, got {type(weight).__name__}; "
            "a backend that implements prepare_weight must also implement linear and fused_moe"
        )
    return weight


def linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_linear``.

    x: [M, K] compute dtype; weight: a ``QuantizedWeight`` of an [N, K] weight;
    bias: [N] or None. The weight is dequantized to ``x.dtype`` and the
    product is ``torch.nn.functional.linear``, whose kernels accumulate in
    fp32 for half types. M = 0 gives [0, N].
    """
    handle = check_handle(weight, "linear")
    if handle.weight.dim() != 2:
        raise ValueError(
            f"linear needs an [N, K] weight, got {tuple(handle.weight.shape)}; "
            "stacked [E, N, K] expert weights go to fused_moe"
        )
    w = handle.dequantize(x.dtype)  # [N, K]
    b = None if bias is None else bias.to(x.dtype)
    return torch.nn.functional.linear(x, w, b)
