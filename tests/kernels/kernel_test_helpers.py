"""What the Triton kernel tests share: targets, and running a case script in a subprocess.

Interpreter cases run in their own process because ``TRITON_INTERPRET=1`` must be set
before triton is imported and must not leak into the compile tests of the same run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from triton.backends.compiler import GPUTarget

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA_TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 86, 32), GPUTarget("cuda", 90, 32)]
# Largest shared memory a program may use (opt-in): A100, RTX 30xx/A10, L4/RTX 40xx, H100/H200.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def case_env(device: str, **extra: str) -> dict[str, str]:
    """The environment of a case process: the interpreter on for ``device == "cpu"``,
    off otherwise, this checkout importable, plus ``extra``."""
    env = dict(os.environ, **extra)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def case_command(script: str, device: str, cases: list[str]) -> list[str]:
    return [sys.executable, str(HERE / script), "--device", device, *cases]


def run_cases(script: str, device: str, *cases: str, **extra_env: str) -> None:
    """Run ``script --device DEVICE CASE...`` and fail with its output unless it exits 0."""
    proc = subprocess.run(
        case_command(script, device, list(cases)),
        env=case_env(device, **extra_env), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def start_cases(script: str, device: str, *cases: str) -> subprocess.Popen:
    """Start ``script`` in the background (cases of several tests run side by side)."""
    return subprocess.Popen(
        case_command(script, device, list(cases)), env=case_env(device),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish_cases(proc: subprocess.Popen, timeout: float = 600) -> None:
    """Wait for a ``start_cases`` process; fail with its output unless it exits 0."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == 0, out
