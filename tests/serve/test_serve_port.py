"""``chitu serve`` takes its port before anything else: a port in use fails at once."""

from __future__ import annotations

import socket
import subprocess
import sys

from serve_helpers import MODEL_NAME, REPO


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


def test_the_server_says_once_where_it_serves_at_the_default_log_level(server) -> None:
    """One line, at the CLI's default (WARNING) level, once requests are accepted."""
    port = server.url.rsplit(":", 1)[1]
    lines = [line for line in server.log().splitlines() if line.startswith("chitu: serving")]
    assert lines == [
        f"chitu: serving {MODEL_NAME} on http://127.0.0.1:{port}/v1 "
        "(backend cpu, FP8 weights, bf16)"
    ], server.log()[-3000:]
