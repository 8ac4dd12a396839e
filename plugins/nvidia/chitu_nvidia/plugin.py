"""Hook implementations of the NVIDIA backend (registered as entry point ``nvidia``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from chitu_core.backend_info import BackendInfo, BackendOptions, OpPath
from chitu_core.hookspecs import hookimpl
from chitu_core.kernels.packed_weight import pack_weight
from chitu_core.ops import collectives as _generic_collectives
from chitu_nvidia import attention as _attention
from chitu_nvidia import fp8_dispatch as _dispatch
from chitu_nvidia import linear as _linear
from chitu_nvidia import moe as _moe
from chitu_nvidia import p2p_all_reduce as _p2p
from chitu_nvidia import small_ops as _small
from chitu_nvidia.graphs import capture_cuda_graph


def _has_cuda_device() -> bool:
    # torch.version.hip is set on ROCm builds, whose "cuda" devices are AMD/Hygon GPUs.
    return torch.cuda.is_available() and torch.version.hip is None


@hookimpl
def chitu_backend_info() -> BackendInfo:
    native_fp8 = _has_cuda_device() and torch.cuda.get_device_capability(0) >= (8, 9)
    return BackendInfo(
        name="nvidia",
        device_type="cuda",
        dist_backend="nccl",
        priority=100,
        compute_dtype="bfloat16",
        has_native_fp8=native_fp8,
        supports_graphs=True,
        contract=">=1.0,<2",  # the hook contract versions it implements (hookspecs.py)
    )


@hookimpl
def chitu_check_available() -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA (install a CUDA build of torch)"
    if torch.version.hip is not None:
        return "this torch is a ROCm/HIP build; use the 'hygon' backend for DCUs"
    if not torch.cuda.is_available():
        return "no CUDA device visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < (8, 0):
        return f"GPU compute capability {major}.{minor} is below 8.0 (Ampere is the minimum)"
    return None


# One configuration per process (exactly one backend is bound to serve): the
# ``--fp8-compute`` mode that ``chitu_prepare_weight`` folds into each handle.
_options = BackendOptions()
_log_path = _dispatch.PathLog()


@hookimpl
def chitu_configure(options: BackendOptions) -> dict[str, OpPath]:
    """Keep ``--fp8-compute`` for ``chitu_prepare_weight``; say which path linear and MoE take."""
    global _options
    capability = torch.cuda.get_device_capability() if _has_cuda_device() else (0, 0)
    _dispatch.check_mode(options, capability)
    _options = options
    return _dispatch.describe(options.fp8_compute, capability)


# ---------------------------------------------------------------------------- memory and device


@hookimpl
def chitu_device(local_rank: int) -> torch.device:
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@hookimpl
def chitu_memory_info(device: torch.device) -> tuple[int, int]:
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


@hookimpl
def chitu_synchronize(device: torch.device) -> None:
    torch.cuda.synchronize(device)


@hookimpl
def chitu_empty_cache(device: torch.device) -> None:
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- collectives


@hookimpl
def chitu_new_group(ranks: list[int], timeout_s: float) -> Any:
    """A torch process group; groups of 2..8 GPUs also get the peer-store all-reduce."""
    group = _generic_collectives.new_group(ranks, timeout_s)
    _p2p.enable_for(group, ranks, timeout_s)
    return group


@hookimpl
def chitu_all_reduce(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Decode-sized tensors: one peer-store kernel (``p2p_all_reduce``); larger: NCCL."""
    return _p2p.all_reduce(tensor, group)


