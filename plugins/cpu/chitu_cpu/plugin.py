"""The module registered under entry point ``cpu`` in group ``chitu.backends``."""

from __future__ import annotations

from chitu_core.backend_info import BackendInfo
from chitu_core.hookspecs import hookimpl
from chitu_cpu.attention import chitu_mla_decode, chitu_paged_attention_decode
from chitu_cpu.small_ops import chitu_rope


@hookimpl
def chitu_backend_info() -> BackendInfo:
    """Above ``cpu_ref`` (0) and below every accelerator backend (80-100) for ``auto``."""
    return BackendInfo(
        name="cpu",
        device_type="cpu",
        dist_backend="gloo",
        priority=10,
        compute_dtype="bfloat16",
        has_native_fp8=False,
        supports_graphs=False,
        needs_certificate=True,
        contract=">=1.0,<2",  # the hook contract versions it implements (hookspecs.py)
    )


@hookimpl
def chitu_check_available() -> str | None:
    """Always usable: torch always has a CPU."""
    return None


__all__ = [
    "chitu_backend_info",
    "chitu_check_available",
    "chitu_mla_decode",
    "chitu_paged_attention_decode",
    "chitu_rope",
]
