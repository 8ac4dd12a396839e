"""``chitu_linear``: dense weights through torch's matmul, int8 weights through
``torch_npu.npu_weight_quant_batchmatmul``.
"""

from __future__ import annotations

from typing import Any

import torch

from chitu_ascend._npu import torch_npu
from chitu_ascend.weight import GROUP_SIZE, LAYOUT_DENSE, AscendWeight, check_handle

# The operator takes fp16/bf16 activations only (documented dtypes of x).
WEIGHT_QUANT_DTYPES = (torch.float16, torch.bfloat16)


def int8_matmul(
    x: torch.Tensor, qweight: torch.Tensor, antiquant_scale: torch.Tensor
) -> torch.Tensor:
    """``x [M, K] @ dequant(qweight [N, K] int8)^T`` -> ``[M, N]`` in ``x.dtype``.

    antiquant_scale: ``[ceil(K/128), N]``. fp32 activations (a reference-dtype run)
    have no NPU weight-quant kernel: the weight is dequantized and multiplied by torch.
    """
    k = qweight.shape[-1]
    if x.dtype not in WEIGHT_QUANT_DTYPES:
        scale = antiquant_scale.float().repeat_interleave(GROUP_SIZE, dim=0)[:k]  # [K, N]
        return x @ (qweight.t().float() * scale).to(x.dtype)
    # torch_npu.npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor antiquant_scale,
    #     Tensor? antiquant_offset=None, Tensor? quant_scale=None, Tensor? quant_offset=None,
    #     Tensor? bias=None, int antiquant_group_size=0, int inner_precise=0) -> Tensor
    # https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000179.html
    # x (M, K) fp16/bf16; weight (K, N) int8, a transposed non-contiguous view is allowed
    # (and recommended); antiquant_scale same dtype as x, per-group shape
    # (ceil_div(K, antiquant_group_size), N); antiquant_group_size a multiple of 32 in
    # [32, K-1], so K <= 128 (one group) is the per-channel form, scale (N,).
    scale = antiquant_scale.to(x.dtype)
    if k <= GROUP_SIZE:
        return torch_npu().npu_weight_quant_batchmatmul(x, qweight.t(), scale[0])
    return torch_npu().npu_weight_quant_batchmatmul(
        x, qweight.t(), scale, antiquant_group_size=GROUP_SIZE
    )


def dense_or_int8(x: torch.Tensor, w: AscendWeight, expert: int | None = None) -> torch.Tensor:
    """``x @ W^T`` for one linear (``expert`` None) or one expert of a stacked handle."""
    if w.layout == LAYOUT_DENSE:
        weight = w.weight if expert is None else w.weight[expert].t()  # [N, K]
        return torch.nn.functional.linear(x, weight.to(x.dtype))
    if expert is None:
        return int8_matmul(x, w.weight, w.antiquant_scale)
    return int8_matmul(x, w.weight[expert], w.antiquant_scale[expert])


def linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_linear``. x ``[M, K]`` -> ``[M, N]`` in ``x.dtype``."""
    w = check_handle(weight, "linear")
    if w.weight.dim() != 2:
        raise ValueError(
            f"linear needs an [N, K] weight, got {w.num_experts} stacked experts (fused_moe)"
        )
    if x.shape[0] == 0:
        return x.new_empty(0, w.out_features)
    y = dense_or_int8(x, w)
    # bias added here, not through the operator's bias argument (its documented dtype
    # depends on x's dtype); one elementwise add.
    return y if bias is None else y + bias.to(y.dtype)
