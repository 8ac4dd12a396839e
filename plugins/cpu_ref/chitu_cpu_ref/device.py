"""Device and memory hooks for host memory: the CPU is the device."""

from __future__ import annotations

import os

import torch

from chitu_core.hookspecs import hookimpl


@hookimpl
def chitu_device(local_rank: int) -> torch.device:
    """Every rank computes on the CPU."""
    return torch.device("cpu")


@hookimpl
def chitu_memory_info(device: torch.device) -> tuple[int, int]:
    """``(free_bytes, total_bytes)`` of the machine's RAM."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page_size, os.sysconf("SC_PHYS_PAGES") * page_size


@hookimpl
def chitu_allocate_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Zeroed, contiguous ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
    return torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


@hookimpl
def chitu_synchronize(device: torch.device) -> None:
    """CPU ops finish before they return: nothing to wait for."""


@hookimpl
def chitu_empty_cache(device: torch.device) -> None:
    """torch keeps no device cache of host memory: nothing to free."""
