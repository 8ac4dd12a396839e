"""The fake operators: documented semantics of each torch_npu operator in plain torch.

Each function names its documentation page; ``_require`` turns a documented
constraint the plugin must respect into an error (a mapping bug), never a
silent fallback.
"""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"fake torch_npu: documented constraint violated: {message}")


# https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000860.html
def npu_rms_norm(self, gamma, epsilon=1e-06):
    """(y, rstd): y = x * rsqrt(mean(x^2, -1) + eps) * gamma in x's dtype; rstd fp32."""
    _require(self.dtype in FLOAT_DTYPES, f"self dtype {self.dtype}")
    _require(gamma.dtype == self.dtype, "gamma must have self's dtype")
    xf = self.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(self.dtype), rstd


# op-plugin test/test_custom_ops/test_npu_add_rms_norm.py (Ascend/op-plugin 26.0.0)
def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    """(y, rstd, x): x = x1 + x2 in x1's dtype, y = rms_norm(x) * gamma in x1's dtype."""
    _require(x1.dtype in FLOAT_DTYPES, f"x1 dtype {x1.dtype}")
    _require(x2.dtype == x1.dtype and gamma.dtype == x1.dtype, "x1, x2, gamma share one dtype")
    _require(x2.shape == x1.shape, "x1 and x2 share one shape")
    x = x1 + x2
    y, rstd = npu_rms_norm(x, gamma, epsilon)
    return y, rstd, x


