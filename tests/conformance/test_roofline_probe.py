"""The roofline probe measures only the dtypes a run needs, sized and capped for the device."""

from __future__ import annotations

import time

import torch

from conformance.roofline import MATMUL_BUDGET_S, measure, probe_dtypes


def test_only_the_compute_dtype_and_fp32_are_probed():
    assert probe_dtypes(torch.float32) == (torch.float32,)
    assert probe_dtypes(torch.bfloat16) == (torch.bfloat16, torch.float32)
    assert torch.float16 not in probe_dtypes(torch.bfloat16)


def test_the_host_probe_is_capped_in_time():
    start = time.perf_counter()
    spec = measure.__wrapped__(torch.device("cpu"), "host", (torch.float32,))
    elapsed = time.perf_counter() - start
    assert set(spec.flops) == {"float32"} and spec.flops["float32"] > 1e8
    assert spec.bandwidth > 1e8
    # The copy probes take well under a second; each matmul dtype stops within its budget
    # (the last size may overrun it once, by the estimate the doubling rule allows).
    assert elapsed < 3 * MATMUL_BUDGET_S + 5, elapsed
