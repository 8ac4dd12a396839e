"""Process groups of a TP x PP run, made through the backend's collectives hooks.

``torch.distributed`` is initialised with the active backend's
``BackendInfo.dist_backend`` (nccl, hccl, gloo... the core never names one);
every group after that comes from ``ops.new_group`` and every transfer goes
through ``ops.all_reduce`` / ``all_gather`` / ``send`` / ``recv``. Each
group's collectives fail after ``timeout_s`` instead of hanging.

Rank layout: ``rank = pp_rank * tp + tp_rank``. A stage's TP ranks are
consecutive, so on an 8-GPU node ``--tp 8 --pp 2`` keeps each TP group inside
one node and only the stage hand-off crosses nodes. Rank 0 (stage 0, TP rank
0) is the driver: it schedules, samples and serves HTTP.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from chitu_core.distributed import DistributedError
from chitu_core.distributed.model_parallel import ModelParallel

TEARDOWN_TIMEOUT_S = 10.0

logger = logging.getLogger(__name__)

# What torchrun (and ``launch.py``'s spawner) puts in every rank's environment.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_as_rank() -> bool:
    """Whether this process is one rank of a torchrun-style launch (the env vars are set)."""
    return all(name in os.environ for name in LAUNCH_ENV)


@dataclass(frozen=True)
class RankLayout:
    """Where global rank ``rank`` sits in the ``tp`` x ``pp`` grid (pure arithmetic)."""

    tp: int
    pp: int
    rank: int

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"--tp ({self.tp}) and --pp ({self.pp}) must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    def stage_ranks(self, pp_rank: int) -> list[int]:
        """The TP group of stage ``pp_rank``."""
        return [pp_rank * self.tp + t for t in range(self.tp)]

    def pipeline_ranks(self, tp_rank: int) -> list[int]:
        """The ranks of TP rank ``tp_rank`` in every stage, in stage order (a PP group)."""
        return [s * self.tp + tp_rank for s in range(self.pp)]

    def peer(self, pp_rank: int) -> int:
        """The global rank holding this rank's TP shard in stage ``pp_rank``."""
        return pp_rank * self.tp + self.tp_rank


