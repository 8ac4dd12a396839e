"""Generic device and memory hooks.

The host ("cpu") needs nothing: no queue to drain, no cache to empty, and its
memory figures come from ``os.sysconf``. Every other device type is driven
through its torch module (``torch.cuda``, ``torch.npu``, ``torch.xpu``...),
looked up by name so that no device is named here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch


def _device_module(device: torch.device) -> Any:
    """The torch module of ``device``'s type, e.g. ``torch.cuda`` for "cuda"."""
    module = getattr(torch, device.type, None)
    if module is None:
        raise RuntimeError(
            f"torch has no module for device type {device.type!r}; the backend for it "
            "must implement this hook itself (or its torch extension is not imported)"
        )
    return module


def device(local_rank: int) -> torch.device:
    """See ``chitu_core.hookspecs.chitu_device``.

    Unbound, the generic hook is not told the backend's device type, so it takes
    torch's current accelerator (cuda, npu, xpu... whichever this torch build
    drives) and falls back to the host when there is none. ``bind_ops`` binds
    ``device_of_type`` with the backend's ``BackendInfo.device_type`` instead.
    """
    accelerator = None
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        accelerator = torch.accelerator.current_accelerator()
    return device_of_type("cpu" if accelerator is None else accelerator.type, local_rank)


def device_of_type(device_type: str, local_rank: int) -> torch.device:
    """The ``local_rank``-th device of ``device_type``, made current (the host for "cpu")."""
    if device_type == "cpu":
        return torch.device("cpu")
    dev = torch.device(device_type, local_rank)
    _device_module(dev).set_device(dev)
    return dev


def memory_info(device: torch.device) -> tuple[int, int]:
    """See ``chitu_core.hookspecs.chitu_memory_info``.

    Host: available and total physical pages times the page size (Linux
    ``sysconf``; where ``SC_AVPHYS_PAGES`` is missing, free is reported as
    total). Other devices: the device module's ``mem_get_info``.
    """
    if device.type == "cpu":
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        if "SC_AVPHYS_PAGES" not in os.sysconf_names:
            return total, total
        return os.sysconf("SC_AVPHYS_PAGES") * page, total
    free, total = _device_module(device).mem_get_info(device)
    return int(free), int(total)


def allocate_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_allocate_kv_cache``. A plain ``torch.zeros``."""
    return torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


def synchronize(device: torch.device) -> None:
    """See ``chitu_core.hookspecs.chitu_synchronize``. The host runs eagerly: no-op."""
    if device.type != "cpu":
        _device_module(device).synchronize(device)


def empty_cache(device: torch.device) -> None:
    """See ``chitu_core.hookspecs.chitu_empty_cache``. The host has no caching allocator: no-op."""
    if device.type != "cpu":
        _device_module(device).empty_cache()


def capture_graph(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """See ``chitu_core.hookspecs.chitu_capture_graph``.

    No graphs in the generic path: ``fn`` itself is the replay (eager, same
    results). Its outputs may be fresh tensors on every call unless ``fn``
    writes into static buffers, so callers use each call's return value.
    """
    return fn
