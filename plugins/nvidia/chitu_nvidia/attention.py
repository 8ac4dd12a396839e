"""Attention hooks of the NVIDIA backend: the portable Triton kernels, generic where they can't.

The kernels raise ``ValueError`` before launching anything when a call is outside
what they support (a block size that is not a power of two, mismatched dtypes, a
non-contiguous last dimension): such calls run the generic op, and the first
of each kind is logged, so a model that never fits the kernels is visible.

fp32 (debugging, oracle runs) always takes the generic op: the per-arch tiles are
sized for 2-byte elements, and the MLA ones would need more shared memory than any
GPU has in fp32 (prefill on sm_90: 311 KB of 227 KB).
"""

from __future__ import annotations

import logging

import torch

from chitu_core.kernels import mla_decode as _mla_decode
from chitu_core.kernels import paged_decode as _paged_decode
from chitu_core.kernels import paged_prefill as _paged_prefill
from chitu_core.ops import attention as generic
from chitu_nvidia.configs import mla_decode_config, mla_prefill_config
from chitu_nvidia.fallback import KernelFallback
from chitu_nvidia.linear import device_props

logger = logging.getLogger(__name__)
_fallback = KernelFallback(logger)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def paged_attention_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_paged_attention_decode``: q ``[B, Hq, D]``."""
    if q.dtype in KERNEL_DTYPES:
        _, num_sms = device_props(q.device.index or 0)
        try:
            return _paged_decode.paged_attention_decode(
                q, key_cache, value_cache, block_tables, context_lens, scale, num_sms=num_sms
            )
        except ValueError as exc:
            _fallback("paged_attention_decode", exc)
    return generic.paged_attention_decode(
        q, key_cache, value_cache, block_tables, context_lens, scale
    )


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_mla_decode``: q_latent ``[B, H, R]``."""
    if q_latent.dtype in KERNEL_DTYPES:
        capability, num_sms = device_props(q_latent.device.index or 0)
        try:
            return _mla_decode.mla_decode(
                q_latent, q_rope.to(latent_cache.dtype), latent_cache, block_tables,
                context_lens, scale, config=mla_decode_config(capability), num_sms=num_sms,
            )  # fmt: skip
        except ValueError as exc:
            _fallback("mla_decode", exc)
    return generic.mla_decode(q_latent, q_rope, latent_cache, block_tables, context_lens, scale)


def paged_attention_prefill(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_paged_attention_prefill``: q ``[T, Hq, D]``."""
    if q.dtype in KERNEL_DTYPES:
        try:
            return _paged_prefill.paged_attention_prefill(
                q, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, scale
            )
        except ValueError as exc:
            _fallback("paged_attention_prefill", exc)
    return generic.paged_attention_prefill(
        q, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, scale
    )


def mla_prefill(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_mla_prefill``: q_latent ``[T, H, R]``."""
    if q_latent.dtype in KERNEL_DTYPES:
        capability, _ = device_props(q_latent.device.index or 0)
        try:
            return _paged_prefill.mla_prefill(
                q_latent, q_rope.to(latent_cache.dtype), latent_cache, block_tables,
                cu_seqlens_q, context_lens, scale, config=mla_prefill_config(capability),
            )  # fmt: skip
        except ValueError as exc:
            _fallback("mla_prefill", exc)
    return generic.mla_prefill(
        q_latent, q_rope, latent_cache, block_tables, cu_seqlens_q, context_lens, scale
    )