class ParallelState:
    """This process's groups and its side of the collectives the executor needs."""

    def __init__(
        self,
        ops: Any,
        layout: RankLayout,
        local_rank: int,
        device: torch.device,
        groups: tuple[Any, Any, Any, Any],
        timeout_s: float,
    ) -> None:
        self.ops, self.layout, self.local_rank, self.device = ops, layout, local_rank, device
        # control_group: gloo over stage 0's TP ranks (None where tp == 1): step headers
        # and payloads travel host to host, never waiting for a device.
        self.world_group, self.tp_group, self.pp_group, self.control_group = groups
        self.timeout_s = timeout_s

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def is_driver(self) -> bool:
        return self.layout.rank == 0

    def model_parallel(self) -> ModelParallel:
        """The plan this rank's model is built with (TP collectives bound to its TP group)."""
        layout, ops, group = self.layout, self.ops, self.tp_group
        if layout.tp == 1:
            return ModelParallel(pp_size=layout.pp, pp_rank=layout.pp_rank)
        return ModelParallel(
            tp_size=layout.tp,
            tp_rank=layout.tp_rank,
            pp_size=layout.pp,
            pp_rank=layout.pp_rank,
            all_reduce_fn=lambda x: ops.all_reduce(x, group),
            all_gather_fn=lambda x, dim: ops.all_gather(x, group, dim),
            all_reduce_add_rms_norm_fn=lambda x, residual, weight, eps: ops.all_reduce_add_rms_norm(
                x, residual, weight, eps, group
            ),
        )

    # -- world-wide agreement ----------------------------------------------------------
    def from_driver(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (same shape everywhere): an all-gather of the
        world, keeping rank 0's part. Exact for any dtype (the contract has no broadcast)."""
        gathered = self.ops.all_gather(tensor.to(self.device), self.world_group, 0)
        return gathered[: tensor.shape[0]]

    def from_stage_leader(self, tensor: torch.Tensor) -> torch.Tensor:
        """TP rank 0's ``tensor`` on every TP rank of this stage (an all-gather of the TP group)."""
        gathered = self.ops.all_gather(tensor.to(self.device), self.tp_group, 0)
        return gathered[: tensor.shape[0]]

    def send_control(self, tensor: torch.Tensor) -> None:
        """Rank 0: ``tensor`` (CPU int64) to every other TP rank of stage 0 over the control
        group (a gloo broadcast: returns once the receivers have taken it)."""
        dist.broadcast(tensor, src=0, group=self.control_group)

    def recv_control(self, tensor: torch.Tensor) -> torch.Tensor:
        """A TP rank of stage 0 other than rank 0: the next control message from rank 0 into
        ``tensor`` (CPU, the size rank 0 sent); returns ``tensor``."""
        dist.broadcast(tensor, src=0, group=self.control_group)
        return tensor

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over all ranks (e.g. KV blocks that fit everywhere)."""
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        return int(self.ops.all_gather(mine, self.world_group, 0).min())

    def driver_choice(self, names: tuple[str, ...], universe: tuple[str, ...]) -> tuple[str, ...]:
        """Rank 0's subset ``names`` of ``universe`` (e.g. the ops its conformance gate demoted)."""
        mask = torch.tensor([n in names for n in universe], dtype=torch.int64)
        chosen = self.from_driver(mask).tolist()
        return tuple(n for n, keep in zip(universe, chosen, strict=True) if keep)

    # -- pipeline hand-off -------------------------------------------------------------
    def send_to_stage(self, tensor: torch.Tensor, pp_rank: int) -> None:
        self.ops.send(tensor.contiguous(), self.layout.peer(pp_rank), self.pp_group)

    def recv_from_stage(self, tensor: torch.Tensor, pp_rank: int) -> torch.Tensor:
        return self.ops.recv(tensor, self.layout.peer(pp_rank), self.pp_group)


_GROUPS: dict[tuple[int, int], tuple[Any, Any, Any, Any]] = {}


def init_parallel(ops: Any, tp: int, pp: int, timeout_s: float) -> ParallelState:
    """Join the world described by the launch environment and make the groups.

    Every rank calls this with the same ``tp``/``pp`` (the groups are made in the
    same order everywhere, as ``new_group`` requires). Calling it again with the
    same sizes reuses the groups. Raises DistributedError when the world size
    of the launch is not ``tp * pp``.
    """
    if not launched_as_rank():
        raise DistributedError(
            f"--tp {tp} --pp {pp} needs {tp * pp} processes: start with "
            f"'torchrun --nproc_per_node {tp * pp} -m chitu_core ...' or let 'chitu serve' "
            "spawn them (it does when not under torchrun)"
        )
    world = int(os.environ["WORLD_SIZE"])
    if world != tp * pp:
        raise DistributedError(
            f"the launch has {world} processes but --tp {tp} x --pp {pp} = {tp * pp}; "
            "make WORLD_SIZE (nproc_per_node x nnodes) equal tp x pp"
        )
    layout = RankLayout(tp, pp, int(os.environ["RANK"]))
    local_rank = int(os.environ.get("LOCAL_RANK", layout.rank))
    device = ops.device(local_rank)
    if not dist.is_initialized():
        logger.info(
            "rank %d/%d: joining %s:%s with torch.distributed backend %r",
            layout.rank,
            world,
            os.environ["MASTER_ADDR"],
            os.environ["MASTER_PORT"],
            ops.info.dist_backend,
        )
        try:
            dist.init_process_group(
                backend=ops.info.dist_backend,
                rank=layout.rank,
                world_size=world,
                timeout=timedelta(seconds=timeout_s),
            )
        except Exception as exc:
            raise DistributedError(
                f"rank {layout.rank}: could not join the {world} ranks at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g}s "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    if (tp, pp) not in _GROUPS:
        world_group = ops.new_group(list(range(world)), timeout_s)
        tp_group = pp_group = None
        for stage in range(pp):  # every rank makes every group, in the same order
            group = ops.new_group(layout.stage_ranks(stage), timeout_s)
            if stage == layout.pp_rank:
                tp_group = group
        for tp_rank in range(tp):
            group = ops.new_group(layout.pipeline_ranks(tp_rank), timeout_s)
            if tp_rank == layout.tp_rank:
                pp_group = group
        control_group = None
        if tp > 1:  # every rank makes it (new_group's rule); stage 0's ranks use it
            control_group = dist.new_group(
                layout.stage_ranks(0), timeout=timedelta(seconds=timeout_s), backend="gloo"
            )
        _GROUPS[(tp, pp)] = (world_group, tp_group, pp_group, control_group)
    return ParallelState(ops, layout, local_rank, device, _GROUPS[(tp, pp)], timeout_s)


def shutdown(timeout_s: float = TEARDOWN_TIMEOUT_S) -> None:
    """Leave the world (after the last engine of this process is closed).

    The process group's teardown is given ``timeout_s`` seconds: a ``chitu serve --tp
    2`` on two H200s was seen still running 45 s after SIGTERM with every rank released,
    and nothing is left to save once the engine is closed, so the process goes on to
    exit rather than wait for it.
    """
    _GROUPS.clear()
    if not dist.is_initialized():
        return
    logger.info("leaving the process group")
    done = threading.Event()

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception as exc:  # peers may be gone already; nothing left to save
            logger.debug("destroy_process_group: %s", exc)
        finally:
            done.set()

    threading.Thread(target=destroy, name="chitu-dist-teardown", daemon=True).start()
    if done.wait(timeout_s):
        logger.info("left the process group")
    else:
        logger.warning(
            "the process group's teardown did not finish within %.0f s; exiting without it",
            timeout_s,
        )
