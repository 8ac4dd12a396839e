"""Small-op hooks of the NVIDIA backend: one Triton launch each, generic where they can't.

RMSNorm (also fused with the residual add), rotary embedding and SwiGLU run the
portable kernels of
``chitu_core.kernels.small_ops``, the paged KV-cache write that of
``chitu_core.kernels.store_kv`` (the generic ops chain 2-10 small torch kernels
per call, which dominates batch-1 decode). The kernels raise ``ValueError``
before launching anything for calls they do not take (an unsupported dtype,
mismatched shapes): such calls run the generic op, and the first of each op is
logged, so a model that never fits the kernels is visible.
"""

from __future__ import annotations

import logging

import torch

from chitu_core.kernels import small_ops as _kernels
from chitu_core.kernels import store_kv as _store_kv
from chitu_core.ops import attention as generic_attention
from chitu_core.ops import small as generic
from chitu_nvidia.fallback import KernelFallback

logger = logging.getLogger(__name__)
_fallback = KernelFallback(logger)
_logged = _fallback.logged


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_rms_norm``: x ``[M, D]`` -> ``[M, D]`` x.dtype."""
    try:
        return _kernels.rms_norm(x, weight, eps)
    except ValueError as exc:
        _fallback("rms_norm", exc)
    return generic.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``chitu_core.hookspecs.chitu_add_rms_norm``: ``(normed, summed)``, ``[M, D]`` each."""
    try:
        return _kernels.add_rms_norm(x, residual, weight, eps)
    except ValueError as exc:
        _fallback("add_rms_norm", exc)
    return generic.add_rms_norm(x, residual, weight, eps)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``chitu_core.hookspecs.chitu_rope``: q ``[T, Hq, Dq]``, k ``[T, Hk, Dk]`` -> new (q, k)."""
    try:
        return _kernels.rope(q, k, positions, cos_sin_cache, is_neox_style)
    except ValueError as exc:
        _fallback("rope", exc)
    return generic.rope(q, k, positions, cos_sin_cache, is_neox_style)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_silu_and_mul``: x ``[M, 2I]`` -> ``[M, I]`` x.dtype."""
    try:
        return _kernels.silu_and_mul(x)
    except ValueError as exc:
        _fallback("silu_and_mul", exc)
    return generic.silu_and_mul(x)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor,
) -> None:
    """See ``chitu_core.hookspecs.chitu_store_kv``: key/value ``[T, Hkv, D]`` into the
    paged caches at ``slot_mapping``, in place."""
    try:
        _store_kv.store_kv(key, value, key_cache, value_cache, slot_mapping)
        return
    except ValueError as exc:
        _fallback("store_kv", exc)
    generic_attention.store_kv(key, value, key_cache, value_cache, slot_mapping)
