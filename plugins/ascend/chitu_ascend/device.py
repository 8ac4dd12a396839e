"""Device and memory hooks through ``torch.npu`` (registered by torch_npu).

``npu_device`` is the one place the plugin names its device; every hook gets
the device from ``chitu_device``, which calls it.
"""

from __future__ import annotations

import torch

from chitu_ascend._npu import torch_npu
from chitu_core.hookspecs import hookimpl


def npu_device(index: int) -> torch.device:
    """NPU ``index``: torch_npu registers the "npu" device type with torch."""
    return torch.device("npu", index)


@hookimpl
def chitu_device(local_rank: int) -> torch.device:
    """Make NPU ``local_rank`` current (``torch.npu.set_device``) and return it."""
    torch_npu()  # registers torch.npu
    torch.npu.set_device(local_rank)
    return npu_device(local_rank)


@hookimpl
def chitu_memory_info(device: torch.device) -> tuple[int, int]:
    """``torch.npu.mem_get_info(device)``: (free, total) bytes of the NPU's HBM."""
    free, total = torch.npu.mem_get_info(device)
    return int(free), int(total)


@hookimpl
def chitu_synchronize(device: torch.device) -> None:
    """``torch.npu.synchronize(device)``: wait for the device's queued work."""
    torch.npu.synchronize(device)


@hookimpl
def chitu_empty_cache(device: torch.device) -> None:
    """``torch.npu.empty_cache()``: release cached blocks of torch_npu's caching allocator."""
    torch.npu.empty_cache()
