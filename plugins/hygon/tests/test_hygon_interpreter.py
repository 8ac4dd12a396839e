"""The Hygon linear path's numerics on the CPU through Triton's interpreter (TRITON_INTERPRET=1).

Each case of ``hygon_interp_cases.py`` runs in its own subprocess: the
interpreter must be on before the kernels are defined and must not leak into
the compiled-kernel tests of the same pytest run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


@pytest.mark.parametrize("case", ["configs", "hooks"])
def test_linear_under_interpreter_matches_cpu_ref(case):
    env = dict(os.environ, TRITON_INTERPRET="1")
    paths = (str(ROOT), str(HERE.parent), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    proc = subprocess.run(
        [sys.executable, str(HERE / "hygon_interp_cases.py"), case],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