# https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000141.html
def npu_rotary_mul(input, r1, r2, rotary_mode="half"):
    """r1 * x + r2 * rotate(x); rotate per rotary_mode ('half' or 'interleave'); 4-D input."""
    _require(input.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, "4-D input, r1, r2")
    _require(input.dtype == r1.dtype == r2.dtype, "input, r1, r2 share one dtype")
    _require(input.shape[-1] % 2 == 0 and input.shape[-1] < 896, "D even and < 896")
    _require(rotary_mode in ("half", "interleave"), f"rotary_mode {rotary_mode!r}")
    x = input.float()
    if rotary_mode == "half":
        x1, x2 = torch.chunk(x, 2, -1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        x1, x2 = x[..., ::2], x[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return (r1.float() * x + r2.float() * rotated).to(input.dtype)


# https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000834.html
def npu_swiglu(input, dim=-1):
    """swish(A) * B with A, B the halves of input along dim; input's dtype; no empty input."""
    _require(input.numel() > 0, "no empty tensor")
    _require(input.is_contiguous(), "contiguous input")
    _require(input.shape[dim] % 2 == 0, "dim divisible by 2")
    a, b = input.float().chunk(2, dim=dim)
    return (torch.nn.functional.silu(a) * b).to(input.dtype)


# https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000179.html
def npu_weight_quant_batchmatmul(
    x,
    weight,
    antiquant_scale,
    antiquant_offset=None,
    quant_scale=None,
    quant_offset=None,
    bias=None,
    antiquant_group_size=0,
    inner_precise=0,
):
    """y = x @ ((weight + offset) * antiquant_scale) (+ bias), x's dtype.

    weight (K, N) int8; per-channel scale (N,)/(1, N); per-group (ceil(K/G), N) with
    G = antiquant_group_size, a multiple of 32 in [32, K-1].
    """
    _require(x.dim() == 2 and weight.dim() == 2, "x (M, K) and weight (K, N)")
    _require(x.dtype in HALF_DTYPES, f"x fp16/bf16, got {x.dtype}")
    _require(weight.dtype == torch.int8, f"weight int8, got {weight.dtype}")
    _require(antiquant_scale.dtype == x.dtype, "antiquant_scale has x's dtype")
    _require(quant_scale is None and quant_offset is None, "no output quantization here")
    k, n = weight.shape
    _require(x.shape[1] == k, f"x K={x.shape[1]} vs weight K={k}")
    w = weight.float()
    if antiquant_offset is not None:
        w = w + antiquant_offset.float()
    if antiquant_group_size:
        g = antiquant_group_size
        _require(g % 32 == 0 and 32 <= g <= k - 1, f"group size {g} for K={k}")
        _require(tuple(antiquant_scale.shape) == (-(-k // g), n), "per-group scale shape")
        scale = antiquant_scale.float().repeat_interleave(g, dim=0)[:k]
    else:
        _require(antiquant_scale.numel() in (1, n), "per-tensor/per-channel scale shape")
        scale = antiquant_scale.float().reshape(1, -1)
    y = x.float() @ (w * scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000524.html
def npu_grouped_matmul(
    x,
    weight,
    *,
    bias=None,
    scale=None,
    offset=None,
    antiquant_scale=None,
    antiquant_offset=None,
    per_token_scale=None,
    group_list=None,
    activation_input=None,
    activation_quant_scale=None,
    activation_quant_offset=None,
    split_item=0,
    group_type=-1,
    group_list_type=0,
    act_type=0,
    output_dtype=None,
):
    """Non-quantised y_i = x_i @ weight_i. Only the form the plugin uses is modelled:
    one x (M, K) split along M (group_type=0) by group_list (type 0: cumulative ends,
    type 1: counts), one weight (E, K, N), one output (split_item 2/3)."""
    _require(len(x) == 1 and len(weight) == 1, "single x and single weight tensor")
    _require(group_type == 0 and split_item in (2, 3), "split along M, single output")
    _require(antiquant_scale is None and scale is None, "non-quantised scenario only")
    xs, w = x[0], weight[0]
    _require(w.dim() == 3 and xs.dim() == 2 and xs.shape[1] == w.shape[1], "x (M,K), w (E,K,N)")
    _require(xs.dtype == w.dtype and xs.dtype in FLOAT_DTYPES, "x and weight share a dtype")
    ends = group_list.long().cumsum(0) if group_list_type == 1 else group_list.long()
    _require(ends.numel() == w.shape[0], "one group per expert")
    out = xs.new_zeros(xs.shape[0], w.shape[2])
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = (xs[start:end].float() @ w[e].float()).to(xs.dtype)
        start = end
    return [out]


# https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000856.html
def npu_moe_gating_top_k_softmax(x, finished=None, k=1):
    """(y, expert_idx, row_idx): y, idx = topk(softmax(x, -1), k); row_idx[t, j] = j*T + t."""
    _require(x.dim() == 2 and x.dtype in FLOAT_DTYPES, "2-D fp16/bf16/fp32 x")
    _require(0 < k <= x.shape[-1] and k <= 1024, f"k={k}")
    _require(finished is None, "finished is not modelled")
    probs = x.float().softmax(dim=-1)
    # Equal probabilities: lower expert id first (stable sort; unspecified on hardware).
    idx = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
    y = probs.gather(1, idx).to(x.dtype)
    rows = x.shape[0]
    row_idx = torch.arange(rows * k, dtype=torch.int32, device=x.device).view(k, rows).t()
    return y, idx.to(torch.int32), row_idx.contiguous()


# https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_002365.html
# formula: aclnnMoeGatingTopK (hiascend CANNCommunityEdition/83RC1, ops-transformer docs)
def npu_moe_gating_top_k(
    x,
    k,
    *,
    bias=None,
    k_group=1,
    group_count=1,
    group_select_mode=0,
    renorm=0,
    norm_type=1,
    out_flag=False,
    routed_scaling_factor=1.0,
    eps=1e-20,
):
    """(y, expert_idx, out). Atlas A2/A3: E == 256, k_group == 4, group_count == 8, bias given,
    1 <= k <= 32. norm = sigmoid (norm_type 1) / softmax (0); selection = norm + bias; groups
    scored by max (mode 0) or the sum of their top 2 (mode 1); top-k of the k_group best
    groups; y = norm[idx] / (sum + eps) * routed_scaling_factor."""
    _require(x.dim() == 2 and x.dtype in FLOAT_DTYPES, "2-D x")
    _require(x.shape[-1] == 256 and k_group == 4 and group_count == 8, "E=256, 8 groups, k_group 4")
    _require(
        bias is not None and bias.dtype == x.dtype and bias.shape == (256,), "bias [E], x dtype"
    )
    _require(1 <= k <= 32 and k <= 256 // group_count * k_group, f"k={k}")
    _require(renorm == 0 and not out_flag, "renorm 0, no out")
    xf = x.float()
    norm = xf.sigmoid() if norm_type == 1 else xf.softmax(dim=-1)
    select = norm + bias.float()
    tokens = x.shape[0]
    grouped = select.view(tokens, group_count, -1)
    if group_select_mode == 1:
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_score = grouped.amax(dim=-1)
    best = torch.sort(group_score, dim=-1, descending=True, stable=True).indices[:, :k_group]
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
    masked = grouped.masked_fill(~keep[..., None], float("-inf")).view(tokens, -1)
    idx = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :k]
    y = norm.gather(1, idx)
    y = y / (y.sum(dim=-1, keepdim=True) + eps) * routed_scaling_factor
    return y.to(x.dtype), idx.to(torch.int32), norm.to(x.dtype)


# https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000857.html
# formula: aclnnMoeInitRouting (hiascend CANNCommunityEdition/82RC1)
def npu_moe_init_routing(x, row_idx, expert_idx, active_num):
    """expandedExpertIdx, sortedRowIdx = keyValueSort(expertIdx, rowIdx);
    expandedRowIdx[sortedRowIdx[i]] = i; expandedX[i] = x[sortedRowIdx[i] % numRows]."""
    _require(x.dim() == 2 and expert_idx.dim() == 2, "2-D x and expert_idx")
    _require(row_idx.dtype == expert_idx.dtype == torch.int32, "int32 row_idx and expert_idx")
    _require(row_idx.shape == expert_idx.shape, "row_idx shaped like expert_idx")
    num_rows, k = expert_idx.shape
    flat_experts = expert_idx.reshape(-1).long()
    order = torch.sort(flat_experts, stable=True).indices
    sorted_rows = row_idx.reshape(-1).long()[order]
    expanded_row_idx = torch.empty_like(sorted_rows)
    expanded_row_idx[sorted_rows] = torch.arange(sorted_rows.numel(), device=x.device)
    active = min(num_rows, active_num) * k
    expanded_x = x[sorted_rows[:active] % num_rows]
    return expanded_x, expanded_row_idx.to(torch.int32), flat_experts[order].to(torch.int32)


# https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000855.html
# formula: aclnnMoeFinalizeRouting (hiascend canncommercial/80RC1)
def npu_moe_finalize_routing(
    expanded_permuted_rows,
    skip1,
    skip2,
    bias,
    scales,
    expanded_src_to_dst_row,
    export_for_source_row,
    drop_pad_mode=0,
):
    """out[i] = skip1[i] + skip2[i] + sum_k scales[i, k] * (rows[src_to_dst[i + k*num_rows]]
    + bias[export_for_source_row[i, k]])."""
    rows = expanded_permuted_rows
    _require(skip2 is not None or skip1 is None, "skip2 None => skip1 None")
    _require(scales is None or scales.dtype == rows.dtype, "scales have the rows' dtype")
    _require(expanded_src_to_dst_row.dtype == torch.int32, "int32 expanded_src_to_dst_row")
    num_rows, k = scales.shape
    dst = expanded_src_to_dst_row.long().view(k, num_rows).t()  # [num_rows, K]
    picked = rows.float()[dst]  # [num_rows, K, H]
    if bias is not None:
        picked = picked + bias.float()[export_for_source_row.long()]
    out = (scales.float()[..., None] * picked).sum(dim=1)
    for skip in (skip1, skip2):
        if skip is not None:
            out = out + skip.float()
    return out.to(rows.dtype)


# https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_001254.html
def npu_scatter_nd_update_(input, indices, updates):
    """input[indices[i]] = updates[i] in place (indices [N, a] over input's first a dims)."""
    _require(indices.dim() >= 2 and indices.dtype in (torch.int32, torch.int64), "2-D int index")
    _require(updates.dtype == input.dtype, "updates have input's dtype")
    depth = indices.shape[-1]
    expected = tuple(indices.shape[:-1]) + tuple(input.shape[depth:])
    _require(
        tuple(updates.shape) == expected, f"updates shape {tuple(updates.shape)} != {expected}"
    )
    flat = indices.reshape(-1, depth).long()
    _require(bool((flat >= 0).all()) and bool((flat < torch.tensor(input.shape[:depth])).all()),
             "indices in range")  # fmt: skip
    input[tuple(flat.t())] = updates.reshape(-1, *input.shape[depth:])
    return input


# https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_001232.html
def npu_fused_infer_attention_score(
    query,
    key,
    value,
    *,
    pse_shift=None,
    atten_mask=None,
    actual_seq_lengths=None,
    actual_seq_lengths_kv=None,
    block_table=None,
    num_heads=1,
    scale=1.0,
    pre_tokens=2147483647,
    next_tokens=2147483647,
    input_layout="BSH",
    num_key_value_heads=0,
    sparse_mode=0,
    inner_precise=0,
    block_size=0,
    softmax_lse_flag=False,
    **unmodelled,
):
    """(attention_out, softmax_lse). Only what the plugin uses is modelled: BSND query, paged
    key/value (num_blocks, block_size, Hkv*D) with block_table, per-batch host lengths,
    sparse_mode 0 (no mask) or 3 (rightDownCausal with the 2048x2048 upper-triangular mask)."""
    _require(not unmodelled, f"unmodelled arguments {sorted(unmodelled)}")
    _require(input_layout == "BSND" and query.dim() == 4, "BSND query")
    _require(query.is_contiguous(), "contiguous query")
    _require(query.dtype in HALF_DTYPES and key.dtype == value.dtype == query.dtype, "dtypes")
    _require(block_table is not None and block_table.dtype == torch.int32, "int32 block_table")
    _require(key.dim() == 3 and key.shape[1] == block_size, "key (blocks, block_size, H)")
    _require(block_size % 16 == 0, f"block_size {block_size} a multiple of 16")
    _require(key.is_contiguous() and value.is_contiguous(), "contiguous key/value")
    batch, seq, heads, dim = query.shape
    kv_heads = num_key_value_heads or num_heads
    _require(heads == num_heads and heads % kv_heads == 0, "num_heads / num_key_value_heads")
    _require(key.shape[2] == kv_heads * dim and value.shape[2] == kv_heads * dim, "kv H = Hkv*D")
    _require(len(actual_seq_lengths_kv) == batch, "one kv length per batch")
    q_lens = actual_seq_lengths if actual_seq_lengths is not None else [seq] * batch
    if sparse_mode == 3:
        _require(atten_mask is not None and tuple(atten_mask.shape) == (2048, 2048), "2048 mask")
        _require(atten_mask.dtype == torch.bool, "bool mask")
    else:
        _require(sparse_mode == 0 and atten_mask is None, "sparse_mode 0 without a mask here")
    out = torch.zeros_like(query)
    group = heads // kv_heads
    for b in range(batch):
        q_len, kv_len = int(q_lens[b]), int(actual_seq_lengths_kv[b])
        if q_len == 0 or kv_len == 0:
            continue
        blocks = block_table[b, : -(-kv_len // block_size)].long()
        k = key[blocks].reshape(-1, kv_heads, dim)[:kv_len].float()  # [L, Hkv, D]
        v = value[blocks].reshape(-1, kv_heads, dim)[:kv_len].float()
        q = query[b, :q_len].float().view(q_len, kv_heads, group, dim)
        scores = torch.einsum("qhgd,khd->hgqk", q, k) * scale
        if sparse_mode == 3:
            q_pos = torch.arange(q_len, device=query.device) + (kv_len - q_len)
            visible = torch.arange(kv_len, device=query.device)[None, :] <= q_pos[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
        probs = scores.softmax(dim=-1)
        o = torch.einsum("hgqk,khd->qhgd", probs, v).reshape(q_len, heads, dim)
        out[b, :q_len] = o.to(query.dtype)
    return out, torch.empty(0, device=query.device)
