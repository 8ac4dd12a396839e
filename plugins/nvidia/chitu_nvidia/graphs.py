"""CUDA graph capture for ``chitu_capture_graph``.

All graphs captured on one device share a memory pool (captured largest batch
first, the smaller ones fit in what the first allocated). Sharing is safe
because the engine replays one graph at a time and queues the work that
consumes its outputs before the next replay on the same stream, which the hook
contract states.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_WARMUP_RUNS = 2
_pools: dict[int, Any] = {}


def capture_cuda_graph(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """Warm ``fn`` up on a side stream (Triton compiles, cuBLAS picks its algorithms, lazy
    buffers get allocated), capture it, and return a replay that gives the captured outputs."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        pool = _pools.get(index)
        if pool is None:
            pool = _pools[index] = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_RUNS):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()

    def replay() -> Any:
        graph.replay()
        return outputs

    return replay
