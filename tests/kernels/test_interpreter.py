"""Soft-FP8 kernel numerics on the CPU through Triton's interpreter (TRITON_INTERPRET=1).

Each case runs in its own subprocess: the interpreter must be switched on
before the kernels are defined, and must not leak into compiled-kernel tests
of the same pytest run.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
from interp_cases import CASES  # noqa: E402 - only the case names are used here
from kernel_test_helpers import run_cases  # noqa: E402


@pytest.mark.parametrize("case", list(CASES))
def test_case_under_interpreter(case):
    run_cases("interp_cases.py", "cpu", case)