@hookimpl
def chitu_all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode-sized rows: the exchange, the residual add and the norm in one kernel."""
    return _p2p.all_reduce_add_rms_norm(x, residual, weight, eps, group)


# The group handle is torch's ProcessGroup, as in the generic ops: the other collectives
# are those (the contract has a backend that implements new_group implement them all).
@hookimpl
def chitu_all_gather(tensor: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    return _generic_collectives.all_gather(tensor, group, dim)


@hookimpl
def chitu_reduce_scatter(tensor: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    return _generic_collectives.reduce_scatter(tensor, group, dim)


@hookimpl
def chitu_send(tensor: torch.Tensor, dst: int, group: Any) -> None:
    _generic_collectives.send(tensor, dst, group)


@hookimpl
def chitu_recv(tensor: torch.Tensor, src: int, group: Any) -> torch.Tensor:
    return _generic_collectives.recv(tensor, src, group)


@hookimpl
def chitu_capture_graph(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """A CUDA graph of ``fn``; every graph of a device shares one memory pool."""
    return capture_cuda_graph(fn, device)


# ---------------------------------------------------------------------------- weights and GeMM


@hookimpl
def chitu_prepare_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> Any:
    """FP8 codes become a contiguous uint8 tensor (the soft kernels' input), [N, K] ones
    K-permuted for the wide kernel (the native kernels permute x alike); the handle records
    from which token count the native path serves it (``--fp8-compute``, ``fp8_dispatch``).
    See ``PackedWeight``."""
    native_from_m = _dispatch.NEVER
    if weight.device.type == "cuda" and fmt != "unquantized":
        native_from_m = _dispatch.native_from_m(
            _options.fp8_compute,
            torch.cuda.get_device_capability(weight.device),
            fmt,
            weight.shape[-2],
            weight.shape[-1],
            is_experts=weight.dim() == 3,
        )
        _log_path(fmt, tuple(weight.shape), native_from_m)
    return pack_weight(weight, scale, fmt, k_perm=True, native_from_m=native_from_m)


@hookimpl
def chitu_linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 -> cuBLAS; FP8 -> soft-FP8 Triton (sm_80+) or native FP8 (sm_89+, larger M)."""
    return _linear.linear(x, weight, bias)


# ---------------------------------------------------------------------------- attention


@hookimpl
def chitu_store_kv(
    key: torch.Tensor,
    value: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor,
) -> None:
    """K and V (or the MLA latent) into the paged cache in one Triton launch."""
    _small.store_kv(key, value, key_cache, value_cache, slot_mapping)


@hookimpl
def chitu_paged_attention_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Split-K flash-decoding in Triton over the paged cache (``chitu_core/kernels``)."""
    return _attention.paged_attention_decode(
        q, key_cache, value_cache, block_tables, context_lens, scale
    )


@hookimpl
def chitu_mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA decode in Triton straight over the paged latent cache."""
    return _attention.mla_decode(q_latent, q_rope, latent_cache, block_tables, context_lens, scale)


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
    """Causal varlen flash attention in Triton over the paged cache (prefixes included)."""
    return _attention.paged_attention_prefill(
        q, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, scale
    )


@hookimpl
def chitu_mla_prefill(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal varlen absorbed MLA in Triton over the paged latent cache."""
    return _attention.mla_prefill(
        q_latent, q_rope, latent_cache, block_tables, cu_seqlens_q, context_lens, scale
    )


# ---------------------------------------------------------------------------- MoE


@hookimpl
def chitu_fused_moe(
    x: torch.Tensor, w13: Any, w2: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Fused MoE in Triton (device-side expert alignment, FP8 experts widened in-kernel)."""
    return _moe.fused_moe(x, w13, w2, topk_weights, topk_ids)


# ---------------------------------------------------------------------------- small ops


@hookimpl
def chitu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """One Triton launch a call (fp32 inside); generic for inputs the kernel does not take."""
    return _small.rms_norm(x, weight, eps)


@hookimpl
def chitu_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and RMSNorm in one Triton launch; generic where the kernel does not take it."""
    return _small.add_rms_norm(x, residual, weight, eps)


@hookimpl
def chitu_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated in one Triton launch (program per token and head tile)."""
    return _small.rope(q, k, positions, cos_sin_cache, is_neox_style)


@hookimpl
def chitu_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU in one Triton launch (fp32 inside)."""
    return _small.silu_and_mul(x)
