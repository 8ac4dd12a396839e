"""A tiny end-to-end op demo: FP8 block-128 linear on a backend vs the CPU reference."""

from __future__ import annotations

import time

import torch

from chitu_core.backend import load_backend
from chitu_core.quant import quantize_fp8


def run_op_demo(backend: str = "auto", m: int = 4, n: int = 1000, k: int = 700) -> str:
    """Quantize a random ``[n, k]`` weight to FP8 block-128, run ``linear`` on ``m`` tokens
    with ``backend`` and with ``cpu_ref``, and return a short report (error and time)."""
    ops = load_backend(backend)
    ref = load_backend("cpu_ref")
    device = ops.device(0)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=generator) * 0.05
    x = torch.randn(m, k, generator=generator)
    q = quantize_fp8(weight)

    dtype = getattr(torch, ops.info.compute_dtype)
    handle = ops.prepare_weight(q.weight.to(device), q.scale.to(device), q.fmt)
    x_dev = x.to(device=device, dtype=dtype)
    ops.linear(x_dev, handle, None)  # warm-up (kernel compilation, caches)
    ops.synchronize(device)
    start = time.perf_counter()
    y = ops.linear(x_dev, handle, None)
    ops.synchronize(device)
    elapsed_ms = (time.perf_counter() - start) * 1e3

    y_ref = ref.linear(x_dev.float().cpu(), ref.prepare_weight(q.weight, q.scale, q.fmt), None)
    err = (y.float().cpu() - y_ref).norm() / y_ref.norm()
    return (
        f"backend {ops.info.name} on {device}: linear fp8_block128 x[{m}, {k}] @ W[{n}, {k}]^T "
        f"in {elapsed_ms:.3f} ms; relative Frobenius error vs cpu_ref {err:.2e} "
        f"(native ops: {', '.join(sorted(ops.native)) or 'none'})"
    )
