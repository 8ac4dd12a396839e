"""Soft-FP8 kernel numerics on the CPU through Triton's interpreter (TRITON_INTERPRET=1).

Each case runs in its own subprocess: the interpreter must be switched on
before the kernels are defined, and must not leak into compiled-kernel tests
of the same pytest run.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
from kernel_test_helpers import run_cases  # noqa: E402

CASES = [
    "widen_all_codes",
    "gemm_all_codes",
    "gemv_all_codes",
    "gemm_shapes",
    "subnormal_heavy",
    "wide_scale_fold",
    "gemm_fp16_activations",
]


@pytest.mark.parametrize("case", CASES)
def test_case_under_interpreter(case):
    run_cases("interp_cases.py", "cpu", case)
