"""``simulate_tp``: the ranks of a tensor-parallel group as threads of one process.

Their all-reduce and all-gather meet at a barrier, so sharded model code runs
exactly as in separate processes, minus the process start-up (the real
processes are in tests/distributed/test_parity.py). Shared by the distributed
and the model tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from chitu_core.distributed.model_parallel import ModelParallel


def simulate_tp(tp: int, work: Callable[[ModelParallel], Any]) -> list[Any]:
    """``work(parallel)`` on ``tp`` threads, one per TP rank; returns each rank's result."""
    barrier = threading.Barrier(tp, timeout=60)
    slots: list[torch.Tensor | None] = [None] * tp

    def exchange(rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        slots[rank] = x.clone()
        barrier.wait()
        parts = list(slots)
        barrier.wait()
        return parts

    def plan(rank: int) -> ModelParallel:
        def all_reduce(x: torch.Tensor) -> torch.Tensor:
            return x.copy_(sum(exchange(rank, x)))

        def all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat(exchange(rank, x), dim=dim)

        return ModelParallel(tp, rank, all_reduce_fn=all_reduce, all_gather_fn=all_gather)

    results: list[Any] = [None] * tp
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            with torch.inference_mode():
                results[rank] = work(plan(rank))
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
