"""The prefix cache through the real server: a repeated prompt is counted as hits."""

from __future__ import annotations

import time

import httpx
from serve_helpers import MODEL_NAME, metric

QUERIES, HITS = "chitu_prefix_cache_queries_total", "chitu_prefix_cache_hits_total"
BLOCK_SIZE = 16  # the server's default --block-size


def _counters(base_url: str) -> tuple[float, float]:
    return metric(base_url, QUERIES), metric(base_url, HITS)


def test_repeated_prompt_is_counted_as_prefix_cache_hits(base_url: str, tokenizer) -> None:
    prompt = "You are a terse assistant who answers in one word. " * 2 + "Question: "
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    queries_before, hits_before = _counters(base_url)
    replies = []
    for question in ("sky?", "sea?"):
        reply = httpx.post(
            base_url + "/v1/completions", json={**body, "prompt": prompt + question}, timeout=60
        )
        assert reply.status_code == 200, reply.text
        replies.append(reply.json())
    num_prompt = [r["usage"]["prompt_tokens"] for r in replies]
    # Both share the prompt's leading whole blocks; the second finds them cached.
    first, second = (tokenizer.encode(prompt + q) for q in ("sky?", "sea?"))
    assert [len(first), len(second)] == num_prompt
    num_common = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    expected_hits = (num_common // BLOCK_SIZE) * BLOCK_SIZE
    assert expected_hits >= 3 * BLOCK_SIZE
    deadline = time.monotonic() + 30
    while True:  # the engine thread publishes its totals between steps
        queries, hits = _counters(base_url)
        if queries - queries_before >= sum(num_prompt) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert queries - queries_before == sum(num_prompt)
    # Other tests' requests may share a block or two with these; nothing else runs now.
    assert expected_hits <= hits - hits_before <= expected_hits + BLOCK_SIZE
