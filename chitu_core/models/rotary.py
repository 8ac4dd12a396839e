"""Rotary embedding tables (``cos_sin_cache`` of ``chitu_rope``) with HF's scaling variants.

Supported ``rope_scaling`` types: none/"default", "linear", "llama3" (Llama 3.1+)
and "yarn" (DeepSeek-V3, with mscale). The frequency math follows HF transformers'
``modeling_rope_utils`` so that logits match it.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).double() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(
    dim: int, base: float, scaling: dict[str, Any], max_position: int
) -> tuple[torch.Tensor, float]:
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings", max_position)
    beta_fast = scaling.get("beta_fast", 32)
    beta_slow = scaling.get("beta_slow", 1)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = _base_inv_freq(dim, base)
    interpolation = extrapolation / factor
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = scaling.get("attention_factor") or yarn_mscale(factor)
    return inv_freq, attention_factor


def cos_sin_cache(
    rotary_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The ``[max_position, rotary_dim]`` fp32 table of ``chitu_rope``: cos then sin per row.

    ``rope_scaling`` is config.json's dict (its ``type`` or ``rope_type`` key picks the
    variant). YaRN's attention factor multiplies both cos and sin, as in HF.
    """
    scaling = dict(rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    attention_factor = 1.0
    if kind == "default":
        inv_freq = _base_inv_freq(rotary_dim, base)
    elif kind == "linear":
        inv_freq = _base_inv_freq(rotary_dim, base) / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(_base_inv_freq(rotary_dim, base), scaling)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn_inv_freq(rotary_dim, base, scaling, max_position)
    else:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported (default, linear, llama3, yarn)"
        )
    # HF computes the angles in fp32 from an fp32 inv_freq; do the same for parity.
    angles = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    table = torch.cat([angles.cos(), angles.sin()], dim=-1) * attention_factor
    return table.to(device)


def rope_settings(
    config: dict[str, Any], default_theta: float = 10000.0
) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from config.json, in either layout.

    transformers < 5 writes ``rope_theta`` and ``rope_scaling``; transformers 5 writes one
    ``rope_parameters`` dict holding ``rope_theta`` and the scaling fields.
    """
    params = dict(config.get("rope_parameters") or {})
    theta = config.get("rope_theta") or params.pop("rope_theta", None) or default_theta
    scaling = config.get("rope_scaling")
    if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    return float(theta), scaling
