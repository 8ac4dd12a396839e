"""``chitu serve`` takes its port before anything else: a port in use fails at once."""

from __future__ import annotations

import socket
import subprocess
import sys

from serve_helpers import REPO


def test_a_port_in_use_fails_before_the_model_loads() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "chitu_core", "serve", "--backend", "cpu_ref",
             "--port", str(port), "--skip-conformance"],
            capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"chitu: error: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "loading weights" not in done.stderr  # nothing was loaded first
