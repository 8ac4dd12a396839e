"""The official ``openai`` client against ``chitu serve``: chat, completions, streaming, usage,
stop, n, seed, max_tokens, logprobs and /v1/models."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import MODEL_NAME

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].object == "model"


def test_chat_usage_counts_the_rendered_template(client, tokenizer) -> None:
    reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY)
    assert reply.object == "chat.completion"
    assert reply.model == MODEL_NAME
    [choice] = reply.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(tokenizer.encode_chat(MESSAGES))
    assert 1 <= reply.usage.completion_tokens <= GREEDY["max_tokens"]
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == GREEDY["max_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_usage_and_max_tokens_length(client, tokenizer) -> None:
    prompt = "The quick brown fox"
    reply = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.object == "text_completion"
    [choice] = reply.choices
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert reply.usage.completion_tokens == 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5


def test_max_completion_tokens_gives_length(client) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_greedy_is_deterministic(client) -> None:
    first = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY)
    second = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY)
    assert first.choices[0].message.content == second.choices[0].message.content


def test_chat_stream_equals_non_streamed(client) -> None:
    whole = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, stream=True, **GREEDY
    )
    chunks = list(stream)  # the client consumes "data: [DONE]" itself
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage anywhere


def test_chat_stream_include_usage(client) -> None:
    whole = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    *body, last = chunks
    assert last.choices == []  # OpenAI: the usage chunk comes last, with no choices
    assert last.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in body)


def test_completion_stream_equals_non_streamed(client) -> None:
    kwargs = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=10, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == (
        whole.choices[0].finish_reason
    )
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def _first_printable(text: str, start: int = 1) -> str | None:
    for ch in text[start:]:
        if ch.isascii() and ch.isprintable() and not ch.isspace():
            return ch
    return None


def test_stop_string(client) -> None:
    kwargs = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=16, temperature=0)
    full = client.completions.create(extra_body={"ignore_eos": True}, **kwargs).choices[0].text
    stop = _first_printable(full)
    assert stop is not None, f"no printable character in {full!r}"
    reply = client.completions.create(stop=[stop], extra_body={"ignore_eos": True}, **kwargs)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[: full.index(stop)]  # OpenAI leaves the stop string out
    streamed = client.completions.create(
        stream=True, stop=stop, extra_body={"ignore_eos": True}, **kwargs
    )
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_2(client) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, n=2, temperature=1.0, seed=7, max_tokens=8
    )
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    texts = [c.message.content for c in reply.choices]
    assert texts[0] != texts[1]  # each choice samples on its own
    # streamed: both indices appear and each finishes once
    chunks = [
        c
        for c in client.completions.create(
            model=MODEL_NAME, prompt="abc", n=2, max_tokens=4, stream=True, temperature=1.0, seed=3
        )
        if c.choices
    ]
    assert {c.choices[0].index for c in chunks} == {0, 1}
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason) == [0, 1]


def test_seed_reproducibility(client) -> None:
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            temperature=1.0,
            seed=seed,
            max_tokens=16,
            extra_body={"ignore_eos": True},
        )
        return reply.choices[0].message.content

    seeds = [1234, 1234, 1, 2, 3]
    with ThreadPoolExecutor(len(seeds)) as pool:  # batched together: seeds must not interfere
        first, again, *others = pool.map(sample, seeds)
    assert again == first
    assert sample(1234) == first  # alone, too
    assert len(set(others) | {first}) >= 3  # 16 tokens sampled from 512: collisions negligible


def test_chat_logprobs(client) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        logprobs=True,
        top_logprobs=3,
        temperature=0,
        max_tokens=6,
        extra_body={"ignore_eos": True},
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(values[0])  # greedy picks the most likely
        assert isinstance(entry.bytes, list)
    plain = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs(client) -> None:
    reply = client.completions.create(
        model=MODEL_NAME,
        prompt="Hello",
        logprobs=2,
        temperature=0,
        max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert len(lp.text_offset) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    # a dict keyed by token text: two tokens that decode alike (e.g. two partial UTF-8 bytes) share a key
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == reply.choices[0].text or "\ufffd" in reply.choices[0].text


def test_completion_prompt_as_token_ids_and_batch(client, tokenizer) -> None:
    ids = tokenizer.encode("Hello world")
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(
        model=MODEL_NAME, prompt="Hello world", max_tokens=6, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(
        model=MODEL_NAME, prompt=["Hello world", "Goodbye"], max_tokens=6, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text


def test_sse_wire_format(base_url) -> None:
    """The bytes OpenAI sends: ``data: {json}`` events, each ending in a blank line, then
    ``data: [DONE]``."""
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
