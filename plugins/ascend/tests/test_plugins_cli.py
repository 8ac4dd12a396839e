"""``chitu plugins`` on this machine, WITHOUT the fake torch_npu: ascend is unavailable.

No fake here: the subprocess gets a PYTHONPATH without the fake module, as a
user's shell would. (Where a real torch_npu is installed this test is skipped:
it describes machines without one.)
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from ascend_test_paths import FAKE_DIR


@pytest.mark.skipif(
    importlib.util.find_spec("torch_npu") is not None
    and str(FAKE_DIR) not in str(importlib.util.find_spec("torch_npu").origin),
    reason="a real torch_npu is installed",
)
def test_plugins_reports_ascend_unavailable_without_torch_npu():
    env = dict(os.environ)
    path = [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and "fake_torch_npu" not in p
    ]
    env["PYTHONPATH"] = os.pathsep.join(path)
    proc = subprocess.run(
        [sys.executable, "-m", "chitu_core", "plugins"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("ascend "))
    assert "unavailable: torch_npu is not installed" in row, row
