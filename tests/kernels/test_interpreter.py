"""Soft-FP8 kernel numerics on the CPU through Triton's interpreter (TRITON_INTERPRET=1).

Each case runs in its own subprocess: the interpreter must be switched on
before the kernels are defined, and must not leak into compiled-kernel tests
of the same pytest run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CASES = ["widen_all_codes", "gemm_all_codes", "gemv_all_codes", "gemm_shapes", "subnormal_heavy"]


@pytest.mark.parametrize("case", CASES)
def test_case_under_interpreter(case):
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(HERE / "interp_cases.py"), case],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
