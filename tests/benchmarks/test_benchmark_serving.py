"""benchmarks/benchmark_serving.py against a fake OpenAI-compatible SSE server with known delays.

The fake server (stdlib ``http.server``, one thread per connection) streams a
role-only chunk, then ``max_tokens`` content chunks: the first after ``ttft_s``,
each next one ``gap_s`` later, then a usage chunk and ``[DONE]``. So the measured
TTFT, ITL, TPOT and token counts have known values, up to scheduling slack.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "benchmark_serving", ROOT / "benchmarks" / "benchmark_serving.py"
)
bs = importlib.util.module_from_spec(_spec)
sys.modules["benchmark_serving"] = bs  # dataclasses look their module up there
_spec.loader.exec_module(bs)

SLACK_S = 0.1  # what a busy machine may add to a delay, client side
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@dataclass(frozen=True)
class Behaviour:
    """What the fake server does with each request."""

    ttft_s: float = 0.0
    gap_s: float = 0.0
    fail_every: int = 0  # every n-th request (1-based) answers HTTP 500; 0: none
    has_usage: bool = True
    is_error_mid_stream: bool = False


class FakeServer:
    """A fake OpenAI-compatible server on 127.0.0.1 that records what it was sent."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[tuple[str, dict, dict]] = []  # (path, body, headers)
        self._lock = threading.Lock()
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The base URL to benchmark."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def record(self, path: str, body: dict, headers: dict) -> int:
        """Keep one request; its 1-based arrival number."""
        with self._lock:
            self.requests.append((path, body, headers))
            return len(self.requests)

    def close(self) -> None:
        """Stop serving and free the port."""
        self._httpd.shutdown()
        self._httpd.server_close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops concurrent connects: 1 s SYN retries


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else small SSE writes wait for the client's delayed ACK

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, obj: dict) -> None:
        self._send_chunk(f"data: {json.dumps(obj)}\n\n")

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": "fake-model"}]})
        else:
            self._send_json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        fake: FakeServer = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        number = fake.record(self.path, body, dict(self.headers))
        how = fake.behaviour
        if self.path not in (CHAT, COMPLETIONS):
            return self._send_json(404, {"error": {"message": "not found"}})
        if how.fail_every and number % how.fail_every == 0:
            error = {"message": "boom", "type": "server_error", "param": None, "code": 500}
            return self._send_json(500, {"error": error})
        is_chat = self.path == CHAT
        prompt = " ".join(m["content"] for m in body["messages"]) if is_chat else body["prompt"]
        num_tokens = body["max_tokens"]
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": num_tokens}
        words = [f"w{i} " for i in range(num_tokens)]
        if not body.get("stream"):
            time.sleep(how.ttft_s + how.gap_s * (num_tokens - 1))
            text = "".join(words)
            choice = (
                {"message": {"role": "assistant", "content": text}} if is_chat else {"text": text}
            )
            return self._send_json(200, {"choices": [choice], "usage": usage})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._send_chunk(": a comment line, to be ignored\n\n")
        if is_chat:  # like OpenAI: a role-only chunk first, which is not a token
            self._event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i, word in enumerate(words):
            time.sleep(how.ttft_s if i == 0 else how.gap_s)
            if how.is_error_mid_stream and i == 1:
                self._event({"error": {"message": "engine step failed", "code": 500}})
                break
            choice = {"index": 0, "delta": {"content": word}} if is_chat else {"text": word}
            self._event({"choices": [choice]})
        else:
            if how.has_usage:
                self._event({"choices": [], "usage": usage})
            self._send_chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@pytest.fixture
