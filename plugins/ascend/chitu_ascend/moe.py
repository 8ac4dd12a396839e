"""MoE: routing through the torch_npu gating operators, experts through
init-routing / grouped matmul / SwiGLU / finalize-routing.
"""

from __future__ import annotations

from typing import Any

import torch

from chitu_ascend._npu import torch_npu
from chitu_ascend.linear import dense_or_int8
from chitu_ascend.weight import LAYOUT_DENSE, AscendWeight, check_handle
from chitu_core.ops.moe import moe_route as generic_moe_route

# npu_moe_gating_top_k's documented limits on Atlas A2/A3: 256 experts, group_count 8,
# k_group 4, a bias, 1 <= k <= 32 (DeepSeek-V3/R1 routing exactly).
GATING_TOP_K_SHAPE = {"num_experts": 256, "num_groups": 8, "topk_groups": 4, "max_top_k": 32}


def _deepseek_gating_fits(num_experts, top_k, num_groups, topk_groups, correction_bias) -> bool:
    s = GATING_TOP_K_SHAPE
    return (
        num_experts == s["num_experts"]
        and num_groups == s["num_groups"]
        and topk_groups == s["topk_groups"]
        and 1 <= top_k <= s["max_top_k"]
        and correction_bias is not None
    )


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

    softmax without groups -> ``npu_moe_gating_top_k_softmax``; DeepSeek-V3's
    sigmoid + bias + 8 groups / best 4 + renormalisation -> ``npu_moe_gating_top_k``.
    Anything else (sigmoid without renormalisation, other group shapes, grouped
    softmax) the documented operators cannot express: the generic op.
    """
    num_tokens, num_experts = router_logits.shape
    logits = router_logits.float()
    if num_tokens > 0 and scoring == "softmax" and num_groups == 1 and 1 <= top_k <= num_experts:
        # torch_npu.npu_moe_gating_top_k_softmax(Tensor x, Tensor? finished=None, int k=1)
        #     -> (Tensor y, Tensor expert_idx, Tensor row_idx)
        # https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000856.html
        # (formula: aclnnMoeGatingTopKSoftmax, CANNCommunityEdition/83RC1alpha001): y = top-k of
        # softmax(x, -1) in x's dtype, expert_idx int32, row_idx[t, j] = j * T + t.
        weights, ids, _ = torch_npu().npu_moe_gating_top_k_softmax(logits, None, k=top_k)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if routed_scaling_factor != 1.0:
            weights = weights * routed_scaling_factor
        return weights.float(), ids.to(torch.int32)
    if (
        num_tokens > 0
        and scoring == "sigmoid"
        and renormalize
        and _deepseek_gating_fits(num_experts, top_k, num_groups, topk_groups, correction_bias)
    ):
        # torch_npu.npu_moe_gating_top_k(Tensor x, int k, *, Tensor? bias=None, int k_group=1,
        #     int group_count=1, int group_select_mode=0, int renorm=0, int norm_type=1,
        #     bool out_flag=False, float routed_scaling_factor=1.0, float eps=1e-20)
        #     -> (Tensor y, Tensor expert_idx, Tensor out)
        # https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_002365.html
        # (formula: aclnnMoeGatingTopK, CANNCommunityEdition/83RC1 and the ops-transformer
        # aclnnMoeGatingTopK.md, which spells out the steps): norm_type=1 sigmoid,
        # bias added for selection, group_select_mode=1 scores a group by the sum of its top 2,
        # k_group best groups, top-k of the biased scores, y from the unbiased scores,
        # y / (sum(y) + eps) * routed_scaling_factor: the contract's renormalised weights.
        weights, ids, _ = torch_npu().npu_moe_gating_top_k(
            logits,
            k=top_k,
            bias=correction_bias.float(),
            k_group=topk_groups,
            group_count=num_groups,
            group_select_mode=1,
            renorm=0,
            norm_type=1,
            out_flag=False,
            routed_scaling_factor=routed_scaling_factor,
            eps=1e-20,
        )
        return weights.float(), ids.to(torch.int32)
    return generic_moe_route(
        router_logits,
        top_k,
        scoring,
        renormalize,
        num_groups,
        topk_groups,
        correction_bias,
        routed_scaling_factor,
    )


def _experts_matmul(rows: torch.Tensor, w: AscendWeight, group_ends: torch.Tensor) -> torch.Tensor:
    """Rows sorted by expert times each expert's weight: ``[R, K] -> [R, N]``.

    group_ends: ``[E]`` int64 cumulative row counts (expert ``e`` owns rows
    ``group_ends[e-1]:group_ends[e]``).
    """
    if w.layout == LAYOUT_DENSE:
        # torch_npu.npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None,
        #     antiquant_scale=None, antiquant_offset=None, per_token_scale=None, group_list=None,
        #     activation_input=None, activation_quant_scale=None, activation_quant_offset=None,
        #     split_item=0, group_type=-1, group_list_type=0, act_type=0, output_dtype=None)
        #     -> List[torch.Tensor]
        # https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000524.html
        # One x [R, K] split along M (group_type=0) by group_list (group_list_type=0: cumulative
        # ends), one weight [E, K, N], one output (split_item=2).
        return torch_npu().npu_grouped_matmul(
            [rows],
            [w.weight.to(rows.dtype)],
            group_list=group_ends,
            split_item=2,
            group_type=0,
            group_list_type=0,
        )[0]
    # int8 experts: npu_grouped_matmul's fake-quant ("伪量化") mode documents per-channel
    # antiquant scales only, not the per-group scales our FP8 conversion needs, so each
    # expert with rows runs npu_weight_quant_batchmatmul. Reading the row counts is one
    # host sync per call (as in the generic op).
    out = rows.new_empty(rows.shape[0], w.out_features)
    start = 0
    for expert, end in enumerate(group_ends.tolist()):
        if end > start:
            out[start:end] = dense_or_int8(rows[start:end], w, expert)
        start = end
    return out


def fused_moe(
    x: torch.Tensor,
    w13: Any,
    w2: Any,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_fused_moe``. x ``[T, H]`` -> ``[T, H]``."""
    w13 = check_handle(w13, "fused_moe")
    w2 = check_handle(w2, "fused_moe")
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    if num_tokens == 0:
        return x.new_empty(0, hidden)
    npu = torch_npu()
    ids = topk_ids.to(torch.int32)
    # row_idx[t, j] = j * T + t: the (token, choice) numbering init/finalize routing use.
    row_idx = torch.arange(top_k * num_tokens, dtype=torch.int32, device=x.device)
    row_idx = row_idx.view(top_k, num_tokens).t().contiguous()
    # torch_npu.npu_moe_init_routing(Tensor x, Tensor row_idx, Tensor expert_idx, int active_num)
    #     -> (Tensor expanded_x, Tensor expanded_row_idx, Tensor expanded_expert_idx)
    # https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000857.html
    # (formula: aclnnMoeInitRouting, CANNCommunityEdition/82RC1): expandedExpertIdx, sortedRowIdx
    # = keyValueSort(expertIdx, rowIdx); expandedRowIdx[sortedRowIdx[i]] = i;
    # expandedX[i] = x[sortedRowIdx[i] % numRows]. All T rows active (active_num=T).
    expanded_x, expanded_row_idx, _ = npu.npu_moe_init_routing(
        x, row_idx, ids, active_num=num_tokens
    )
    # Each expert's end row in the sorted order (cumulative counts), by plain torch on device.
    counts = torch.bincount(ids.reshape(-1).long(), minlength=w13.num_experts)
    group_ends = counts.cumsum(0)  # [E] int64
    gate_up = _experts_matmul(expanded_x, w13, group_ends)  # [T*K, 2I]
    # torch_npu.npu_swiglu(Tensor x, int dim=-1) -> Tensor: silu(first half) * second half,
    # in x's dtype (the contract's rounding of the intermediate to the compute dtype).
    # https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000834.html
    act = npu.npu_swiglu(gate_up, dim=-1)  # [T*K, I]
    down = _experts_matmul(act, w2, group_ends)  # [T*K, H]
    # torch_npu.npu_moe_finalize_routing(Tensor expanded_permuted_rows, Tensor? skip1,
    #     Tensor? skip2, Tensor? bias, Tensor? scales, Tensor expanded_src_to_dst_row,
    #     Tensor? export_for_source_row, int? drop_pad_mode=0) -> Tensor
    # https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000855.html
    # (formula: aclnnMoeFinalizeRouting, canncommercial/80RC1): out[t] = skip1[t] + skip2[t] + sum_j scales[t, j] * (rows[src_to_dst[j*T + t]]
    #          + bias[export_for_source_row[t, j]]); no skips, no bias here. scales take the
    # rows' dtype (documented: same dtype as expanded_permuted_rows); skip2 None => skip1 None.
    # Run in fp32 (a documented dtype): the rows widen exactly and the mixing weights stay
    # fp32, so the top-k sum is rounded once, to x's dtype, as the contract's reference does.
    out = npu.npu_moe_finalize_routing(
        down.float(), None, None, None, topk_weights.float(), expanded_row_idx, ids
    )
    return out.to(x.dtype)
