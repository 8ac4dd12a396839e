"""Schemathesis against the server's own OpenAPI schema: zero 5xx, every 4xx in OpenAI's shape."""

from __future__ import annotations

import json

import httpx
import pytest
import requests
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from serve_helpers import API_KEY, MODEL_NAME

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

MAX_EXAMPLES = 250  # one request each: bounded and (derandomized) the same on every run
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _is_openai_error(response: requests.Response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}


def test_schemathesis_fuzz(key_server) -> None:
    """Positive and negative cases for every operation, against the key-protected server.

    Its context is 40 tokens, so every generation the fuzzer reaches is short. Half of the
    cases get the served model's name, so they reach the engine instead of stopping at 404.
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

    @given(case=cases, served_model=st.booleans())
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    def fuzz(case, served_model: bool) -> None:
        if served_model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL_NAME
        response = case.call(base_url=base_url, session=session, headers=HEADERS, timeout=120)
        sent.append(response.status_code)
        what = f"{case.method} {case.path} {json.dumps(case.body, default=repr)[:300]}"
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except Exception as exc:  # noqa: BLE001 - record every failure, keep fuzzing
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
