"""The module registered under entry point ``cpu_ref`` in group ``chitu.backends``.

It gathers the hook implementations of the package; the collectives and
graph capture are left to the generic versions (see the package docstring).
"""

from __future__ import annotations

from chitu_core.backend_info import BackendInfo
from chitu_core.hookspecs import hookimpl
from chitu_cpu_ref.attention import (
    chitu_mla_decode,
    chitu_mla_prefill,
    chitu_paged_attention_decode,
    chitu_paged_attention_prefill,
    chitu_store_kv,
)
from chitu_cpu_ref.device import (
    chitu_allocate_kv_cache,
    chitu_device,
    chitu_empty_cache,
    chitu_memory_info,
    chitu_synchronize,
)
from chitu_cpu_ref.linear import chitu_linear, chitu_prepare_weight
from chitu_cpu_ref.moe import chitu_fused_moe, chitu_moe_route
from chitu_cpu_ref.small_ops import (
    chitu_add_rms_norm,
    chitu_rms_norm,
    chitu_rope,
    chitu_sample,
    chitu_silu_and_mul,
)


@hookimpl
def chitu_backend_info() -> BackendInfo:
    """The oracle: fp32 on the CPU, no certificate needed."""
    return BackendInfo(
        name="cpu_ref",
        device_type="cpu",
        dist_backend="gloo",
        priority=0,
        compute_dtype="float32",
        has_native_fp8=False,
        supports_graphs=False,
        needs_certificate=False,
        contract=">=1.0,<2",  # the hook contract versions it implements (hookspecs.py)
    )


@hookimpl
def chitu_check_available() -> str | None:
    """Always usable: torch always has a CPU."""
    return None


__all__ = [
    "chitu_add_rms_norm",
    "chitu_allocate_kv_cache",
    "chitu_backend_info",
    "chitu_check_available",
    "chitu_device",
    "chitu_empty_cache",
    "chitu_fused_moe",
    "chitu_linear",
    "chitu_memory_info",
    "chitu_mla_decode",
    "chitu_mla_prefill",
    "chitu_moe_route",
    "chitu_paged_attention_decode",
    "chitu_paged_attention_prefill",
    "chitu_prepare_weight",
    "chitu_rms_norm",
    "chitu_rope",
    "chitu_sample",
    "chitu_silu_and_mul",
    "chitu_store_kv",
    "chitu_synchronize",
]
