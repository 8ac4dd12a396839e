"""Hook implementations of the Hygon DCU backend (registered as entry point ``hygon``).

Only the description and the availability probe exist so far; the wave64
Triton configurations are tracked in their own issue. Until then every op
falls back to the generic torch implementation, which runs on HIP devices.
"""

from __future__ import annotations

import torch

from chitu_core.backend_info import BackendInfo
from chitu_core.hookspecs import hookimpl


@hookimpl
def chitu_backend_info() -> BackendInfo:
    return BackendInfo(
        name="hygon",
        device_type="cuda",  # ROCm builds of torch expose HIP devices as "cuda"
        dist_backend="nccl",  # RCCL under ROCm answers to "nccl"
        priority=80,
        compute_dtype="bfloat16",
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
