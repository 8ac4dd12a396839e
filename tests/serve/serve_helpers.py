"""Helpers of the server tests: start/stop a real ``chitu serve`` process, read /metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

MODEL_NAME = "tiny-dsv3"  # the model directory's name: the served model id by default
API_KEY = "test-secret-key"
NUM_BLOCKS = 1024  # x 16 tokens: far more than the tests ever hold at once
START_TIMEOUT_S = 240.0  # a loaded 2-core CI machine imports torch slowly
STOP_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """One ``python -m chitu_core serve`` subprocess."""

    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then wait; returns the exit code (kills and fails if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"server did not exit within {timeout}s of SIGTERM\n{self.log()[-4000:]}")


def start_server(model_dir: Path, log_dir: Path, *extra: str) -> ServerProcess:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "chitu_core",
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--skip-conformance",
        "--num-blocks",
        str(NUM_BLOCKS),
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} at startup\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    proc.wait()
    pytest.fail(f"server not healthy within {START_TIMEOUT_S}s\n{server.log()[-4000:]}")


def stop_cleanly(server: ServerProcess) -> None:
    rc = server.stop()
    log = server.log()
    assert rc == 0, f"server exited with {rc} after SIGTERM\n{log[-4000:]}"
    assert "Traceback" not in log, f"the server logged a traceback\n{log[-6000:]}"


def metric(base_url: str, name: str) -> float:
    """The value of an unlabelled Prometheus sample from /metrics."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def wait_idle(base_url: str, timeout: float = 60.0) -> tuple[float, float, float]:
    """Poll /metrics until no KV block is used and no sequence runs or waits; returns the
    last (kv blocks used, running, waiting) seen."""
    deadline = time.monotonic() + timeout
    while True:
        values = tuple(
            metric(base_url, name)
            for name in (
                "chitu_kv_blocks_used",
                "chitu_num_requests_running",
                "chitu_num_requests_waiting",
            )
        )
        if values == (0, 0, 0) or time.monotonic() > deadline:
            return values
        time.sleep(0.2)
