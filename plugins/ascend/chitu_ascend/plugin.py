"""Hook implementations of the Ascend backend (registered as entry point ``ascend``).

Which hook maps to which torch_npu operator: see README.md; each call site
cites the operator's documented signature. Not implemented here (the generic
ops serve them): ``allocate_kv_cache`` (a plain ``torch.zeros`` on the NPU),
``capture_graph`` (see the package docstring), ``mla_prefill`` / ``mla_decode``
(see ``chitu_ascend.attention``), ``sample``, and the collectives (generic
torch.distributed over HCCL).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from chitu_ascend import attention, linear, moe, small_ops
from chitu_ascend import weight as weight_module
from chitu_ascend.device import (
    chitu_device,
    chitu_empty_cache,
    chitu_memory_info,
    chitu_synchronize,
)
from chitu_core.backend_info import BackendInfo
from chitu_core.hookspecs import hookimpl


@hookimpl
def chitu_backend_info() -> BackendInfo:
    return BackendInfo(
        name="ascend",
        device_type="npu",
        dist_backend="hccl",
        priority=90,
        compute_dtype="bfloat16",
        has_native_fp8=False,
        supports_graphs=False,
        contract=">=1.0,<2",  # the hook contract versions it implements (hookspecs.py)
    )


@hookimpl
def chitu_check_available() -> str | None:
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed (pip install torch-npu matching your torch and CANN)"
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)
    except Exception as exc:  # a broken CANN install raises anything from OSError to RuntimeError
        return f"torch_npu failed to import: {exc}"
    if not torch.npu.is_available():
        return "torch_npu is installed but no NPU is visible (check npu-smi and ASCEND_RT_VISIBLE_DEVICES)"
    return None


# ---------------------------------------------------------------------------- weights and GeMM


@hookimpl
def chitu_prepare_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> Any:
    """FP8 -> int8 per-group (or bf16), dense kept; see ``chitu_ascend.weight.AscendWeight``."""
    return weight_module.prepare_weight(weight, scale, fmt)


@hookimpl
def chitu_linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """Dense: torch matmul; int8: ``npu_weight_quant_batchmatmul`` (per-group antiquant)."""
    return linear.linear(x, weight, bias)


# ---------------------------------------------------------------------------- MoE


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
    """``npu_moe_gating_top_k_softmax`` / ``npu_moe_gating_top_k``, else the generic op."""
    return moe.moe_route(
        router_logits,
        top_k,
        scoring,
        renormalize,
        num_groups,
        topk_groups,
        correction_bias,
        routed_scaling_factor,
    )


@hookimpl
def chitu_fused_moe(
    x: torch.Tensor, w13: Any, w2: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """init_routing -> grouped matmul -> swiglu -> grouped matmul -> finalize_routing."""
    return moe.fused_moe(x, w13, w2, topk_weights, topk_ids)


# ---------------------------------------------------------------------------- attention


@hookimpl
def chitu_store_kv(
    key: torch.Tensor,
    value: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor,
) -> None:
    """``npu_scatter_nd_update_`` into the flattened cache."""
    attention.store_kv(key, value, key_cache, value_cache, slot_mapping)


@hookimpl
def chitu_paged_attention_prefill(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``npu_fused_infer_attention_score``, paged, BSND, right-down causal (sparse_mode 3)."""
    return attention.paged_attention_prefill(
        q, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, scale
    )


@hookimpl
def chitu_paged_attention_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``npu_fused_infer_attention_score``, paged, one query per sequence."""
    return attention.paged_attention_decode(
        q, key_cache, value_cache, block_tables, context_lens, scale
    )


# ---------------------------------------------------------------------------- small ops


@hookimpl
def chitu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``npu_rms_norm``."""
    return small_ops.rms_norm(x, weight, eps)


@hookimpl
def chitu_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``npu_add_rms_norm``."""
    return small_ops.add_rms_norm(x, residual, weight, eps)


@hookimpl
def chitu_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``npu_rotary_mul`` (half / interleave mode)."""
    return small_ops.rope(q, k, positions, cos_sin_cache, is_neox_style)


@hookimpl
def chitu_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``npu_swiglu``."""
    return small_ops.silu_and_mul(x)


__all__ = [
    "chitu_add_rms_norm",
    "chitu_backend_info",
    "chitu_check_available",
    "chitu_device",
    "chitu_empty_cache",
    "chitu_fused_moe",
    "chitu_linear",
    "chitu_memory_info",
    "chitu_moe_route",
    "chitu_paged_attention_decode",
    "chitu_paged_attention_prefill",
    "chitu_prepare_weight",
    "chitu_rms_norm",
    "chitu_rope",
    "chitu_silu_and_mul",
    "chitu_store_kv",
    "chitu_synchronize",
]
