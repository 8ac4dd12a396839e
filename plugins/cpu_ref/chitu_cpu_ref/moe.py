"""Mixture of experts: ``chitu_moe_route`` and ``chitu_fused_moe``."""

from __future__ import annotations

import torch

from chitu_core.hookspecs import hookimpl
from chitu_cpu_ref.linear import check_handle, dense_weight


def _top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row, ties to the lower index.

    A stable descending sort keeps equal scores in index order; torch.topk
    promises no order among ties.
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


@hookimpl
def chitu_moe_route(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str,
    renormalize: bool,
    num_groups: int,
    topk_groups: int,
    correction_bias: torch.Tensor | None,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k routing (see the spec). router_logits ``[T, E]``.

    Returns ``(weights [T, top_k] fp32, ids [T, top_k] int32)``, each row in
    descending order of selection score.
    """
    num_tokens, num_experts = router_logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"{num_experts} experts do not split into {num_groups} groups")
    group_size = num_experts // num_groups
    if num_groups == 1 and topk_groups != 1:
        raise ValueError(
            f"without grouping (num_groups 1) topk_groups must be 1, got {topk_groups}"
        )
    if not 1 <= topk_groups <= num_groups or top_k > topk_groups * group_size:
        raise ValueError(
            f"topk_groups {topk_groups} of {num_groups} groups of {group_size} experts "
            f"cannot supply top_k {top_k} experts"
        )

    logits = router_logits.double()
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")

    # The bias steers selection only; the weights come from the plain scores.
    selection = scores if correction_bias is None else scores + correction_bias.double()
    if num_groups > 1:
        grouped = selection.view(num_tokens, num_groups, group_size)
        top_two = torch.sort(grouped, dim=-1, descending=True).values[..., :2]
        group_scores = top_two.sum(dim=-1)  # [T, G]
        best_groups = _top_indices(group_scores, topk_groups)  # [T, topk_groups]
        is_eligible_group = torch.zeros_like(group_scores, dtype=torch.bool)
        is_eligible_group.scatter_(1, best_groups, True)
        is_eligible = is_eligible_group.repeat_interleave(group_size, dim=1)  # [T, E]
        selection = selection.masked_fill(~is_eligible, float("-inf"))

    ids = _top_indices(selection, top_k)
    weights = scores.gather(1, ids)
    if renormalize:
        guard = 1e-20 if scoring == "sigmoid" else 0.0
        weights = weights / (weights.sum(dim=-1, keepdim=True) + guard)
    weights = weights * routed_scaling_factor
    return weights.float(), ids.int()


@hookimpl
def chitu_fused_moe(
    x: torch.Tensor,
    w13,
    w2,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """SwiGLU experts mixed by the router (see the spec). x ``[T, H]``, returns ``[T, H]``.

    One expert at a time over the tokens routed to it, so only that expert's
    weights are widened to fp64.
    """
    check_handle(w13)
    check_handle(w2)
    x64 = x.double()
    out = torch.zeros_like(x64)
    intermediate = w13.out_features // 2  # rows [0, I) gate, [I, 2I) up
    for expert in torch.unique(topk_ids).tolist():
        tokens, slots = torch.nonzero(topk_ids == expert, as_tuple=True)
        w13_e = dense_weight(w13.weight[expert], _expert_scale(w13, expert), w13.fmt)
        w2_e = dense_weight(w2.weight[expert], _expert_scale(w2, expert), w2.fmt)
        gate_up = x64[tokens] @ w13_e.T  # [n, 2I]
        gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]
        # Rounded to the compute dtype before the down projection, as specified.
        hidden = (torch.nn.functional.silu(gate) * up).to(x.dtype).double()
        mixed = (hidden @ w2_e.T) * topk_weights[tokens, slots].double()[:, None]
        out.index_add_(0, tokens, mixed)
    return out.to(x.dtype)


def _expert_scale(handle, expert: int) -> torch.Tensor | None:
    return None if handle.scale is None else handle.scale[expert]
