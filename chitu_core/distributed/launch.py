"""Starting the ranks of a TP x PP run, and taking them all down when one dies.

``run_ranks(config, driver)`` is what ``chitu serve`` and ``chitu generate``
call; ``driver`` is the rank-0 work (serve HTTP, complete a prompt):

* one process (``tp * pp == 1``, no torchrun): just ``driver()``;
* under torchrun (``RANK``, ``WORLD_SIZE``... set; one node or many): rank 0
  runs ``driver()``, the others build their engine shard and follow rank 0.
  torchrun's agent stops every rank when one fails;
* ``chitu serve --tp 2`` without torchrun: this process becomes rank 0 and
  spawns ranks ``1..N-1`` on this node by re-running the same command line
  with torchrun's environment variables. A watchdog thread takes the server
  down (clear message on stderr, exit status 1) as soon as a rank exits; a
  spawned rank exits when its parent does.

A rank that dies mid-step is also caught by the collectives themselves: each
group fails after ``--dist-timeout`` seconds instead of hanging, and rank 0's
heartbeat finds a rank that died while the server was idle.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from chitu_core.distributed import DistributedError
from chitu_core.distributed.parallel import launched_as_rank, shutdown

logger = logging.getLogger(__name__)

PARENT_PID_ENV = "CHITU_PARENT_PID"  # set in ranks this module spawned
EXIT_RANK_DIED = 1
STOP_TIMEOUT_S = 30.0  # how long ranks may take to exit after rank 0's STOP
_POLL_S = 0.2
# fatal(): how long a failed collective waits for the rank that died to be seen dead.
_DEAD_RANK_WAIT_S = 1.0
_children: list[tuple[int, subprocess.Popen]] = []  # (rank, process) spawned by this process


def run_ranks(config: Any, driver: Callable[[], int], argv: list[str] | None = None) -> int:
    """Run ``driver`` as rank 0 of ``config.tp * config.pp`` ranks (see the module docstring).

    ``argv``: the command line a spawned rank runs (default: this process's own,
    ``sys.orig_argv``). Returns ``driver()``'s exit status on rank 0, 0 on the others.
    """
    world = config.tp * config.pp
    if launched_as_rank():
        rank = int(os.environ["RANK"])
        try:
            if rank == 0:
                return driver()
            if PARENT_PID_ENV in os.environ:
                _exit_with_parent(int(os.environ[PARENT_PID_ENV]), rank)
            return follow(config)
        finally:
            shutdown()
    if world == 1:
        return driver()
    return _spawn_and_drive(config, driver, argv or sys.orig_argv[1:])


def follow(config: Any) -> int:
    """A rank other than 0: build this rank's engine shard and run rank 0's steps until stop."""
    from chitu_core.engine.llm_engine import LLMEngine

    with LLMEngine(config) as engine:
        engine.follow()
    return 0


def fatal(message: str) -> None:
    """Take this process, and every rank it spawned, down now with ``message`` on stderr.

    A spawned rank that has died is named in the message: a failed collective is often
    the first sign of it, before the watchdog's next poll."""
    message = with_dead_ranks(message)
    print(f"chitu: error: {message}; stopping every rank", file=sys.stderr, flush=True)
    logger.critical("%s", message)
    _terminate(_children, grace_s=2.0)
    os._exit(EXIT_RANK_DIED)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_and_drive(config: Any, driver: Callable[[], int], argv: list[str]) -> int:
    world = config.tp * config.pp
    threads = max(1, (os.cpu_count() or 1) // world)  # ranks share this host's cores
    common = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        PARENT_PID_ENV: str(os.getpid()),
    }
    child_env = {**os.environ, **common}
    child_env.setdefault("OMP_NUM_THREADS", str(threads))
    logger.info(
        "spawning ranks 1..%d of --tp %d --pp %d on this host", world - 1, config.tp, config.pp
    )
    for rank in range(1, world):
        env = {**child_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        proc = subprocess.Popen([sys.executable, *argv], env=env)
        logger.info("rank %d: pid %d", rank, proc.pid)
        _children.append((rank, proc))
    saved = {name: os.environ.get(name) for name in (*common, "RANK", "LOCAL_RANK")}
    os.environ.update({**common, "RANK": "0", "LOCAL_RANK": "0"})
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(threads)
    done = threading.Event()
    watchdog = threading.Thread(
        target=_watch, args=(done,), name="chitu-rank-watchdog", daemon=True
    )
    watchdog.start()
    finished = False
    try:
        status = driver()
        finished = True
        return status
    finally:
        done.set()
        watchdog.join()
        shutdown()
        if finished:  # the driver closed its engine: the ranks got STOP and are exiting
            logger.info("waiting for ranks 1..%d to exit", len(_children))
            _reap(_children, timeout_s=STOP_TIMEOUT_S)
            logger.info("every rank has exited")
        else:  # rank 0 failed: the others would wait for it until their timeout
            _terminate(_children, grace_s=2.0)
        _children.clear()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def with_dead_ranks(message: str, wait_s: float = _DEAD_RANK_WAIT_S) -> str:
    """``message`` plus the spawned ranks that have died and it does not name yet."""
    dead = _dead_ranks(wait_s) if _children else []
    missing = [d for d in dead if d not in message]
    return f"{message}; {', '.join(missing)}" if missing else message


def _dead_ranks(wait_s: float = 0.0) -> list[str]:
    """``"rank R (pid P) was killed by signal S"`` (or ``exited with status S``) for each
    spawned rank that ended with a failure; waits up to ``wait_s`` for a first one."""
    deadline = time.monotonic() + wait_s
    while True:
        dead = []
        for rank, proc in _children:
            status = proc.poll()
            if status not in (None, 0):
                how = (
                    f"was killed by signal {-status}"
                    if status < 0
                    else f"exited with status {status}"
                )
                dead.append(f"rank {rank} (pid {proc.pid}) {how}")
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)


def _watch(done: threading.Event) -> None:
    """Rank 0 of a spawned run: a rank that fails takes everything down (a rank exits with
    status 0 only after rank 0's STOP)."""
    while not done.wait(_POLL_S):
        dead = _dead_ranks()
        if dead and not done.is_set():
            fatal(dead[0])


def _exit_with_parent(parent_pid: int, rank: int) -> None:
    """A spawned rank: leave Ctrl-C to rank 0 (which stops us cleanly) and exit if it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        print(
            f"chitu: error: rank {rank}: rank 0 (pid {parent_pid}) is gone; exiting",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_RANK_DIED)

    threading.Thread(target=watch, name="chitu-parent-watch", daemon=True).start()


def _reap(children: list[tuple[int, subprocess.Popen]], timeout_s: float) -> None:
    """Wait for ranks released by ``STOP``; stop those that do not exit in time."""
    deadline = time.monotonic() + timeout_s
    for rank, proc in children:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("rank %d (pid %d) did not exit; terminating it", rank, proc.pid)
    _terminate(children, grace_s=2.0)


def _terminate(children: list[tuple[int, subprocess.Popen]], grace_s: float) -> None:
    alive = [proc for _, proc in children if proc.poll() is None]
    for proc in alive:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in alive:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


__all__ = ["DistributedError", "fatal", "follow", "run_ranks"]
