"""The pytest plugin: ``pytest -p chitu_conformance --chitu-backend NAME --pyargs conformance``
runs one test per check and fails exactly the broken ones."""

from __future__ import annotations

import os
import subprocess
import sys


def test_pytest_plugin_runs_one_test_per_case(broken_backends_dir, tmp_path):
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "chitu_conformance",
        "--chitu-backend",
        "broken_router",
        "--chitu-ops",
        "moe_route",
        "--chitu-no-model-check",
        "--pyargs",
        "conformance",
        "-q",
        "-rf",
        "-p",
        "no:cacheprovider",
    ]
    env = dict(os.environ, PYTHONPATH=str(broken_backends_dir))
    # Outside the repository: the installed package and its entry points, as a vendor's CI has.
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = {
        line.split("::")[1].split(" ")[0]
        for line in proc.stdout.splitlines()
        if line.startswith("FAILED")
    }
    assert "test_conformance[moe_route[DeepSeek-V3,T=1,E=256,k=8,groups=8/4]]" in failed
    assert not any("softmax" in name for name in failed)  # no correction bias: still right
    assert "passed" in proc.stdout.splitlines()[-1]
