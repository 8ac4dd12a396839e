"""Generic small ops: RMSNorm (with a residual add), rotary embedding, SwiGLU, sampling."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_rms_norm``.

    Normalised in fp32, rounded to ``x.dtype``, then scaled by the weight in
    the promoted dtype (HF Llama's order) and returned in ``x.dtype``.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed.to(x.dtype) * weight).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``chitu_core.hookspecs.chitu_add_rms_norm``: ``(rms_norm(residual + x), residual + x)``."""
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


def rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox_style: bool
) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, 1, R/2] fp32. Rotates channels [0, R), keeps the rest."""
    rot_dim = 2 * cos.shape[-1]
    xr = x[..., :rot_dim].float()
    if is_neox_style:
        a, b = xr.chunk(2, dim=-1)  # channel i pairs with i + R/2
    else:
        a, b = xr[..., 0::2], xr[..., 1::2]  # channel 2i pairs with 2i + 1
    ra, rb = a * cos - b * sin, b * cos + a * sin
    rotated = (
        torch.cat([ra, rb], dim=-1) if is_neox_style else torch.stack([ra, rb], -1).flatten(-2)
    )
    return torch.cat([rotated.to(x.dtype), x[..., rot_dim:]], dim=-1)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``chitu_core.hookspecs.chitu_rope``. One gather of the cache rows, math in fp32."""
    cos, sin = cos_sin_cache[positions.long()].float().unsqueeze(1).chunk(2, dim=-1)  # [T, 1, R/2]
    return rotate(q, cos, sin, is_neox_style), rotate(k, cos, sin, is_neox_style)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_silu_and_mul``."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    top_ks: torch.Tensor,
    generators: list,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_sample``.

    Top-k then top-p are applied as masks over each row sorted by descending
    probability (stable, so ties keep id order). The draw is an exponential
    race: ``argmax(p / E)`` with ``E ~ Exp(1)`` per token picks token ``i``
    with probability ``p_i``. Its noise is one ``[V]`` vector per row: a
    seeded row draws it from its own generator (so its token depends only on
    its own row), all unseeded rows from the default RNG in one call. Rows
    with temperature 0 take ``argmax`` (first maximum, i.e. lowest id).
    """
    batch, vocab = logits.shape
    if len(generators) != batch:
        raise ValueError(f"sample: {len(generators)} generators for {batch} rows")
    logits = logits.float()
    is_greedy = temperatures <= 0
    greedy_ids = logits.argmax(dim=-1)

    temps = torch.where(is_greedy, torch.ones_like(temperatures), temperatures).float()
    scaled = logits / temps[:, None]
    sorted_logits, sorted_ids = torch.sort(scaled, dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=logits.device)
    top_ks = top_ks.long()
    k = torch.where(top_ks <= 0, vocab, top_ks)[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    # Top-p on the top-k-renormalised distribution: keep a token while the
    # mass before it is below top_p (the first token always); top_p >= 1
    # keeps all, even where the fp32 cumsum reaches 1 early.
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = (mass_before < top_ps[:, None]) | (top_ps[:, None] >= 1)
    sorted_probs = sorted_probs.masked_fill(~keep, 0.0)
    probs = torch.zeros_like(sorted_probs).scatter_(1, sorted_ids, sorted_probs)  # vocab order

    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == batch:
        noise.exponential_()
    elif unseeded:
        rows = torch.tensor(unseeded, device=logits.device)
        noise[rows] = torch.empty(len(unseeded), vocab, device=logits.device).exponential_()
    for i, gen in enumerate(generators):
        if gen is not None:
            noise[i].exponential_(generator=gen)
    # An exact 0 draw would turn a masked token's 0 / 0 into NaN, which argmax picks.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    sampled_ids = (probs / noise).argmax(dim=-1)
    return torch.where(is_greedy, greedy_ids, sampled_ids)
