"""Generic collectives over ``torch.distributed``.

The process group is torch's own ``ProcessGroup``; the dist backend (nccl,
hccl, gloo...) is whatever ``torch.distributed`` was initialised with
(``BackendInfo.dist_backend``). Only gloo's missing reduce_scatter needs a
detour.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from chitu_core.ops import small


def new_group(ranks: list[int], timeout_s: float) -> Any:
    """See ``chitu_core.hookspecs.chitu_new_group``."""
    return dist.new_group(ranks=ranks, timeout=timedelta(seconds=timeout_s))


def all_reduce(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_all_reduce``. In place; returns ``tensor``."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group: Any,
    *,
    all_reduce: Callable[[torch.Tensor, Any], torch.Tensor] = all_reduce,
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = small.add_rms_norm,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``chitu_core.hookspecs.chitu_all_reduce_add_rms_norm``: ``all_reduce`` then
    ``add_rms_norm``. A backend without the fused hook gets this composed of its own two
    ops (``chitu_core.backend.bind_ops`` passes them), so it reads the backend's group
    handles and keeps the backend's numerics."""
    return add_rms_norm(all_reduce(x, group), residual, weight, eps)


def all_gather(tensor: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_all_gather``.

    On NCCL one ``all_gather_into_tensor`` into a ``[G, ...]`` stack, then at most one
    copy to concatenate along ``dim`` (none for ``dim`` 0); the list form, which every
    dist backend has, copies each part out and concatenates them again.
    """
    tensor = tensor.contiguous()
    world = dist.get_world_size(group)
    if dist.get_backend(group) == "nccl" and tensor.dim() > 0:
        d = dim % tensor.dim()
        stacked = torch.empty((world, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather_into_tensor(stacked, tensor, group=group)
        shape = (*tensor.shape[:d], world * tensor.shape[d], *tensor.shape[d + 1 :])
        return stacked.movedim(0, d).reshape(shape)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter(tensor: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_reduce_scatter``.

    gloo has no reduce_scatter: there it is an all_reduce of a copy followed
    by taking this rank's chunk (G times the traffic, fine on the host).
    """
    world = dist.get_world_size(group)
    if tensor.shape[dim] % world != 0:
        raise ValueError(
            f"reduce_scatter: dim {dim} has size {tensor.shape[dim]}, not divisible by "
            f"the group size {world}"
        )
    rank = dist.get_rank(group)
    if dist.get_backend(group) == "gloo":
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total.chunk(world, dim=dim)[rank].contiguous()
    inputs = [chunk.contiguous() for chunk in tensor.chunk(world, dim=dim)]
    out = torch.empty_like(inputs[rank])
    dist.reduce_scatter(out, inputs, op=dist.ReduceOp.SUM, group=group)
    return out


def send(tensor: torch.Tensor, dst: int, group: Any) -> None:
    """See ``chitu_core.hookspecs.chitu_send``. ``dst`` is a global rank, as torch's."""
    dist.send(tensor, dst=dst, group=group)


def recv(tensor: torch.Tensor, src: int, group: Any) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_recv``. ``src`` is a global rank, as torch's."""
    dist.recv(tensor, src=src, group=group)
    return tensor
