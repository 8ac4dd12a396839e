"""The NVIDIA plugin's peer-store all-reduce (``p2p_all_reduce``) on two GPUs (two
processes, NCCL): exact sums eagerly and inside CUDA graphs, many calls in flight at
once, the routing between it and NCCL, the fused all-reduce + add + RMSNorm against the
unfused pair, and a late peer ending in an error, not a hang."""

from __future__ import annotations

import os
import socket
import time

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

# (rows, cols, dtype): decode-sized tensors (peer stores) and larger ones (NCCL).
CASES = [
    (1, 4096, torch.bfloat16),
    (32, 4096, torch.bfloat16),
    (64, 7168, torch.bfloat16),
    (128, 4096, torch.bfloat16),  # exactly MAX_BYTES
    (512, 4096, torch.bfloat16),  # larger: NCCL
    (16, 4096, torch.float32),
    (8, 1000, torch.float16),  # not a whole number of program slices
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    return dist


def _inputs(rows: int, cols: int, dtype: torch.dtype, calls: int, seed: int) -> torch.Tensor:
    """``[calls, 2, rows, cols]``: integers in [-8, 8), so every sum is exact in every
    dtype and ``torch.equal`` is the test; each call's values differ, so a call that
    read another call's slot would be caught."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(-8, 8, (calls, 2, rows, cols), generator=gen, device="cuda").to(dtype)


def _check_case(rank, group, rows, cols, dtype, failures) -> None:
    from chitu_nvidia import p2p_all_reduce as p2p

    path = p2p._by_group[group.group_name]
    calls = 24
    data = _inputs(rows, cols, dtype, calls, seed=rows * cols)
    expected = data.sum(dim=1)
    # Eager: all calls queued back to back, no host sync in between.
    mine = [data[k, rank].clone() for k in range(calls)]
    for t in mine:
        p2p.all_reduce(t, group)
    torch.cuda.synchronize()
    wrong = [k for k in range(calls) if not torch.equal(mine[k], expected[k])]
    if wrong:
        failures.append(f"rank {rank} eager {rows}x{cols} {dtype}: wrong sums in calls {wrong}")
    # A CUDA graph of 3 calls, replayed with new values each time.
    static = [torch.zeros_like(mine[0]) for _ in range(3)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for s in static:
            p2p.all_reduce(s, group)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in static:
            p2p.all_reduce(s, group)
    for replay in range(6):
        for j, s in enumerate(static):
            s.copy_(data[(3 * replay + j) % calls, rank])
        graph.replay()
        torch.cuda.synchronize()
        for j, s in enumerate(static):
            if not torch.equal(s, expected[(3 * replay + j) % calls]):
                failures.append(f"rank {rank} graph {rows}x{cols} {dtype} replay {replay} call {j}")
    takes = path.takes(mine[0])
    if takes != (rows * cols * dtype.itemsize <= p2p.MAX_BYTES):
        failures.append(f"rank {rank}: {rows}x{cols} {dtype} routed wrongly (takes={takes})")


# Fused cases (rows, hidden, dtype): one kernel, and past its limits the composition.
FUSED_CASES = [
    (1, 4096, torch.bfloat16),
    (32, 4096, torch.bfloat16),
    (64, 7168, torch.bfloat16),
    (13, 5120, torch.float32),
    (300, 2048, torch.bfloat16),  # more rows than MAX_PROGRAMS: all_reduce + add_rms_norm
]


def _same_on_both_ranks(t: torch.Tensor, group) -> bool:
    """Whether both ranks hold the same bits in ``t`` (what TP needs of a collective)."""
    import torch.distributed as dist

    both = torch.empty((2, *t.shape), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(both, t.contiguous(), group=group)
    return torch.equal(both[0], both[1])


def _check_fused(rank, group, rows, hidden, dtype, failures) -> None:
    """all_reduce_add_rms_norm against all_reduce then add_rms_norm on the same inputs:
    ``summed`` bit for bit (two parts round once either way), ``normed`` within a few
    roundings (the plugin's norm kernel sums the squares in another order), and both the
    same bits on the two ranks; eagerly with plain all-reduces interleaved (they share the
    call count and the slots) and in a graph."""
    from chitu_nvidia import p2p_all_reduce as p2p
    from chitu_nvidia.small_ops import add_rms_norm

    calls = 12
    data = _inputs(rows, hidden, dtype, calls, seed=7 * rows + hidden)
    gen = torch.Generator(device="cuda").manual_seed(hidden)
    residual = torch.randn(rows, hidden, generator=gen, device="cuda").to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device="cuda")).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    expected = [add_rms_norm(data[k].sum(dim=0), residual, weight, 1e-6) for k in range(calls)]
    tag = f"rank {rank} fused {rows}x{hidden} {str(dtype)[6:]}"

    def check(normed, summed, k, where):
        if not torch.equal(summed, expected[k][1]):
            failures.append(f"{tag} {where}: summed differs from the unfused sum")
        try:
            torch.testing.assert_close(normed, expected[k][0], **tol)
        except AssertionError as exc:
            failures.append(f"{tag} {where}: normed: {str(exc).splitlines()[1:3]}")
        if not (_same_on_both_ranks(normed, group) and _same_on_both_ranks(summed, group)):
            failures.append(f"{tag} {where}: the ranks hold different bits")

    results, plain = [], []
    for k in range(calls):
        part = data[k, rank].clone()
        results.append(p2p.all_reduce_add_rms_norm(part, residual, weight, 1e-6, group))
        small = data[k, rank, :1].clone()  # a plain call between fused ones
        plain.append(p2p.all_reduce(small, group))
    torch.cuda.synchronize()
    for k in range(calls):
        check(*results[k], k, f"eager call {k}")
        if not torch.equal(plain[k], data[k, :, :1].sum(dim=0)):
            failures.append(f"{tag}: the plain call after fused call {k} summed wrongly")
    static = data[0, rank].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        p2p.all_reduce_add_rms_norm(static.clone(), residual, weight, 1e-6, group)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = p2p.all_reduce_add_rms_norm(static, residual, weight, 1e-6, group)
    for replay in range(4):
        static.copy_(data[replay, rank])
        graph.replay()
        torch.cuda.synchronize()
        check(*out, replay, f"graph replay {replay}")


def _sums_worker(rank: int, port: int, failures) -> None:
    dist = _init(rank, port)
    try:
        from chitu_nvidia import plugin

        group = plugin.chitu_new_group([0, 1], 60.0)
        from chitu_nvidia import p2p_all_reduce as p2p

        if group.group_name not in p2p._by_group:
            failures.append(f"rank {rank}: the peer-store all-reduce was not set up")
            return
        for case in CASES:
            try:
                _check_case(rank, group, *case, failures)
            except Exception as exc:  # report every case, not only the first to raise
                failures.append(f"rank {rank} {case}: {type(exc).__name__}: {exc}")
        for case in FUSED_CASES:
            try:
                _check_fused(rank, group, *case, failures)
            except Exception as exc:
                failures.append(f"rank {rank} fused {case}: {type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


def test_peer_store_all_reduce_and_fused_norm_exact_eager_and_in_graphs():
    failures = mp.Manager().list()
    mp.spawn(_sums_worker, args=(_port(), failures), nprocs=2, join=True)
    assert not list(failures), list(failures)


def _late_peer_worker(rank: int, port: int, results) -> None:
    """Rank 0 all-reduces on a group with a 1 s timeout; rank 1 never does."""
    dist = _init(rank, port)
    from chitu_nvidia import plugin

    group = plugin.chitu_new_group([0, 1], 1.0)
    dist.barrier()
    if rank == 0:
        x = torch.ones(32, 4096, dtype=torch.bfloat16, device="cuda")
        try:
            plugin.chitu_all_reduce(x, group)
            torch.cuda.synchronize()
            results.append("rank 0: no error")
        except RuntimeError as exc:
            results.append(f"rank 0: RuntimeError: {exc}")
    else:
        results.append("rank 1: stayed away")
        time.sleep(5)  # alive (buffer mapped) while rank 0 waits and gives up
    os._exit(0)  # rank 0's CUDA context is gone after the abort: no orderly teardown


def test_a_peer_that_never_comes_ends_in_an_error_not_a_hang():
    results = mp.Manager().list()
    ctx = mp.spawn(_late_peer_worker, args=(_port(), results), nprocs=2, join=False)
    for proc in ctx.processes:
        proc.join(timeout=120)
    alive = [p.pid for p in ctx.processes if p.is_alive()]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    assert not alive, f"processes still running after 120 s: {alive} ({list(results)})"
    assert any(r.startswith("rank 0: RuntimeError") for r in results), list(results)
