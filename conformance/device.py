"""The device's name (a certificate key) and a timer that waits for the device."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Timing budget per measured function: seconds spent, and at most this many calls.
HOST_BUDGET_S, HOST_MAX_CALLS = 0.3, 5
DEVICE_BUDGET_S, DEVICE_MAX_CALLS, DEVICE_WARMUP_CALLS = 0.2, 100, 2


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


def time_call(
    fn: Callable[[], Any],
    sync: Callable[[], None],
    on_host: bool,
    first_s: float | None = None,
) -> float:
    """Median seconds of ``fn()`` after ``sync()``, within a small budget.

    On the host, ``first_s`` (a call already timed, e.g. the correctness run)
    counts as a sample, so a slow real-shape op runs once more at most. On a
    device the first calls are warm-up (kernel compilation, autotuning).
    """
    budget, max_calls = (
        (HOST_BUDGET_S, HOST_MAX_CALLS)
        if on_host
        else (
            DEVICE_BUDGET_S,
            DEVICE_MAX_CALLS,
        )
    )
    samples = [first_s] if (on_host and first_s is not None) else []
    if not on_host:
        for _ in range(DEVICE_WARMUP_CALLS):
            fn()
        sync()
    while not samples or (sum(samples) < budget and len(samples) < max_calls):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
