"""A backend exception inside a step, and SIGTERM during a stream.

The fault test runs the app in this process (uvicorn in a thread) around a real engine whose
``runner.execute`` raises for a marked prompt; the shutdown test uses a real server process.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from serve_helpers import MODEL_NAME, free_port, metric, start_server

from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.serve.app import ServerSettings, create_app
from chitu_core.serve.async_engine import AsyncEngine
from chitu_core.serve.metrics import ServerMetrics

MARKER = [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 42]  # prompt (token ids) whose third step fails
FAIL_AT_STEP = 3  # after two tokens went out
# prompt whose first step from the second on that has another request waiting fails
MARKER_WHEN_QUEUED = [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 43]


@pytest.fixture(scope="module")
def faulty(model_dir):
    """(base URL, fault log) of an in-process server whose backend fails marked prompts."""
    engine = LLMEngine(
        EngineConfig(
            model=model_dir,
            backend="cpu_ref",
            num_blocks=128,
            max_num_seqs=1,  # one sequence per step: a request that arrives meanwhile waits
            show_progress=False,
        )
    )
    real_execute = engine.runner.execute
    steps: dict[int, int] = {}
    faults: list[int] = []

    def execute(seqs, num_new_tokens, *args):
        for seq in seqs:
            if seq.prompt_token_ids in (MARKER, MARKER_WHEN_QUEUED):
                step = steps[seq.seq_id] = steps.get(seq.seq_id, 0) + 1
                if (seq.prompt_token_ids == MARKER and step == FAIL_AT_STEP) or (
                    seq.prompt_token_ids == MARKER_WHEN_QUEUED
                    and step >= 2
                    and engine.scheduler.num_waiting > 0
                ):
                    faults.append(seq.seq_id)
                    raise RuntimeError("injected backend fault")
        return real_execute(seqs, num_new_tokens, *args)

    engine.runner.execute = execute
    metrics = ServerMetrics()
    app = create_app(AsyncEngine(engine, metrics), ServerSettings(MODEL_NAME), metrics)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-faulty", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "in-process server did not start"
    yield f"http://127.0.0.1:{port}", faults
    server.should_exit = True
    thread.join(30)
    assert not thread.is_alive(), "in-process server did not stop"


def _marked(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": MARKER, "max_tokens": 8, "ignore_eos": True} | fields


def test_step_fault_fails_that_request_with_500(faulty) -> None:
    url, faults = faulty
    before = len(faults)
    response = httpx.post(url + "/v1/completions", json=_marked(), timeout=120)
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "internal_server_error" and error["code"] == "engine_error"
    assert "injected backend fault" in error["message"]
    assert len(faults) == before + 1
    # the server goes on: the next request is served, and nothing leaked
    ok = httpx.post(
        url + "/v1/completions",
        json={"model": MODEL_NAME, "prompt": "after the fault", "max_tokens": 4},
        timeout=120,
    )
    assert ok.status_code == 200, ok.text
    assert metric(url, "chitu_engine_step_errors_total") >= 1


def test_step_fault_mid_stream_and_a_queued_request_succeeds(faulty) -> None:
    url, faults = faulty
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    innocent = {"model": MODEL_NAME, "prompt": "a bystander", "max_tokens": 6, "temperature": 0}
    expected = httpx.post(url + "/v1/completions", json=innocent, timeout=120).json()
    before = len(faults)

    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=MARKER_WHEN_QUEUED,
        max_tokens=200,  # fails as soon as the next request waits behind it
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = next(chunks)  # the marked sequence runs; max_num_seqs=1: the next request waits
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(httpx.post, url + "/v1/completions", json=innocent, timeout=120)
        received = [first]
        with pytest.raises(openai.APIError, match="injected backend fault"):
            for chunk in chunks:  # the SSE error event makes the client raise
                received.append(chunk)
        response = queued.result()
    assert len(faults) == before + 1
    assert all(c.choices[0].finish_reason is None for c in received)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == expected["choices"][0]["text"]

    deadline = time.monotonic() + 30
    while metric(url, "chitu_kv_blocks_used") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(url, "chitu_kv_blocks_used") == 0  # the failed sequence freed its blocks
    assert httpx.get(url + "/health", timeout=30).status_code == 200


def test_sigterm_during_stream_finishes_it_and_exits_0(model_dir, tmp_path) -> None:
    server = start_server(model_dir, tmp_path)
    try:
        body = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "a story, please"}],
            "max_tokens": 24,
            "ignore_eos": True,
            "stream": True,
        }
        lines: list[str] = []
        with httpx.stream(
            "POST", server.url + "/v1/chat/completions", json=body, timeout=120
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                lines.append(line)
                if len(lines) == 2:  # mid-stream
                    server.proc.send_signal(signal.SIGTERM)
        rc = server.proc.wait(60)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    # In flight at SIGTERM: the graceful shutdown let it finish (or it ended cleanly).
    assert rc == 0, server.log()[-4000:]
    assert "Traceback" not in server.log(), server.log()[-4000:]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert '"finish_reason": "length"' in lines[-2]
    with pytest.raises(httpx.ConnectError):  # and nothing listens any more
        httpx.get(server.url + "/health", timeout=5)
