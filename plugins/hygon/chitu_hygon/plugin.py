"""Hook implementations of the Hygon DCU backend (registered as entry point ``hygon``).

A DCU runs a ROCm/HIP build of torch, where ``torch.cuda`` drives HIP devices
and the "nccl" dist backend is RCCL. Native here: device and memory hooks,
``prepare_weight`` / ``linear`` (portable Triton soft FP8 with wave64 configs,
``chitu_hygon.linear``) and ``fused_moe`` (the generic op over this backend's
handles until the portable kernel is wired here: see "portable kernels not wired
yet" below). Everything else is the generic torch op, which runs on HIP devices.
"""

from __future__ import annotations

from typing import Any

import torch

from chitu_core.backend_info import BackendInfo
from chitu_core.hookspecs import hookimpl
from chitu_core.kernels.packed_weight import PackedWeight, pack_weight
from chitu_hygon import linear as _linear


@hookimpl
def chitu_backend_info() -> BackendInfo:
    return BackendInfo(
        name="hygon",
        device_type="cuda",  # ROCm builds of torch expose HIP devices as "cuda"
        dist_backend="nccl",  # RCCL under ROCm answers to "nccl"
        priority=80,
        compute_dtype="bfloat16",
        contract=">=1.0,<2",  # the hook contract versions it implements (hookspecs.py)
    )


@hookimpl
def chitu_check_available() -> str | None:
    if torch.version.hip is None:
        return f"torch {torch.__version__} is not a ROCm/HIP build (Hygon DCUs need the DTK/ROCm torch)"
    if not torch.cuda.is_available():
        return "no HIP device visible (check hy-smi/rocm-smi and HIP_VISIBLE_DEVICES)"
    name = torch.cuda.get_device_name(0)
    arch = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "")
    if "DCU" not in name.upper() and not arch.startswith("gfx9"):
        return f"HIP device {name!r} ({arch or 'unknown arch'}) is not a Hygon DCU"
    return None


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


# ---------------------------------------------------------------------------- weights and GeMM


@hookimpl
def chitu_prepare_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> Any:
    """FP8 codes become a contiguous uint8 tensor (the soft kernels' input); see ``PackedWeight``."""
    return pack_weight(weight, scale, fmt)


@hookimpl
def chitu_linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 -> torch.matmul (hipBLAS); FP8 -> portable soft-FP8 Triton, wave64 configs."""
    return _linear.linear(x, weight, bias)


# ---------------------------------------------------------------------------- portable kernels not wired yet
#
# THE PLUG-IN POINT for the portable Triton kernels in chitu_core/kernels that the
# NVIDIA plugin already uses: fused_moe.py (fused MoE), paged_decode.py and
# paged_prefill.py (paged attention), mla_decode.py (MLA absorbed decode). Their configs
# are sized for NVIDIA (warps of 32, up to 227 KB of shared memory) and none is
# compiled or tested for gfx9 yet, so this plugin does not import them. To wire one:
#   1. give it wave64 configs in chitu_hygon/configs.py (num_warps = wavefronts of 64,
#      at most 64 KB of LDS, num_stages <= 2), next to the soft-FP8 table;
#   2. call it from the hook below (fused_moe), or add the hook here
#      (chitu_paged_attention_decode, chitu_paged_attention_prefill, chitu_mla_decode);
#      until then bind_ops gives those ops the generic implementation;
#   3. add its variants to tests/test_hygon_hip_compile.py (gfx90a/gfx942) and a case to
#      tests/hygon_interp_cases.py (numerics under TRITON_INTERPRET=1).


@hookimpl
def chitu_fused_moe(
    x: torch.Tensor, w13: Any, w2: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The generic fused MoE over this backend's weight handles, until the Triton kernel is wired.

    Needed because ``prepare_weight`` returns ``PackedWeight`` handles, which the
    generic op cannot read: unwrap them to ``QuantizedWeight`` views (no copy).
    """
    from chitu_core.ops.moe import fused_moe

    return fused_moe(x, _unwrap(w13), _unwrap(w2), topk_weights, topk_ids)


def _unwrap(weight: Any) -> Any:
    return weight.as_quantized() if isinstance(weight, PackedWeight) else weight
