"""Schemathesis against the server's own OpenAPI schema: zero 5xx, every 4xx in OpenAI's shape."""

from __future__ import annotations

import json

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from serve_helpers import API_KEY, MODEL_NAME

MAX_EXAMPLES = 250  # one request each
SEED = 20261126  # the same cases on every run
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _is_openai_error(response: requests.Response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}


def _in_vocab(prompt):
    """Token ids of a generated prompt folded into the demo vocabulary (512)."""
    if isinstance(prompt, list):
        return [_in_vocab(p) for p in prompt]
    if isinstance(prompt, int) and not isinstance(prompt, bool) and prompt >= 0:
        return prompt % 512
    return prompt


def test_schemathesis_fuzz(key_server) -> None:
    """Positive and negative cases for every operation, against the key-protected server.

    Its context is 64 tokens, so every generation the fuzzer reaches is short. Two thirds of
    the cases get the served model's name (half of those a max_tokens that fits the context),
    so they reach the engine instead of stopping at 404 or 400.
    """
    base_url = key_server.url
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    cases = st.one_of(
        schema.as_strategy(generation_mode=GenerationMode.POSITIVE),
        schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    session = requests.Session()
    sent: list[int] = []
    server_errors: list[str] = []
    bad_shapes: list[str] = []

    @given(case=cases, variant=st.sampled_from(["as-generated", "served-model", "short"]))
    @seed(SEED)
    @settings(
        max_examples=MAX_EXAMPLES,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    def fuzz(case, variant: str) -> None:
        body = case.body
        if variant != "as-generated" and isinstance(body, dict) and "model" in body:
            body["model"] = MODEL_NAME
            if variant == "short":  # fit the context, so the sampling options reach the engine
                for key in ("max_tokens", "max_completion_tokens"):
                    if isinstance(body.get(key), int) and body[key] > 0:
                        body[key] = 1 + body[key] % 8
                if "prompt" in body:
                    body["prompt"] = _in_vocab(body["prompt"])
        response = case.call(base_url=base_url, session=session, headers=HEADERS, timeout=120)
        sent.append(response.status_code)
        what = f"{case.method} {case.path} {json.dumps(case.body, default=repr)[:300]}"
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except (FailureGroup, Exception) as exc:  # record every failure and keep fuzzing
            server_errors.append(f"{response.status_code} {what}: {exc}"[:1000])
        if 400 <= response.status_code < 500 and not _is_openai_error(response):
            bad_shapes.append(f"{response.status_code} {what}: {response.text[:200]}")

    fuzz()
    five_xx = sum(status >= 500 for status in sent)
    by_class = {f"{k}xx": sum(s // 100 == k for s in sent) for k in (2, 4, 5)}
    print(f"\nschemathesis fuzz: {len(sent)} requests sent, {five_xx} 5xx seen ({by_class})")
    assert len(sent) >= 100
    assert five_xx == 0 and not server_errors, "\n".join(server_errors[:10])
    assert not bad_shapes, "\n".join(bad_shapes[:10])
    assert by_class["2xx"] > 0  # some cases really reached the engine

    assert httpx.get(base_url + "/health", timeout=30).status_code == 200
    reply = httpx.post(
        base_url + "/v1/completions",
        headers=HEADERS,
        json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
