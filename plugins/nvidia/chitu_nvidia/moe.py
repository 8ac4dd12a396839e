"""``chitu_fused_moe`` on NVIDIA GPUs: the portable Triton fused MoE, generic where it can't.

The kernel takes bf16/fp16 activations and every weight format; fp32 runs (the
reference dtype) and bf16 experts at prefill sizes go to the generic op, whose
per-expert cuBLAS loop beats the kernel on dense weights there (Mixtral-like,
4096 tokens: 6.6 ms against 8.4 ms on an H200). The generic op reads the
per-expert counts on the host, so it is never used for a captured decode step:
decode batches are far below the threshold.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from chitu_core.kernels import fused_moe as _fused_moe
from chitu_core.kernels.packed_weight import as_packed
from chitu_core.ops import moe as generic
from chitu_core.quant import FORMAT_UNQUANTIZED
from chitu_nvidia.fallback import KernelFallback

logger = logging.getLogger(__name__)

# Tokens from which dense (bf16) experts take the generic cuBLAS loop.
DENSE_GENERIC_MIN_TOKENS = 1024
_fallback = KernelFallback(logger)


def fused_moe(
    x: torch.Tensor, w13: Any, w2: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_fused_moe``: x ``[T, H]``, returns ``[T, H]``."""
    w13, w2 = as_packed(w13), as_packed(w2)
    dense_prefill = w13.fmt == FORMAT_UNQUANTIZED and x.shape[0] >= DENSE_GENERIC_MIN_TOKENS
    if x.dtype in (torch.bfloat16, torch.float16) and not dense_prefill:
        try:
            return _fused_moe.fused_moe(
                x, w13.weight, w13.scale, w2.weight, w2.scale, w13.fmt, topk_weights, topk_ids,
                nan_codes=w13.has_nan_codes or w2.has_nan_codes,
            )  # fmt: skip
        except ValueError as exc:
            _fallback("fused_moe", exc)
    return generic.fused_moe(x, w13.as_quantized(), w2.as_quantized(), topk_weights, topk_ids)
