"""Many clients at once: 32 concurrent streams give the answers ``chitu generate`` gives, and 50
clients that drop their streams free every KV block."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time

import httpx
import openai
import pytest
from serve_helpers import MODEL_NAME, REPO, wait_idle

from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.engine.sampling import SamplingParams

NUM_CLIENTS = 32
MAX_TOKENS = 10
PROMPTS = [f"Client {i} asks: what is {i} times {i + 3}?" for i in range(NUM_CLIENTS)]
CLI_PROMPTS = (0, 17)  # also checked against a real `chitu generate` process


def _chitu_generate(model_dir, prompt: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "chitu_core", "generate", "--model", str(model_dir)]
    cmd += ["--prompt", prompt, "--chat", "--max-tokens", str(MAX_TOKENS), "--num-blocks", "64"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def expected(model_dir) -> list[tuple[str, str]]:
    """(text, finish_reason) of each prompt from the engine itself, greedy."""
    engine = LLMEngine(EngineConfig(model=model_dir, num_blocks=256, show_progress=False))
    chats = [engine.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    done = engine.generate(chats, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return [(c.text, c.finish_reason) for c in done]


async def _stream_one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None, int]:
    stream = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, completion_tokens = [], None, -1
    async for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
    return "".join(parts), finish, completion_tokens


def test_32_concurrent_streams_match_chitu_generate(base_url, model_dir, expected) -> None:
    cli = {i: _chitu_generate(model_dir, PROMPTS[i]) for i in CLI_PROMPTS}  # run meanwhile

    async def main():
        async with openai.AsyncOpenAI(
            base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300
        ) as client:
            return await asyncio.gather(*(_stream_one(client, p) for p in PROMPTS))

    started = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - started
    print(f"\n{NUM_CLIENTS} concurrent streams of {MAX_TOKENS} tokens: {elapsed:.1f}s")
    for i, ((text, finish, n_tokens), (want_text, want_finish)) in enumerate(
        zip(results, expected, strict=True)
    ):
        assert (text, finish) == (want_text, want_finish), f"client {i}"
        assert finish == "stop" or n_tokens == MAX_TOKENS, f"client {i}: incomplete"
    for i, proc in cli.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode(errors="replace")
        assert out.decode("utf-8") == expected[i][0] + "\n", f"`chitu generate` for prompt {i}"


def test_50_dropped_streams_free_every_kv_block(base_url) -> None:
    url = base_url + "/v1/chat/completions"
    rng = random.Random(0)
    assert wait_idle(base_url) == (0, 0, 0)  # idle before
    peak = {"kv_used": 0.0, "running": 0.0}

    async def client(i: int) -> str:
        body = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": f"Dropping client {i}, tell me a story."}],
            "max_tokens": 2000,  # runs for minutes unless the drop aborts it
            "ignore_eos": True,
            "stream": True,
        }
        if i % 2:
            body["stream_options"] = {"include_usage": True}
        drop_after = rng.randint(0, 12)  # data lines read before dropping (0: right after headers)
        async with httpx.AsyncClient(timeout=120) as http:
            async with http.stream("POST", url, json=body) as response:
                assert response.status_code == 200
                seen = 0
                lines = response.aiter_lines()
                while seen < drop_after:  # drop_after == 0: gone as soon as the headers came
                    line = await anext(lines)
                    if line.startswith("data: "):
                        assert line != "data: [DONE]"
                        seen += 1
                await lines.aclose()
        return "dropped"

    async def cancelled_early(i: int) -> None:
        """A client killed at a random moment (connecting, waiting, or mid-stream)."""
        task = asyncio.create_task(client(i))
        await asyncio.sleep(rng.uniform(0.0, 1.5))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def watch(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            while not stop.is_set():
                text = (await http.get(base_url + "/metrics")).text
                for line in text.splitlines():
                    for key, name in (
                        ("kv_used", "chitu_kv_blocks_used "),
                        ("running", "chitu_num_requests_running "),
                    ):
                        if line.startswith(name):
                            peak[key] = max(peak[key], float(line.split()[1]))
                await asyncio.sleep(0.05)

    async def main():
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        jobs = [client(i) if i % 3 else cancelled_early(i) for i in range(50)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        stop.set()
        await watcher
        return results

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert peak["kv_used"] > 0 and peak["running"] > 0, peak  # the streams really held blocks

    assert wait_idle(base_url, timeout=20) == (0, 0, 0), "aborted streams kept their KV blocks"
    print(f"\ndisconnect test: peak {peak['kv_used']:.0f} KV blocks used, back to 0")

    reply = httpx.post(
        url,
        json={
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "still there?"}],
            "max_tokens": 4,
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1


def test_non_streaming_clients_that_time_out_free_their_blocks(base_url) -> None:
    """A client that gives up on a long non-streamed answer must not leave it generating."""
    url = base_url + "/v1/completions"
    body = {"model": MODEL_NAME, "prompt": "a long one", "max_tokens": 2000, "ignore_eos": True}

    async def impatient(i: int) -> None:
        async with httpx.AsyncClient(timeout=0.5 + 0.1 * i) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(url, json=body | {"n": 1 + i % 2})

    async def main():
        await asyncio.gather(*(impatient(i) for i in range(10)))

    asyncio.run(main())
    assert wait_idle(base_url, timeout=20) == (0, 0, 0), "timed-out requests kept generating"
