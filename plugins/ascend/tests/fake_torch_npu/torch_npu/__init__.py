"""FAKE torch_npu for the Ascend plugin's tests: NOT Huawei's torch_npu, no NPU involved.

It implements, in plain torch on the CPU, each torch_npu operator the plugin
calls, following that operator's DOCUMENTED semantics (page cited at each
function) and checking the documented argument constraints the plugin relies
on, so that a wrong mapping (argument, layout, dtype, index convention) fails
here. It proves the plugin's mapping against the documentation, not against
the hardware: kernel precision, performance and undocumented behaviour are not
modelled.

Device plumbing: ``torch.npu`` (is_available, device_count, set_device,
current_device, mem_get_info, synchronize, empty_cache, get_device_name) over
host memory, and the "hccl" torch.distributed backend as an alias of gloo.

THE HACK (test-only, on purpose obvious): a CPU-only torch cannot hold tensors
on an "npu" device, so importing this fake points the plugin's one device
function, ``chitu_ascend.device.npu_device``, at the host. Nothing in the
plugin's own code knows about this module.
"""

from __future__ import annotations

import os
import sys
import types
from datetime import timedelta

import torch
import torch.distributed as dist

from torch_npu._ops import (  # noqa: F401  (the operators, one function each)
    npu_add_rms_norm,
    npu_fused_infer_attention_score,
    npu_grouped_matmul,
    npu_moe_finalize_routing,
    npu_moe_gating_top_k,
    npu_moe_gating_top_k_softmax,
    npu_moe_init_routing,
    npu_rms_norm,
    npu_rotary_mul,
    npu_scatter_nd_update_,
    npu_swiglu,
    npu_weight_quant_batchmatmul,
)

__version__ = "0.0.0+fake"
IS_FAKE = True


# ---------------------------------------------------------------------------- torch.npu


def _host_memory() -> tuple[int, int]:
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


npu = types.ModuleType("torch_npu.npu", "Fake torch.npu: the host stands in for NPUs.")
npu.is_available = lambda: True
npu.device_count = lambda: 2  # a world of two for the conformance collectives (gloo workers)
npu._current = 0


def _set_device(device) -> None:
    npu._current = device.index if isinstance(device, torch.device) else int(device)


npu.set_device = _set_device
npu.current_device = lambda: npu._current
npu.mem_get_info = lambda device=None: _host_memory()
npu.synchronize = lambda device=None: None
npu.empty_cache = lambda: None
npu.get_device_name = lambda device=None: "fake NPU (host CPU)"

sys.modules["torch_npu.npu"] = npu
torch.npu = npu  # what torch._register_device_module("npu", torch_npu.npu) does for real
sys.modules["torch.npu"] = npu


# ---------------------------------------------------------------------------- hccl -> gloo


def _hccl_as_gloo(store, rank: int, size: int, timeout: timedelta):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


if "hccl" not in dist.Backend.backend_list:
    dist.Backend.register_backend("hccl", _hccl_as_gloo, devices=["cpu"])


# ---------------------------------------------------------------------------- THE HACK


def _host_device(index: int) -> torch.device:
    return torch.device("cpu")


import chitu_ascend.device as _plugin_device  # noqa: E402

_plugin_device.npu_device = _host_device
