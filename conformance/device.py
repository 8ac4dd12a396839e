"""The device's name (a certificate key) and timers for the host and for accelerators."""

from __future__ import annotations

import functools
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Host: a call already timed counts; more calls while under the budget, at most this many.
# (0.3 s cost ~10 s of a quick run on 2 cores for little: a shared host's timings are noisy.)
HOST_BUDGET_S, HOST_MAX_CALLS = 0.1, 5
# Accelerators: warm-up calls, then timed calls (device events) within the budget.
DEVICE_WARMUP_CALLS, DEVICE_MIN_CALLS, DEVICE_MAX_CALLS, DEVICE_BUDGET_S = 2, 3, 50, 0.05
# Bytes written before each timed call so no operand is still in the L2 cache (as
# triton.testing.do_bench does): the roofline counts every byte from HBM.
L2_FLUSH_BYTES = 256 << 20


def cpu_name() -> str:
    """The host CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """Marketing name of ``device`` (e.g. "NVIDIA H100 80GB HBM3"), via its torch module."""
    if device.type == "cpu":
        return cpu_name()
    module = getattr(torch, device.type, None)
    get_name = getattr(module, "get_device_name", None)
    if get_name is None:
        return str(device)
    return str(get_name(device))


def _host_time(fn: Callable[[], Any], first_s: float | None) -> float:
    samples = [] if first_s is None else [first_s]
    while not samples or (sum(samples) < HOST_BUDGET_S and len(samples) < HOST_MAX_CALLS):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@functools.cache
def _flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)


def _device_time(fn: Callable[[], Any], device: torch.device, sync: Callable[[], None]) -> float:
    module = getattr(torch, device.type)
    for _ in range(DEVICE_WARMUP_CALLS):  # kernel compilation, autotuning
        fn()
    sync()
    flush = _flush_buffer(device)
    samples: list[float] = []
    while len(samples) < DEVICE_MIN_CALLS or (
        sum(samples) < DEVICE_BUDGET_S and len(samples) < DEVICE_MAX_CALLS
    ):
        start, end = module.Event(enable_timing=True), module.Event(enable_timing=True)
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def time_call(
    fn: Callable[[], Any],
    device: torch.device,
    sync: Callable[[], None],
    first_s: float | None = None,
) -> float:
    """Median seconds of one ``fn()`` on ``device``.

    Host: wall-clock calls within a small budget; ``first_s`` (a call already
    timed, e.g. the correctness run) counts as one, so a slow real-shape op
    runs once more at most. Accelerators: device events around each call
    after warm-up, with the L2 cache flushed before it; where the device
    module has no ``Event``, wall-clock time around a synchronised call.
    """
    if device.type == "cpu":
        return _host_time(fn, first_s)
    if not hasattr(getattr(torch, device.type, None), "Event"):

        def synced() -> None:
            fn()
            sync()

        synced()
        return _host_time(synced, None)
    return _device_time(fn, device, sync)
