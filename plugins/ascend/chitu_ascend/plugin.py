"""Hook implementations of the Ascend backend (registered as entry point ``ascend``).

Only the description and the availability probe exist so far; the torch_npu
operator mapping is tracked in its own issue. Until then every op falls back
to the generic torch implementation, which runs on ``npu`` tensors.
"""

from __future__ import annotations

import importlib.util

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
    )


@hookimpl
def chitu_check_available() -> str | None:
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed (pip install torch-npu matching your torch and CANN)"
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)
    except Exception as exc:  # a broken CANN install raises anything from OSError to RuntimeError
        return f"torch_npu failed to import: {exc}"
    import torch

    if not torch.npu.is_available():
        return "torch_npu is installed but no NPU is visible (check npu-smi and ASCEND_RT_VISIBLE_DEVICES)"
    return None
