"""Generic pure-torch implementations of every optional hook of ``chitu_core.hookspecs``.

A backend gets these for every hook it does not implement (see
``chitu_core.backend.bind_ops``). They run on any torch device (cpu, cuda,
npu, xpu...), take exactly the spec's arguments and follow its docstring;
they favour clarity and numerical fidelity over speed (dequantize-then-matmul
GEMMs, gathered paged attention with fp32 softmax, an expert loop for MoE).
``GENERIC_OPS`` maps each op name (the hook name without ``chitu_``) to its
function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chitu_core.ops import attention, collectives, linear, memory, moe, small

GENERIC_OPS: dict[str, Callable[..., Any]] = {
    # memory and device
    "device": memory.device,
    "memory_info": memory.memory_info,
    "allocate_kv_cache": memory.allocate_kv_cache,
    "synchronize": memory.synchronize,
    "empty_cache": memory.empty_cache,
    "capture_graph": memory.capture_graph,
    # weights and quantized GeMM
    "prepare_weight": linear.prepare_weight,
    "linear": linear.linear,
    # MoE
    "moe_route": moe.moe_route,
    "fused_moe": moe.fused_moe,
    # attention
    "store_kv": attention.store_kv,
    "paged_attention_prefill": attention.paged_attention_prefill,
    "paged_attention_decode": attention.paged_attention_decode,
    "mla_prefill": attention.mla_prefill,
    "mla_decode": attention.mla_decode,
    # collectives
    "new_group": collectives.new_group,
    "all_reduce": collectives.all_reduce,
    "all_reduce_add_rms_norm": collectives.all_reduce_add_rms_norm,
    "all_gather": collectives.all_gather,
    "reduce_scatter": collectives.reduce_scatter,
    "send": collectives.send,
    "recv": collectives.recv,
    # small ops
    "rms_norm": small.rms_norm,
    "add_rms_norm": small.add_rms_norm,
    "rope": small.rope,
    "silu_and_mul": small.silu_and_mul,
    "sample": small.sample,
}

__all__ = ["GENERIC_OPS"]