def serve():
    """Start fake servers with a given behaviour; all are stopped after the test."""
    servers: list[FakeServer] = []

    def start(**behaviour: object) -> FakeServer:
        servers.append(FakeServer(Behaviour(**behaviour)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def config(server: FakeServer, **overrides: object) -> bs.BenchConfig:
    """A small benchmark config aimed at ``server``."""
    values = dict(model="fake-model", base_url=server.url, num_prompts=4, input_len=8)
    values.update(num_warmup=0, output_len=4)
    values.update(overrides)
    return bs.BenchConfig(**values)


def free_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- pure parts


def test_percentiles_on_known_data():
    values = list(range(1, 101))
    assert bs.percentile(values, 50) == pytest.approx(50.5)
    assert bs.percentile(values, 90) == pytest.approx(90.1)
    assert bs.percentile(values, 99) == pytest.approx(99.01)
    assert bs.percentile([7.0], 99) == 7.0
    assert bs.percentile([3.0, 1.0], 50) == 2.0
    stats = bs.Stats.of([0.001, 0.002, 0.003, 0.010])
    assert stats.mean_ms == pytest.approx(4.0)
    assert stats.p50_ms == pytest.approx(2.5)
    assert stats.p99_ms == pytest.approx(9.79)
    assert bs.Stats.of([]) is None
    with pytest.raises(ValueError):
        bs.percentile([], 50)


def test_percentiles_match_numpy():
    np = pytest.importorskip("numpy")
    values = np.random.default_rng(0).exponential(size=37).tolist()
    for q in (0, 13, 50, 90, 99, 100):
        assert bs.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_sse_parser_joins_data_lines_and_skips_the_rest():
    lines = [": comment", "", "data: a", "", "data: b", "data: c", "", "event: x", "data:d"]

    async def collect() -> list[str]:
        async def gen():
            for line in lines:
                yield line

        return [data async for data in bs.iter_sse_data(gen())]

    assert asyncio.run(collect()) == ["a", "b\nc", "d"]


def test_prompts_are_seeded_distinct_and_sized(tmp_path):
    prompts = bs.make_prompts(5, 40, seed=1)
    assert prompts == bs.make_prompts(5, 40, seed=1)
    assert prompts != bs.make_prompts(5, 40, seed=2)
    assert all(len(p.split()) == 40 for p in prompts)
    assert len(set(prompts)) == 5
    cfg = bs.BenchConfig(model="m", concurrency_levels=(1, 4), num_prompts=3, num_warmup=2)
    warmup, levels = bs.plan_prompts(cfg)
    assert len(warmup) == 2 and [len(level) for level in levels] == [3, 3]
    assert len(set(warmup + levels[0] + levels[1])) == 8  # no prompt is sent twice
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\nsecond prompt\n")
    cfg = bs.BenchConfig(model="m", num_prompts=3, num_warmup=0, prompt_file=str(path))
    assert bs.plan_prompts(cfg)[1] == [["first prompt", "second prompt", "first prompt"]]


def test_config_rejects_bad_values():
    for bad in (
        dict(model=""),
        dict(concurrency_levels=(0,)),
        dict(num_prompts=0),
        dict(output_len=0),
        dict(num_warmup=-1),
        dict(endpoint="embeddings"),
        dict(timeout_s=0),
    ):
        with pytest.raises(ValueError):
            bs.BenchConfig(**{"model": "m", **bad})
    assert bs.parse_concurrency("16,1,16") == (1, 16)
    assert bs.BenchConfig(model="m", base_url="http://h:1/v1/").url == "http://h:1" + CHAT


# ---------------------------------------------------------------- against the fake server


def test_streaming_timings_and_tokens_match_the_known_delays(serve):
    server = serve(ttft_s=0.08, gap_s=0.04)
    (report,) = bs.run_benchmark(config(server, num_prompts=3, output_len=5), show_progress=False)
    assert (report.num_ok, report.num_failed, report.total_output_tokens) == (3, 0, 15)
    assert report.mean_prompt_tokens == 8  # the server's count of the 8-word prompts
    for result in report.results:
        assert result.output_tokens == 5
        assert 0.08 <= result.ttft_s <= 0.08 + SLACK_S  # the role-only chunk does not count
        assert len(result.itl_s) == 4
        assert min(result.itl_s) >= 0.02
        assert 0.038 <= sum(result.itl_s) / 4 <= 0.04 + SLACK_S
        assert 0.038 <= result.tpot_s <= 0.04 + SLACK_S
        assert 0.24 <= result.latency_s <= 0.24 + 2 * SLACK_S
    assert 80 <= report.ttft.p50_ms <= 80 + SLACK_S * 1000
    assert 38 <= report.itl.mean_ms <= 40 + SLACK_S * 1000
    assert report.output_throughput == pytest.approx(15 / report.duration_s)
    path, body, _ = server.requests[0]
    assert path == CHAT and body["max_tokens"] == 5 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert "ignore_eos" not in body


def test_shared_prefix_workload_sends_one_system_prompt_and_keeps_texts(serve):
    server = serve()
    cfg = config(server, shared_prefix_len=50, temperature=0.0, num_warmup=1)
    (report,) = bs.run_benchmark(cfg, show_progress=False)
    assert report.num_ok == 4 and report.mean_prompt_tokens == 50 + 8
    assert [r.text for r in report.results] == ["w0 w1 w2 w3 "] * 4
    bodies = [body for _, body, _ in server.requests]
    assert len(bodies) == 5  # the warm-up shares the prefix too
    systems = {body["messages"][0]["content"] for body in bodies}
    assert len(systems) == 1 and len(systems.pop().split()) == 50
    assert all(body["messages"][0]["role"] == "system" for body in bodies)
    questions = [body["messages"][1]["content"] for body in bodies]
    assert len(set(questions)) == 5 and all(body["temperature"] == 0.0 for body in bodies)
    server = serve()
    bs.run_benchmark(config(server, endpoint="completions", shared_prefix_len=20), False)
    prompts = [body["prompt"] for _, body, _ in server.requests]
    assert len({p.split("\n\n")[0] for p in prompts}) == 1 and len(set(prompts)) == 4
    assert "temperature" not in server.requests[0][1]


def test_chunks_are_counted_when_the_server_sends_no_usage(serve):
    server = serve(has_usage=False)
    cfg = config(server, endpoint="completions", output_len=6, ignore_eos=True)
    (report,) = bs.run_benchmark(cfg, show_progress=False)
    assert report.num_ok == 4
    assert [r.output_tokens for r in report.results] == [6] * 4
    assert all(r.prompt_tokens is None for r in report.results)
    _, body, _ = server.requests[0]
    assert body["prompt"] and body["ignore_eos"] is True and "messages" not in body


def test_no_stream_reports_latency_only(serve):
    server = serve(ttft_s=0.02, gap_s=0.01)
    (report,) = bs.run_benchmark(config(server, is_stream=False), show_progress=False)
    assert report.num_ok == 4 and report.total_output_tokens == 16
    assert report.ttft is None and report.tpot is None and report.itl is None
    assert report.latency.p50_ms >= 50
    assert "stream_options" not in server.requests[0][1]
    assert "TTFT p99 (ms)" in bs.format_table([report])


def test_failed_requests_are_counted_not_raised(serve):
    server = serve(fail_every=3)
    (report,) = bs.run_benchmark(
        config(server, num_prompts=9, concurrency_levels=(3,)), show_progress=False
    )
    assert (report.num_ok, report.num_failed) == (6, 3)
    ((error, count),) = report.errors.items()
    assert count == 3 and error.startswith("HTTP 500: ") and "boom" in error
    assert [r.http_status for r in report.results].count(500) == 3
    assert report.total_output_tokens == 6 * 4  # failed requests add no tokens

    broken = serve(is_error_mid_stream=True)
    (report,) = bs.run_benchmark(config(broken, num_prompts=2), show_progress=False)
    assert report.num_failed == 2
    assert next(iter(report.errors)).startswith("error in stream: ")

    dead = bs.BenchConfig(model="m", base_url=f"http://127.0.0.1:{free_port()}", num_warmup=0)
    (report,) = bs.run_benchmark(dead, show_progress=False)
    assert report.num_failed == dead.num_prompts and report.num_ok == 0
    assert next(iter(report.errors)).startswith("ConnectError")
    assert report.ttft is None and report.output_throughput == 0
    assert f"{dead.num_prompts} x ConnectError" in bs.format_errors([report])


def test_concurrency_sweep_ratio(serve):
    # Every request takes ~0.08 s whatever the load, as if the server batched perfectly:
    # 4 clients get about 4x the output tokens/s of one.
    server = serve(ttft_s=0.035, gap_s=0.015)
    cfg = config(server, concurrency_levels=(1, 4), num_prompts=8)
    low, high = bs.run_benchmark(cfg, show_progress=False)
    assert (low.concurrency, high.concurrency) == (1, 4)
    assert low.speedup == 1.0
    assert 2.0 <= high.speedup <= 6.0
    assert high.speedup == pytest.approx(high.output_throughput / low.output_throughput)
    table = bs.format_table([low, high])
    assert "vs concurrency 1" in table and f"{high.speedup:.2f}x" in table


def test_cli_json_schema_model_discovery_and_api_key(serve, tmp_path, capsys):
    server = serve(ttft_s=0.005, gap_s=0.002)
    out = tmp_path / "bench.json"
    argv = ["--base-url", server.url + "/v1", "--concurrency", "1,2", "--iterations", "4"]
    argv += ["--input-len", "8", "--seq-len", "3", "--warmup", "2", "--api-key", "sk-secret"]
    assert bs.main([*argv, "--json", str(out)], show_progress=False) == 0
    printed = capsys.readouterr().out
    assert "output throughput (tok/s)" in printed and "vs concurrency 1" in printed

    doc = json.loads(out.read_text())
    assert "sk-secret" not in out.read_text()
    assert set(doc) == {"config", "started_at", "levels"}
    assert doc["config"]["model"] == "fake-model"  # from GET /v1/models
    assert doc["config"]["has_api_key"] is True
    assert (doc["config"]["num_prompts"], doc["config"]["output_len"]) == (4, 3)
    assert doc["config"]["concurrency_levels"] == [1, 2]
    stat_keys = {"mean_ms", "p50_ms", "p90_ms", "p99_ms"}
    for level, concurrency in zip(doc["levels"], (1, 2), strict=True):
        assert level["concurrency"] == concurrency
        assert (level["num_ok"], level["num_failed"], level["errors"]) == (4, 0, {})
        for key in ("duration_s", "request_throughput", "output_throughput", "speedup"):
            assert level[key] > 0
        for key in ("ttft", "tpot", "itl", "latency"):
            assert set(level[key]) == stat_keys
        assert len(level["requests"]) == 4
        request = level["requests"][0]
        assert request["is_ok"] and request["output_tokens"] == 3 and len(request["itl_ms"]) == 2
        assert set(request) >= {"ttft_ms", "tpot_ms", "latency_ms", "http_status", "error"}
    posts = [headers for path, _, headers in server.requests if path == CHAT]
    assert len(posts) == 2 + 4 * 2  # the warm-up requests are sent, not measured
    assert all(h["Authorization"] == "Bearer sk-secret" for h in posts)


def test_cli_exit_codes(serve, capsys):
    server = serve(fail_every=2)
    argv = ["--base-url", server.url, "--model", "m", "--num-prompts", "4", "--iterations", "9"]
    assert bs.main([*argv, "--warmup", "0", "--seq-len", "2"], show_progress=False) == 1
    printed = capsys.readouterr().out
    assert "requests ok / failed" in printed and "2 / 2" in printed
    assert "2 request(s) failed" in printed and "HTTP 500" in printed

    dead = f"http://127.0.0.1:{free_port()}"
    assert bs.main(["--base-url", dead], show_progress=False) == 2  # no model to discover
    assert "pass --model" in capsys.readouterr().err
    for bad in (["--concurrency", "0"], ["--concurrency", "1,x"], ["--iterations", "0"]):
        with pytest.raises(SystemExit) as exc:
            bs.main(["--base-url", dead, "--model", "m", *bad], show_progress=False)
        assert exc.value.code == 2
