"""The one-shot (symmetric-memory) all-reduce of the NVIDIA plugin against the exact sum,
eagerly and inside a CUDA graph, on two GPUs (two processes, NCCL)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available()
        or torch.version.hip is not None
        or torch.cuda.device_count() < 2,
        reason="needs 2 NVIDIA GPUs",
    ),
]

# (rows, cols, dtype): decode-sized (one-shot) and prefill-sized (NCCL) tensors.
CASES = [
    (1, 4096, torch.bfloat16),
    (32, 4096, torch.bfloat16),
    (64, 7168, torch.bfloat16),
    (128, 4096, torch.bfloat16),  # exactly ONE_SHOT_MAX_BYTES
    (512, 4096, torch.bfloat16),  # larger: NCCL
    (16, 4096, torch.float32),
    (8, 1000, torch.float16),
]


def _worker(rank: int, port: int, failures) -> None:
    import torch.distributed as dist
    from chitu_nvidia import collectives

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    try:
        group = collectives.new_group([0, 1], timeout_s=60)
        one_shot = collectives._one_shot.get(group.group_name)
        if one_shot is None:
            failures.append(f"rank {rank}: no symmetric-memory buffers were set up")
            return
        for case in CASES:
            try:
                _check_case(rank, group, one_shot, *case, failures)
            except Exception as exc:  # report every case, not only the first to raise
                failures.append(f"rank {rank} {case}: {type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


def _check_case(rank, group, one_shot, rows, cols, dtype, failures) -> None:
    """One shape: an eager call and three calls in a CUDA graph, against exact sums."""
    from chitu_nvidia import collectives

    # Integers in [-8, 8): every sum is exact in every dtype, so == is the test.
    gen = torch.Generator(device="cuda").manual_seed(rows * cols)
    inputs = [
        torch.randint(-8, 8, (2, rows, cols), generator=gen, device="cuda").to(dtype)
        for _ in range(3)
    ]
    expected = [x.sum(dim=0) for x in inputs]
    mine = [x[rank].clone() for x in inputs]
    eager = mine[0].clone()
    collectives.all_reduce(eager, group)
    if not torch.equal(eager, expected[0]):
        failures.append(f"rank {rank} eager {rows}x{cols} {dtype}: wrong sum")
    # Three calls back to back in a graph: the buffer is reused while the peer
    # may still be reading the previous call's values.
    static = [torch.zeros_like(m) for m in mine]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for s in static:
            collectives.all_reduce(s, group)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in static:
            collectives.all_reduce(s, group)
    for _ in range(2):
        for s, m in zip(static, mine, strict=True):
            s.copy_(m)
        graph.replay()
        torch.cuda.synchronize()
        for k, (s, e) in enumerate(zip(static, expected, strict=True)):
            if not torch.equal(s, e):
                failures.append(f"rank {rank} graph {rows}x{cols} {dtype} call {k}")
    takes = one_shot.takes(mine[0])
    if takes != (rows * cols * dtype.itemsize <= collectives.ONE_SHOT_MAX_BYTES):
        failures.append(f"rank {rank}: {rows}x{cols} {dtype} routed wrongly")


def test_one_shot_all_reduce_sums_exactly_eager_and_in_graphs():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    failures = mp.Manager().list()
    mp.spawn(_worker, args=(port, failures), nprocs=2, join=True)
    assert not list(failures), list(failures)
