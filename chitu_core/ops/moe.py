"""Generic MoE: router top-k selection and a sort-by-expert expert loop."""

from __future__ import annotations

from typing import Any

import torch

from chitu_core.ops.linear import check_handle
from chitu_core.quant import QuantizedWeight

_SCORINGS = ("softmax", "sigmoid")


def _topk_lowest_id(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row, ties towards the lower index.

    ``torch.topk`` does not promise an order among equal values; a stable
    descending sort keeps equal values in index order, so it does.
    """
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def moe_route(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str,
    renormalize: bool,
    num_groups: int,
    topk_groups: int,
    correction_bias: torch.Tensor | None,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``chitu_core.hookspecs.chitu_moe_route``.

    All in fp32 on the device, no host sync. Groups are masked by filling the
    selection scores of ineligible experts with -inf before the expert top-k.
    """
    if scoring not in _SCORINGS:
        raise ValueError(f"scoring must be one of {_SCORINGS}, got {scoring!r}")
    num_tokens, num_experts = router_logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if num_groups < 1 or num_experts % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must be >= 1 and divide E={num_experts}")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups must be in [1, num_groups={num_groups}], got {topk_groups}")
    group_size = num_experts // num_groups
    if top_k > topk_groups * group_size:
        raise ValueError(
            f"top_k={top_k} exceeds the {topk_groups * group_size} experts of the "
            f"topk_groups={topk_groups} eligible groups"
        )

    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()  # [T, E]
    selection = scores if correction_bias is None else scores + correction_bias.float()

    if num_groups > 1:
        grouped = selection.view(num_tokens, num_groups, group_size)
        # A group's score is the sum of its two best experts (one if it has one).
        group_scores = grouped.topk(min(2, group_size), dim=-1).values.sum(dim=-1)  # [T, G]
        best_groups = _topk_lowest_id(group_scores, topk_groups)  # [T, topk_groups]
        eligible = torch.zeros_like(group_scores, dtype=torch.bool)
        eligible.scatter_(1, best_groups, True)
        eligible = eligible.repeat_interleave(group_size, dim=1)  # [T, E]
        selection = selection.masked_fill(~eligible, float("-inf"))

    topk_ids = _topk_lowest_id(selection, top_k)  # [T, top_k]
    # Weights come from the unbiased scores: the bias only steers selection.
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        denom = topk_weights.sum(dim=-1, keepdim=True)
        if scoring == "sigmoid":
            denom = denom + 1e-20
        topk_weights = topk_weights / denom
    if routed_scaling_factor != 1.0:
        topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids.to(torch.int32)


def _expert_weight(handle: QuantizedWeight, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense [N, K] weight of one expert of a stacked [E, N, K] handle."""
    scale = None if handle.scale is None else handle.scale[expert]
    return QuantizedWeight(handle.weight[expert], scale, handle.fmt).dequantize(dtype)


def fused_moe(
    x: torch.Tensor,
    w13: Any,
    w2: Any,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_fused_moe``.

    The T*top_k (token, expert) pairs are sorted by expert; each expert that
    received tokens runs one gate/up GEMM and one down GEMM over its rows,
    with only that expert dequantized. Reading the per-expert counts is one
    host sync (the price of skipping idle experts in a generic loop). Each
    pair's output lands in its own row, so the top-k sum is a deterministic
    fp32 reduction, not an order-dependent scatter-add.
    """
    w13 = check_handle(w13, "fused_moe")
    w2 = check_handle(w2, "fused_moe")
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_experts = w13.weight.shape[0]
    inter = w13.weight.shape[1] // 2

    flat_ids = topk_ids.reshape(-1).long()  # [T*top_k]
    order = torch.argsort(flat_ids, stable=True)  # pair indices grouped by expert
    token_of = order // top_k  # token of each sorted pair
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()

    pair_out = x.new_zeros(num_tokens * top_k, hidden)  # [T*top_k, H]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        xe = x[token_of[start : start + count]]  # [n, H]
        start += count
        gate_up = torch.nn.functional.linear(xe, _expert_weight(w13, expert, x.dtype))  # [n, 2I]
        gate, up = gate_up.float().split(inter, dim=-1)
        # Rounded to the compute dtype before the down projection, as unfused.
        act = (torch.nn.functional.silu(gate) * up).to(x.dtype)  # [n, I]
        pair_out[pairs] = torch.nn.functional.linear(act, _expert_weight(w2, expert, x.dtype))

    weighted = pair_out.view(num_tokens, top_k, hidden).float() * topk_weights.float()[..., None]
    return weighted.sum(dim=1).to(x.dtype)
