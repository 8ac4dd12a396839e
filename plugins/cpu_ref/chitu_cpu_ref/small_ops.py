"""Small ops: ``chitu_rms_norm``, ``chitu_add_rms_norm``, ``chitu_rope``, ``chitu_silu_and_mul``, ``chitu_sample``."""

from __future__ import annotations

import torch

from chitu_core.hookspecs import hookimpl


@hookimpl
def chitu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight``; x ``[M, D]``, weight ``[D]`` -> ``[M, D]`` x.dtype.

    The normalised value is rounded to ``x.dtype`` before the weight multiply
    (HF Llama's order); the product of two such values is exact in fp64, so
    one final rounding equals the unfused multiply.
    """
    x64 = x.double()
    normed = x64 * torch.rsqrt(x64.square().mean(dim=-1, keepdim=True) + eps)
    return (normed.to(x.dtype).double() * weight.double()).to(x.dtype)


@hookimpl
def chitu_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``summed = residual + x`` rounded to ``x.dtype`` (one rounding of the exact sum),
    then ``chitu_rms_norm(summed)``; returns ``(normed, summed)``, both ``[M, D]``."""
    summed = (residual.double() + x.double()).to(x.dtype)
    return chitu_rms_norm(summed, weight, eps), summed


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox_style: bool):
    """Rotate the leading ``R = 2 * cos.shape[-1]`` channels of x ``[T, H, D]``; fp64 out."""
    half = cos.shape[-1]
    x = x.double().clone()
    if is_neox_style:
        a_idx, b_idx = slice(0, half), slice(half, 2 * half)  # pair (i, i + R/2)
    else:
        a_idx, b_idx = slice(0, 2 * half, 2), slice(1, 2 * half, 2)  # pair (2i, 2i + 1)
    a, b = x[..., a_idx].clone(), x[..., b_idx].clone()
    x[..., a_idx] = a * cos - b * sin
    x[..., b_idx] = b * cos + a * sin
    return x


@hookimpl
def chitu_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (see the spec). q ``[T, Hq, Dq]``, k ``[T, Hk, Dk]``, positions ``[T]``."""
    half = cos_sin_cache.shape[-1] // 2
    rows = cos_sin_cache[positions.long()].double()  # [T, R]
    cos, sin = rows[:, None, :half], rows[:, None, half:]  # [T, 1, R/2], broadcast over heads
    q_out = _rotate(q, cos, sin, is_neox_style).to(q.dtype)
    k_out = _rotate(k, cos, sin, is_neox_style).to(k.dtype)
    return q_out, k_out


@hookimpl
def chitu_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]``: x ``[M, 2I]`` -> ``[M, I]`` in x.dtype."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    gate, up = x.double().chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).to(x.dtype)


def _sample_row(logits, temperature: float, top_p: float, top_k: int, generator) -> int:
    """One token id from one row of logits ``[V]`` (see chitu_sample)."""
    if temperature == 0.0:
        return int(torch.argmax(logits))  # documented: the first maximal index
    if temperature < 0.0 or top_p <= 0.0:
        raise ValueError(f"need temperature >= 0 and top_p > 0, got {temperature} and {top_p}")
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    # Most likely first; equal probabilities keep the lower id first.
    order = torch.sort(probs, descending=True, stable=True).indices
    kept = probs[order]
    if 0 < top_k < kept.numel():
        kept = kept[:top_k]
    if top_p < 1.0:
        # Top-p sees the top-k survivors renormalised (HF / vLLM order). Keep a
        # token while the mass before it is still short of top_p: the smallest
        # prefix that reaches top_p, and never empty.
        kept = kept / kept.sum()
        mass_before = torch.cat([kept.new_zeros(1), torch.cumsum(kept, dim=0)[:-1]])
        kept = kept[mass_before < top_p]
    choice = torch.multinomial(kept, 1, generator=generator)
    return int(order[choice])


@hookimpl
def chitu_sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    top_ks: torch.Tensor,
    generators: list,
) -> torch.Tensor:
    """Next token per sequence: logits ``[B, V]`` fp32 -> ``[B]`` int64 (see the spec).

    Rows are sampled one at a time, each drawing from its own generator (or
    the default RNG when None), so a seeded row never depends on the batch.
    """
    tokens = [
        _sample_row(row, float(t), float(p), int(k), g)
        for row, t, p, k, g in zip(logits, temperatures, top_ps, top_ks, generators, strict=True)
    ]
    return torch.tensor(tokens, dtype=torch.int64, device=logits.device)
