"""Hand-made bad requests: each gets a 4xx with OpenAI's error JSON, never a 5xx; API keys."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_helpers import API_KEY, MODEL_NAME

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
LONG_TEXT = " ".join(str(i) for i in range(3000))  # far more than the 2048-token context


def chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": USER, "max_tokens": 2} | fields


def completion(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2} | fields


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


# (id, method, path, request kwargs, expected status)
BAD_REQUESTS = [
    ("invalid-json", "POST", CHAT, {"content": b'{"model": "x", "messages": ['}, 400),
    ("json-not-object", "POST", CHAT, {"json": ["not", "an", "object"]}, 400),
    ("json-null", "POST", CHAT, {"content": b"null"}, 400),
    ("empty-body", "POST", CHAT, {"content": b""}, 400),
    ("not-utf8", "POST", CHAT, {"content": b'{"model": "\xff\xfe"}'}, 400),
    (
        "text-plain-body",
        "POST",
        CHAT,
        {"content": json.dumps(chat()).encode(), "headers": {"content-type": "text/plain"}},
        400,
    ),
    ("missing-model", "POST", CHAT, {"json": {"messages": USER}}, 400),
    ("missing-messages", "POST", CHAT, {"json": {"model": MODEL_NAME}}, 400),
    ("max-tokens-string", "POST", CHAT, {"json": chat(max_tokens="many")}, 400),
    ("messages-string", "POST", CHAT, {"json": chat(messages="hi")}, 400),
    ("temperature-string", "POST", CHAT, {"json": chat(temperature="hot")}, 400),
    ("n-float", "POST", CHAT, {"json": chat(n=1.5)}, 400),
    ("stop-int", "POST", CHAT, {"json": chat(stop=5)}, 400),
    ("content-int", "POST", CHAT, {"json": chat(messages=[{"role": "user", "content": 5}])}, 400),
    ("bad-role", "POST", CHAT, {"json": chat(messages=[{"role": "robot", "content": "x"}])}, 400),
    ("message-not-object", "POST", CHAT, {"json": chat(messages=["hi"])}, 400),
    ("unknown-model", "POST", CHAT, {"json": chat(model="gpt-4o")}, 404),
    ("unknown-model-completions", "POST", COMPLETIONS, {"json": completion(model="x")}, 404),
    ("empty-messages", "POST", CHAT, {"json": chat(messages=[])}, 400),
    (
        "prompt-over-context",
        "POST",
        CHAT,
        {"json": chat(messages=[{"role": "user", "content": LONG_TEXT}])},
        400,
    ),
    (
        "prompt-over-context-completions",
        "POST",
        COMPLETIONS,
        {"json": completion(prompt=LONG_TEXT)},
        400,
    ),
    ("max-tokens-over-context", "POST", CHAT, {"json": chat(max_tokens=100_000)}, 400),
    (
        "max-completion-tokens-over-context",
        "POST",
        CHAT,
        {"json": chat(max_completion_tokens=2**70)},
        400,
    ),
    ("max-tokens-zero", "POST", CHAT, {"json": chat(max_tokens=0)}, 400),
    ("max-tokens-negative", "POST", COMPLETIONS, {"json": completion(max_tokens=-1)}, 400),
    ("n-too-large", "POST", CHAT, {"json": chat(n=17)}, 400),
    ("n-zero", "POST", CHAT, {"json": chat(n=0)}, 400),
    ("stop-list-too-long", "POST", CHAT, {"json": chat(stop=["a", "b", "c", "d", "e"])}, 400),
    ("stop-string-too-long", "POST", CHAT, {"json": chat(stop="x" * 201)}, 400),
    ("stop-empty-string", "POST", CHAT, {"json": chat(stop=[""])}, 400),
    (
        "tools",
        "POST",
        CHAT,
        {"json": chat(tools=[{"type": "function", "function": {"name": "f"}}])},
        400,
    ),
    ("echo", "POST", COMPLETIONS, {"json": completion(echo=True)}, 400),
    ("top-logprobs-too-many", "POST", CHAT, {"json": chat(logprobs=True, top_logprobs=21)}, 400),
    ("logprobs-too-many", "POST", COMPLETIONS, {"json": completion(logprobs=21)}, 400),
    ("temperature-too-high", "POST", CHAT, {"json": chat(temperature=2.5)}, 400),
    (
        "temperature-nan",
        "POST",
        CHAT,
        {
            "content": b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
            b'"temperature": NaN}' % MODEL_NAME.encode()
        },
        400,
    ),
    ("top-p-zero", "POST", CHAT, {"json": chat(top_p=0)}, 400),
    ("top-k-over-int64", "POST", CHAT, {"json": chat(top_k=2**63)}, 400),
    ("top-k-over-int32", "POST", CHAT, {"json": chat(top_k=2**31)}, 400),
    ("repetition-penalty-underflow", "POST", CHAT, {"json": chat(repetition_penalty=1e-300)}, 400),
    ("presence-penalty-too-high", "POST", CHAT, {"json": chat(presence_penalty=3)}, 400),
    ("seed-negative", "POST", CHAT, {"json": chat(seed=-1)}, 400),
    ("seed-too-large", "POST", CHAT, {"json": chat(seed=2**64)}, 400),
    (
        "lone-surrogate-content",
        "POST",
        CHAT,
        {
            "content": b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800"}]}'
            % MODEL_NAME.encode()
        },
        400,
    ),
    (
        "lone-surrogate-text-part",
        "POST",
        CHAT,
        {
            "content": b'{"model": "%s", "messages": [{"role": "user", "content": '
            b'[{"type": "text", "text": "\\udfff"}]}]}' % MODEL_NAME.encode()
        },
        400,
    ),
    (
        "lone-surrogate-prompt",
        "POST",
        COMPLETIONS,
        {"content": b'{"model": "%s", "prompt": "\\ud800"}' % MODEL_NAME.encode()},
        400,
    ),
    (
        "prompt-token-out-of-vocab",
        "POST",
        COMPLETIONS,
        {"json": completion(prompt=[1, 10**9])},
        400,
    ),
    ("prompt-token-negative", "POST", COMPLETIONS, {"json": completion(prompt=[-1])}, 400),
    ("prompt-empty-string", "POST", COMPLETIONS, {"json": completion(prompt="")}, 400),
    ("prompt-empty-list", "POST", COMPLETIONS, {"json": completion(prompt=[])}, 400),
    ("prompt-batch-too-large", "POST", COMPLETIONS, {"json": completion(prompt=["a"] * 17)}, 400),
    ("prompt-missing", "POST", COMPLETIONS, {"json": {"model": MODEL_NAME, "messages": USER}}, 400),
    ("stream-options-wrong-type", "POST", CHAT, {"json": chat(stream=True, stream_options=5)}, 400),
    ("unknown-route", "GET", "/v1/nope", {}, 404),
    ("unknown-route-post", "POST", "/v1/embeddings", {"json": {"model": MODEL_NAME}}, 404),
    ("root", "GET", "/", {}, 404),
    ("get-on-post-route", "GET", CHAT, {}, 405),
    ("get-on-completions", "GET", COMPLETIONS, {}, 405),
    ("post-on-get-route", "POST", "/v1/models", {"json": {}}, 405),
    ("delete-health", "DELETE", "/health", {}, 405),
]


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_gets_openai_error(http, method, path, kwargs, status) -> None:
    assert_openai_error(http.request(method, path, **kwargs), status)


def test_error_details(http) -> None:
    error = assert_openai_error(http.post(CHAT, json=chat(model="nope")), 404)
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    error = assert_openai_error(http.post(CHAT, json=chat(max_tokens=100_000)), 400)
    assert error["code"] == "context_length_exceeded"
    error = assert_openai_error(http.post(CHAT, json=chat(n=99)), 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", "n")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_limit_is_413(http, chunked) -> None:
    body = json.dumps(chat(messages=[{"role": "user", "content": "x" * (5 << 20)}])).encode()
    content = iter([body[i : i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    error = assert_openai_error(http.post(CHAT, content=content), 413)
    assert error["type"] == "invalid_request_error"


def test_edge_values_are_served(http) -> None:
    """Valid but extreme sampling values: answered (200), not failed in the engine (500)."""
    for fields in (
        {"top_p": 5e-324},  # float32 would make it 0
        {"temperature": 1e-300},
        {"top_k": 2**31 - 1},
        {"repetition_penalty": 0.01, "presence_penalty": -2, "frequency_penalty": 2},
        {"min_p": 1.0, "temperature": 2.0},
        {"seed": 2**63 - 1, "n": 2},
        {"stop_token_ids": [10**30]},
        {"messages": [{"role": "user", "content": ""}]},
        # An assistant turn made only of tool calls has no content (as OpenAI allows).
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]},
                {"role": "user", "content": "and?"},
            ]
        },
        {"messages": [{"role": "user", "content": []}]},
        {"unknown_openai_field": {"x": 1}, "logit_bias": {"1": 5}, "user": "u"},
    ):
        response = http.post(CHAT, json=chat(**fields))
        assert response.status_code == 200, (fields, response.text)
    assert http.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": None},
        {"role": "user"},
        {"role": "system", "content": None},
        {"role": "assistant", "content": None},
        {"role": "assistant", "tool_calls": []},
    ],
    ids=["user-null", "user-missing", "system-null", "assistant-null", "assistant-no-calls"],
)
def test_message_without_content_is_rejected(http, message: dict) -> None:
    """As OpenAI: content is required, except on an assistant turn that carries tool calls."""
    error = assert_openai_error(http.post(CHAT, json=chat(messages=[message])), 400)
    assert error["param"] == "messages.0.content", error
    assert f"content is required for role {message['role']!r}" in error["message"], error
    assert not error["message"].startswith("Value error"), error


def test_empty_body_names_the_required_fields(http) -> None:
    for headers in ({"content-type": "application/json"}, {}):
        error = assert_openai_error(http.post(CHAT, content=b"", headers=headers), 400)
        assert error["param"] == "model", error
        assert "'model', 'messages'" in error["message"], error
    error = assert_openai_error(http.post(COMPLETIONS, content=b""), 400)
    assert error["param"] == "model" and "'prompt'" in error["message"], error


def test_body_that_is_not_json_names_the_content_type(http) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        response = http.post(
            CHAT, content=json.dumps(chat()).encode(), headers={"content-type": content_type}
        )
        error = assert_openai_error(response, 400)
        assert "Content-Type: application/json" in error["message"], error
        assert repr(content_type) in error["message"], error


def test_invalid_stream_request_is_an_error_before_streaming(http) -> None:
    """Validation happens before the 200 of a stream: a plain 4xx JSON, not an SSE error."""
    error = assert_openai_error(http.post(CHAT, json=chat(stream=True, max_tokens=10**6)), 400)
    assert error["code"] == "context_length_exceeded"


def test_no_5xx_counted_and_server_healthy(http) -> None:
    text = http.get("/metrics").text
    five_xx = [
        line for line in text.splitlines() if 'status="5' in line and not line.startswith("#")
    ]
    assert all(float(line.split()[-1]) == 0 for line in five_xx), five_xx
    assert http.get("/health").status_code == 200
    reply = http.post(CHAT, json=chat())
    assert reply.status_code == 200, reply.text


# -- API key ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_url(key_server) -> str:
    return key_server.url


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": API_KEY},
        {"Authorization": "Bearer"},
        {"X-Api-Key": API_KEY},
    ],
    ids=["none", "wrong", "basic-scheme", "no-scheme", "empty", "other-header"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", CHAT), ("POST", COMPLETIONS), ("GET", "/v1/models")],
    ids=["chat", "completions", "models"],
)
def test_bad_api_key_is_401(key_url, headers, method, path) -> None:
    kwargs = {"json": chat()} if method == "POST" else {}
    response = httpx.request(method, key_url + path, headers=headers, timeout=60, **kwargs)
    error = assert_openai_error(response, 401)
    assert error["type"] == "authentication_error"


def test_api_key_accepted(key_url) -> None:
    import openai

    client = openai.OpenAI(base_url=key_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2)
    assert reply.usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=key_url + "/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # health and metrics stay open for load balancers and Prometheus
    assert httpx.get(key_url + "/health", timeout=30).status_code == 200
    assert httpx.get(key_url + "/metrics", timeout=30).status_code == 200
