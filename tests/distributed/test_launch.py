"""``chitu generate --tp 2`` and ``chitu serve --tp 2`` spawn their ranks; a dead or stalled
rank takes the server down with a clear error in bounded time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from dist_helpers import REPO, free_port
from parity_worker import engine_config

from chitu_core.engine.llm_engine import LLMEngine
from chitu_core.engine.sampling import SamplingParams

openai = pytest.importorskip("openai", reason="the server test drives the official OpenAI client")

START_TIMEOUT_S = 180.0
DIST_TIMEOUT_S = 8.0  # how long a collective waits for a stalled rank
EXIT_TIMEOUT_S = 30.0  # bound on "no hang" (timeout + heartbeat period + exit)
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
MAX_TOKENS = 6


def _chitu(*args: str) -> list[str]:
    return [sys.executable, "-m", "chitu_core", *args]


def _children(pid: int) -> list[int]:
    """Pids of ``pid``'s child processes (the spawned ranks)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("needs Linux /proc/<pid>/task/<pid>/children")
    return [int(p) for p in path.read_text().split()]


def _one_process_text(model: Path, prompt: str | list[int]) -> str:
    with LLMEngine(engine_config(model)) as engine:
        if not isinstance(prompt, str):
            prompt = engine.tokenizer.encode_chat(prompt)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
        return engine.generate([prompt], params)[0].text


def test_generate_tp2_spawns_ranks_and_matches_one_process(llama_dir: Path) -> None:
    cmd = _chitu(
        "generate", "--model", str(llama_dir), "--backend", "cpu_ref", "--prompt", "hello world",
        "--max-tokens", str(MAX_TOKENS), "--num-blocks", "32", "--tp", "2",
    )  # fmt: skip
    done = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.removesuffix("\n") == _one_process_text(llama_dir, "hello world")


class _Server:
    def __init__(self, model: Path, log_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        cmd = _chitu(
            "serve", str(model), "--backend", "cpu_ref", "--port", str(self.port),
            "--num-blocks", "32", "--dist-timeout", str(DIST_TIMEOUT_S), *extra,
        )  # fmt: skip
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        pytest.fail(f"server not healthy within {START_TIMEOUT_S}s\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"server still up {timeout}s after its rank failed\n{self.log()}")

    def kill(self) -> None:
        for pid in _children(self.proc.pid) if self.proc.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()


def test_serve_tp2_answers_openai_then_dies_with_a_killed_rank(
    deepseek_dir: Path, tmp_path: Path
) -> None:
    server = _Server(deepseek_dir, tmp_path / "server.log", "--tp", "2")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=deepseek_dir.name, messages=MESSAGES, temperature=0.0, max_tokens=MAX_TOKENS
        )
        assert reply.choices[0].message.content == _one_process_text(deepseek_dir, MESSAGES)
        [rank1] = _children(server.proc.pid)
        os.kill(rank1, signal.SIGKILL)
        started = time.monotonic()
        status = server.wait_exit(EXIT_TIMEOUT_S)
        print(f"server exited {time.monotonic() - started:.1f}s after rank 1 was killed")
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert status == 1
    assert f"rank 1 (pid {rank1}) was killed by signal 9" in server.log()


def test_serve_pp2_answers_then_a_stalled_rank_fails_within_the_collective_timeout(
    llama_dir: Path, tmp_path: Path
) -> None:
    """Under PP=2 the server answers; then a rank that hangs (SIGSTOP) is found by the
    collective timeout: the request fails and the server exits, within EXIT_TIMEOUT_S."""
    server = _Server(llama_dir, tmp_path / "server.log", "--pp", "2")
    [rank1] = _children(server.proc.pid)
    try:
        client = openai.OpenAI(
            base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=EXIT_TIMEOUT_S
        )
        reply = client.completions.create(
            model=llama_dir.name, prompt="hello world", max_tokens=MAX_TOKENS, temperature=0.0
        )
        assert reply.choices[0].text == _one_process_text(llama_dir, "hello world")
        os.kill(rank1, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(openai.APIError):
            client.completions.create(model=llama_dir.name, prompt="hi", max_tokens=MAX_TOKENS)
        status = server.wait_exit(EXIT_TIMEOUT_S)
        print(f"server exited {time.monotonic() - started:.1f}s after rank 1 stalled")
    finally:
        if _alive(rank1):
            os.kill(rank1, signal.SIGKILL)
        if server.proc.poll() is None:
            server.kill()
    assert status == 1
    assert "the server cannot go on" in server.log()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_failed_collective_names_the_rank_that_died(monkeypatch) -> None:
    """When a collective fails before the watchdog's poll sees the dead rank (a race under
    load), the fatal message still says which rank died and how, once."""
    from chitu_core.distributed import launch

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monkeypatch.setattr(launch, "_children", [(1, child)])
        assert launch.with_dead_ranks("a collective failed", wait_s=0.0) == "a collective failed"
        child.send_signal(signal.SIGKILL)
        named = launch.with_dead_ranks("a collective failed", wait_s=5.0)
        assert named == f"a collective failed; rank 1 (pid {child.pid}) was killed by signal 9"
        assert launch.with_dead_ranks(named, wait_s=0.0) == named  # not named twice
    finally:
        child.kill()
        child.wait()
