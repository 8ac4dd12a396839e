"""Collectives in a world of ``WORLD_SIZE`` processes, spawned on this host.

A collective cannot be checked in one process (a world of one makes an
all-reduce the identity, which is exactly the bug of an all-reduce that
returns the local value), so the suite spawns ``WORLD_SIZE`` workers that
bind the backend exactly as the engine does, initialise ``torch.distributed``
with the backend's ``dist_backend`` (gloo for host backends) and run every
case. Rank ``r``'s input is drawn from the case's seed plus ``r``, so every
rank computes the exact expected result (in fp64) on its own. ``send`` and
``recv`` are checked against the generic peer so a failure names one op.

An accelerator backend needs ``WORLD_SIZE`` devices on this host; with fewer,
the cases are reported as skipped, not passed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from conformance.check import ERROR, FAIL, PASS, SKIP, CaseResult
from conformance.tolerances import compare, tolerance_for

logger = logging.getLogger(__name__)

WORLD_SIZE = 2
GROUP_TIMEOUT_S = 30.0  # a collective that hangs fails after this
WORLD_TIMEOUT_S = 300.0  # the whole world, start-up included


@dataclass(frozen=True)
class CollectiveCase:
    """One collective on one shape; ``fp32`` runs it on an fp32 tensor instead of the compute dtype."""

    op: str
    name: str
    shape: tuple[int, ...]
    dim: int = 0
    fp32: bool = False

    @property
    def id(self) -> str:
        return f"{self.op}[{self.name}]"

    def rank_input(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """Rank ``rank``'s tensor, on the host, in the case's dtype."""
        gen = torch.Generator().manual_seed(zlib.crc32(self.id.encode()) + rank)
        return torch.randn(*self.shape, generator=gen).to(torch.float32 if self.fp32 else dtype)


COLLECTIVE_CASES: tuple[CollectiveCase, ...] = (
    CollectiveCase("all_reduce", "T=7,H=7168", (7, 7168)),
    CollectiveCase("all_reduce", "fp32,T=3,E=256", (3, 256), fp32=True),
    CollectiveCase("all_reduce", "empty", (0, 64)),
    CollectiveCase("all_reduce_add_rms_norm", "T=7,H=7168", (7, 7168)),
    CollectiveCase("all_reduce_add_rms_norm", "T=32,H=4096", (32, 4096)),
    CollectiveCase("all_reduce_add_rms_norm", "fp32,T=3,H=256", (3, 256), fp32=True),
    CollectiveCase("all_gather", "dim=0,T=5,V=300", (5, 300), 0),
    CollectiveCase("all_gather", "dim=1,T=5,V=300", (5, 300), 1),
    CollectiveCase("reduce_scatter", "dim=0,T=8,H=96", (8, 96), 0),
    CollectiveCase("reduce_scatter", "dim=1,T=3,H=256", (3, 256), 1),
    CollectiveCase("send", "T=17,H=33", (17, 33)),
    CollectiveCase("recv", "T=17,H=33", (17, 33)),
)


# Ops whose result every rank must hold bit for bit (the TP ranks go on from it as one).
SAME_ON_EVERY_RANK = frozenset({"all_reduce", "all_reduce_add_rms_norm"})
NORM_EPS = 1e-6


def _norm_inputs(case: CollectiveCase, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual ``[T, H]`` and weight ``[H]`` of a fused case: the same on every rank."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()) + 1000)
    residual = torch.randn(*case.shape, generator=gen)
    weight = 1.0 + 0.1 * torch.randn(case.shape[-1], generator=gen)
    dt = torch.float32 if case.fp32 else dtype
    return residual.to(dt), weight.to(dt)


def _expected(case: CollectiveCase, rank: int, dtype: torch.dtype) -> Any:
    parts = [case.rank_input(r, dtype) for r in range(WORLD_SIZE)]
    if case.op == "all_reduce":
        return sum(p.double() for p in parts)
    if case.op == "all_reduce_add_rms_norm":
        residual, weight = _norm_inputs(case, dtype)
        summed = residual.double() + sum(p.double() for p in parts)
        inv = torch.rsqrt(summed.pow(2).mean(dim=-1, keepdim=True) + NORM_EPS)
        return summed * inv * weight.double(), summed
    if case.op == "all_gather":
        return torch.cat(parts, dim=case.dim)
    if case.op == "reduce_scatter":
        return sum(p.double() for p in parts).chunk(WORLD_SIZE, dim=case.dim)[rank]
    return parts[0] if rank == 1 else None  # send/recv: rank 0 -> rank 1


def _run(case: CollectiveCase, ops: Any, generic: Any, rank: int, group: Any, device, dtype):
    x = case.rank_input(rank, dtype).to(device)
    if case.op == "all_reduce":
        return ops.all_reduce(x, group)
    if case.op == "all_reduce_add_rms_norm":
        residual, weight = (t.to(device) for t in _norm_inputs(case, dtype))
        return ops.all_reduce_add_rms_norm(x, residual, weight, NORM_EPS, group)
    if case.op in ("all_gather", "reduce_scatter"):
        return getattr(ops, case.op)(x, group, case.dim)
    sender, receiver = (ops, generic) if case.op == "send" else (generic, ops)
    if rank == 0:
        sender.send(x, 1, group)
        return None
    return receiver.recv(torch.empty_like(x), 0, group)


def _check(case: CollectiveCase, out, expected, dtype: torch.dtype) -> dict[str, Any]:
    """One rank's result against the fp64 expectation (each output of a tuple in turn;
    the worst one is reported), plus a digest of its bits for the cross-rank check."""
    if isinstance(expected, tuple):
        if not isinstance(out, tuple | list) or len(out) != len(expected):
            return {"status": FAIL, "message": f"expected {len(expected)} outputs"}
        rows = [_check(case, o, e, dtype) for o, e in zip(out, expected, strict=True)]
        worst = max(rows, key=lambda r: (r["status"] != PASS, r.get("rel_fro", 0.0)))
        return worst | {"digest": "/".join(r.get("digest", "") for r in rows)}
    row: dict[str, Any] = {"status": PASS, "message": ""}
    if expected is None:
        return row
    if case.op in SAME_ON_EVERY_RANK:
        host = out.detach().cpu().contiguous()
        row["digest"] = f"{zlib.crc32(host.view(torch.uint8).numpy().tobytes()):08x}"
    if tuple(out.shape) != tuple(expected.shape):
        row.update(
            status=FAIL, message=f"shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
        )
        return row
    tol = tolerance_for(case.op, torch.float32 if case.fp32 else dtype)
    report = compare(out, expected)
    row.update(
        rel_fro=report.rel_fro,
        max_abs_rel=report.max_abs_rel,
        cosine=report.cosine,
        nan_mismatch=report.nan_mismatch,
        bound_rel_fro=tol.rel_fro,
        bound_max_abs_rel=tol.max_abs_rel,
    )
    if not report.within(tol):
        row.update(
            status=FAIL,
            message=f"rel_fro {report.rel_fro:.3e} (bound {tol.rel_fro:.1e}), "
            f"max_abs_rel {report.max_abs_rel:.3e} (bound {tol.max_abs_rel:.1e})",
        )
    return row


def _worker(rank: int, backend: str, demote: list[str], dtype_name: str, workdir: str) -> None:
    """One rank: bind the backend, join the world, run every case, write ``rank<r>.json``."""
    import torch.distributed as dist

    from chitu_core.backend import OP_NAMES, bind_ops, discover_backends, select_backend

    dtype = getattr(torch, dtype_name)
    rows: dict[str, dict[str, Any]] = {}
    try:
        installed = select_backend(backend, discover_backends())
        ops, generic = bind_ops(installed, demote), bind_ops(installed, OP_NAMES)
        device = ops.device(rank)
        dist.init_process_group(
            installed.info.dist_backend,
            init_method=f"file://{workdir}/rendezvous",
            rank=rank,
            world_size=WORLD_SIZE,
        )
        group = ops.new_group(list(range(WORLD_SIZE)), GROUP_TIMEOUT_S)
        for case in COLLECTIVE_CASES:
            try:
                out = _run(case, ops, generic, rank, group, device, dtype)
                rows[case.id] = _check(case, out, _expected(case, rank, dtype), dtype)
            except Exception as exc:  # report it and go on: the peer is in the same case
                rows[case.id] = {"status": ERROR, "message": f"raised {type(exc).__name__}: {exc}"}
        dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:
        setup = {"status": ERROR, "message": f"world setup failed: {type(exc).__name__}: {exc}"}
        rows = {case.id: rows.get(case.id, setup) for case in COLLECTIVE_CASES}
    Path(workdir, f"rank{rank}.json").write_text(json.dumps(rows))


def _device_count(device_type: str) -> int:
    if device_type == "cpu":
        return WORLD_SIZE  # gloo workers share the host
    module = getattr(torch, device_type, None)
    return int(module.device_count()) if module is not None else 0


def _merge(case: CollectiveCase, per_rank: list[dict[str, Any]], native: bool) -> CaseResult:
    result = CaseResult(case.id, case.op, native=native)
    severity = {PASS: 0, SKIP: 0, FAIL: 1, ERROR: 2}
    problems = []
    for rank, row in enumerate(per_rank):
        for key in ("rel_fro", "max_abs_rel", "nan_mismatch", "bound_rel_fro", "bound_max_abs_rel"):
            if key in row:
                setattr(result, key, max(getattr(result, key), row[key]))
        if row["status"] != PASS:
            problems.append(f"rank {rank}: {row['message']}")
            if severity[row["status"]] > severity[result.status]:
                result.status = row["status"]
    digests = {row["digest"] for row in per_rank if "digest" in row}
    if len(digests) > 1:
        problems.append("the ranks hold different bits")
        result.status = ERROR if result.status == ERROR else FAIL
    if problems:
        result.message = f"{case.id} (world of {WORLD_SIZE}): " + "; ".join(problems)
    return result


def _spawn_world(backend: str, demote: tuple[str, ...], dtype: torch.dtype, workdir: str) -> str:
    """Run ``WORLD_SIZE`` workers (fresh interpreters, this process's sys.path); '' if all exited 0."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    dtype_name = str(dtype).removeprefix("torch.")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                __name__,
                str(rank),
                backend,
                ",".join(demote),
                dtype_name,
                workdir,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    problems = []
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    for rank, proc in enumerate(procs):
        try:
            _, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
            problems.append(f"rank {rank} did not finish in {WORLD_TIMEOUT_S:.0f} s")
            continue
        if proc.returncode != 0:
            tail = stderr.strip().splitlines()[-1:] or [""]
            problems.append(f"rank {rank} exited with {proc.returncode}: {tail[0]}")
    return "; ".join(problems)


def run_collectives(
    backend: str, demote: tuple[str, ...], dtype: torch.dtype, device_type: str, native
) -> list[CaseResult]:
    """Spawn the world, run ``COLLECTIVE_CASES``, return one result per case (worst rank)."""
    found = _device_count(device_type)
    if found < WORLD_SIZE:
        reason = f"needs {WORLD_SIZE} {device_type} devices on this host, found {found}"
        return [
            CaseResult(
                c.id, c.op, status=SKIP, message=f"{c.id}: skipped: {reason}", native=c.op in native
            )
            for c in COLLECTIVE_CASES
        ]
    with tempfile.TemporaryDirectory(prefix="chitu-collectives-") as workdir:
        crashed = _spawn_world(backend, demote, dtype, workdir)
        per_rank = []
        for rank in range(WORLD_SIZE):
            path = Path(workdir, f"rank{rank}.json")
            rows = json.loads(path.read_text()) if path.exists() else {}
            missing = {"status": ERROR, "message": crashed or f"rank {rank} wrote no results"}
            per_rank.append({c.id: rows.get(c.id, missing) for c in COLLECTIVE_CASES})
    return [_merge(c, [rows[c.id] for rows in per_rank], c.op in native) for c in COLLECTIVE_CASES]


if __name__ == "__main__":  # a rank of the world: python -m conformance.collectives RANK ...
    _rank, _backend, _demote, _dtype, _workdir = sys.argv[1:6]
    _worker(int(_rank), _backend, [op for op in _demote.split(",") if op], _dtype, _workdir)
