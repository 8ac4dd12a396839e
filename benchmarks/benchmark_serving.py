"""Serving benchmark for any OpenAI-compatible server (Chitu, vLLM, SGLang).

At each concurrency level C, a closed loop of C clients sends ``--num-prompts``
requests (``--iterations`` when that is not given) to ``/v1/chat/completions`` or
``/v1/completions``. Per request it measures the time to first token (TTFT: to the
first chunk that carries text), the gaps between content chunks (ITL), the time per
output token after the first (TPOT = (latency - TTFT) / (output_tokens - 1)) and the
end-to-end latency; per level it reports their mean, p50, p90 and p99 in ms, the
request and output-token throughput, and, when several levels are swept, each
level's output tokens/s against the lowest level's.

    python benchmarks/benchmark_serving.py --concurrency 1,16 --input-len 64 \\
        --output-len 64 --ignore-eos --json out.json

Prompts are random words (seeded), ``--input-len`` words each, on the approximation
1 word ~ 1 token. That holds for the large BPE vocabularies of real models; with a
small one (the demo model's 512 entries) a word is several tokens, and a chat
template adds a few more: the server's own count (``usage.prompt_tokens``) is
reported beside it. ``--prompt-file`` takes one prompt per line instead. No prompt
is sent twice, so a server's prefix cache does not flatter a later level.

Shared-prefix workload (``--shared-prefix-len N``): every request, warm-up included,
is N conversations' common system prompt (N random words, the same for every
request) followed by its own ``--input-len``-word question, as a system message
(chat) or prepended text (completions). A server with a prefix cache computes the
system prompt once; TTFT shows it. Run it against the server with and without its
prefix cache (Chitu: ``--no-prefix-caching``) and compare; with ``--temperature 0``
the generated texts (kept per request in ``--json``) must not change.

Output tokens are the server's ``usage.completion_tokens`` (asked for with
``stream_options.include_usage``); a server that sends no usage gets its content
chunks counted instead (one chunk ~ one token, and ITL is per chunk). OpenAI's API
has no ``ignore_eos``: ``--ignore-eos`` sends it as an extra field (vLLM, SGLang and
Chitu accept it) so that every request produces exactly ``--output-len`` tokens.
With ``--no-stream`` only latency and throughput are observable; TTFT, TPOT and ITL
are left empty. Proxy variables are ignored: the server is measured directly.

Exits 1 when any measured request failed (after the report), 2 on bad options or
when the model cannot be listed. Needs ``httpx`` (``pip install httpx``) and ``tqdm``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import httpx
from tqdm import tqdm

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:21002"
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
PERCENTILES = (50, 90, 99)
MAX_ERROR_CHARS = 300
# Common English words: one token each in the vocabularies of most real models.
WORDS = tuple(
    """the of and to in is that it for on with as was at by be this from or have an are
    not but had his they you which one were all we her she there would their will when who
    him been has more if no out do so can what up said about other into than its time only
    could new them man some these then two first may any like now my such make over our even
    most me state after also made many did must before back see through way where get much go
    well your know should down work year because come people just say each those take day good
    how long own too little use us very great still men here life both between old under last
    never place same another think house while high right might came off find since used give
    against three himself look few general hand school part small home during number again""".split()
)


class BenchmarkError(RuntimeError):
    """The benchmark cannot start (server unreachable, no model to name, unreadable prompt file)."""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: what to send, where and how often. Raises ``ValueError`` on bad values."""

    model: str
    base_url: str = DEFAULT_BASE_URL
    endpoint: str = "chat"
    concurrency_levels: tuple[int, ...] = (1,)
    num_prompts: int = 32
    input_len: int = 128
    output_len: int = 128
    is_stream: bool = True
    num_warmup: int = 1
    api_key: str | None = field(default=None, repr=False)
    seed: int = 0
    timeout_s: float = 600.0
    ignore_eos: bool = False
    prompt_file: str | None = None
    shared_prefix_len: int = 0  # words of a system prompt common to every request
    temperature: float | None = None  # None: the server's default

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is empty: pass --model (see the server's GET /v1/models)")
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint {self.endpoint!r} is not one of {sorted(ENDPOINT_PATHS)}")
        if not self.concurrency_levels or min(self.concurrency_levels) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency_levels}")
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shared_prefix_len < 0:
            raise ValueError(f"shared_prefix_len must be >= 0, got {self.shared_prefix_len}")
        if self.num_warmup < 0:
            raise ValueError(f"num_warmup must be >= 0, got {self.num_warmup}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    @property
    def url(self) -> str:
        """The endpoint's full URL; a base URL ending in ``/v1`` (OpenAI-client style) is accepted."""
        base = self.base_url.rstrip("/").removesuffix("/v1")
        return base + ENDPOINT_PATHS[self.endpoint]

    def to_json(self) -> dict:
        """The configuration for ``--json``, without the API key."""
        out = asdict(self)
        out["has_api_key"] = out.pop("api_key") is not None
        return out


@dataclass
class RequestResult:
    """What one request measured; times in seconds from the moment it was sent."""

    is_ok: bool = False
    http_status: int | None = None
    error: str = ""
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    text: str = ""  # what was generated (to compare runs)

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None without a TTFT or with < 2 tokens."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        """This request for ``--json``, times in ms."""
        return {
            "is_ok": self.is_ok,
            "http_status": self.http_status,
            "error": self.error,
            "ttft_ms": _ms(self.ttft_s),
            "tpot_ms": _ms(self.tpot_s),
            "latency_ms": _ms(self.latency_s),
            "itl_ms": [_ms(gap) for gap in self.itl_s],
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "text": self.text,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Mean and percentiles of one latency metric, in ms."""

    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @classmethod
    def of(cls, values_s: Sequence[float]) -> Stats | None:
        """Stats of durations in seconds; None when there are none."""
        if not values_s:
            return None
        ms = [v * 1000 for v in values_s]
        p50, p90, p99 = (percentile(ms, q) for q in PERCENTILES)
        return cls(mean_ms=sum(ms) / len(ms), p50_ms=p50, p90_ms=p90, p99_ms=p99)


@dataclass
class LevelReport:
    """The figures of one concurrency level; throughputs count successful requests only."""

    concurrency: int
    num_ok: int
    num_failed: int
    duration_s: float
    request_throughput: float  # ok requests / s
    output_throughput: float  # output tokens of ok requests / s
    total_output_tokens: int
    mean_prompt_tokens: float | None  # the server's usage.prompt_tokens
    ttft: Stats | None
    tpot: Stats | None
    itl: Stats | None
    latency: Stats | None
    errors: dict[str, int]  # error text -> number of requests
    speedup: float | None = None  # output_throughput / that of the lowest level
    results: list[RequestResult] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        """This level for ``--json``, with one record per request."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "results"}
        for name in ("ttft", "tpot", "itl", "latency"):
            out[name] = None if out[name] is None else asdict(out[name])
        out["requests"] = [r.to_json() for r in self.results]
        return out


def summarize(concurrency: int, results: list[RequestResult], duration_s: float) -> LevelReport:
    """Aggregate one level's request results measured over ``duration_s`` of wall time."""
    ok = [r for r in results if r.is_ok]
    total_out = sum(r.output_tokens for r in ok)
    prompt_counts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return LevelReport(
        concurrency=concurrency,
        num_ok=len(ok),
        num_failed=len(results) - len(ok),
        duration_s=duration_s,
        request_throughput=len(ok) / duration_s if duration_s > 0 else 0.0,
        output_throughput=total_out / duration_s if duration_s > 0 else 0.0,
        total_output_tokens=total_out,
        mean_prompt_tokens=sum(prompt_counts) / len(prompt_counts) if prompt_counts else None,
        ttft=Stats.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=Stats.of([r.tpot_s for r in ok if r.tpot_s is not None]),
        itl=Stats.of([gap for r in ok for gap in r.itl_s]),
        latency=Stats.of([r.latency_s for r in ok]),
        errors=dict(Counter(r.error for r in results if not r.is_ok).most_common()),
        results=results,
    )


def add_speedups(reports: list[LevelReport]) -> None:
    """Set each level's output tokens/s as a multiple of the lowest concurrency level's."""
    base = min(reports, key=lambda r: r.concurrency)
    for report in reports:
        if base.output_throughput > 0:
            report.speedup = report.output_throughput / base.output_throughput


# ---------------------------------------------------------------- prompts


def make_prompts(num_prompts: int, input_len: int, seed: int) -> list[str]:
    """``num_prompts`` prompts of ``input_len`` random words each, the same for the same seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=input_len)) for _ in range(num_prompts)]


def shared_prefix(cfg: BenchConfig) -> str:
    """The system prompt of the shared-prefix workload (empty without one); the same for
    the same seed, and unlike any question."""
    if not cfg.shared_prefix_len:
        return ""
    rng = random.Random(f"shared-prefix-{cfg.seed}")
    return " ".join(rng.choices(WORDS, k=cfg.shared_prefix_len))


def load_prompt_file(path: str) -> list[str]:
    """The non-empty lines of ``path``, one prompt each."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BenchmarkError(f"cannot read --prompt-file {path}: {exc}") from exc
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise BenchmarkError(f"--prompt-file {path} holds no prompt (one per line)")
    return prompts


def plan_prompts(cfg: BenchConfig) -> tuple[list[str], list[list[str]]]:
    """The warm-up prompts and each level's prompts; a prompt file is cycled when too short."""
    total = cfg.num_warmup + cfg.num_prompts * len(cfg.concurrency_levels)
    if cfg.prompt_file:
        pool = load_prompt_file(cfg.prompt_file)
        pool = [pool[i % len(pool)] for i in range(total)]
    else:
        pool = make_prompts(total, cfg.input_len, cfg.seed)
    warmup, rest = pool[: cfg.num_warmup], pool[cfg.num_warmup :]
    n = cfg.num_prompts
    return warmup, [rest[i * n : (i + 1) * n] for i in range(len(cfg.concurrency_levels))]


# ---------------------------------------------------------------- one request


def build_payload(cfg: BenchConfig, prompt: str, system: str = "") -> dict:
    """The JSON body of one request; ``system`` (the shared prefix) goes first."""
    payload: dict = {"model": cfg.model, "max_tokens": cfg.output_len, "stream": cfg.is_stream}
    if cfg.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
        if system:
            payload["messages"].insert(0, {"role": "system", "content": system})
    else:
        payload["prompt"] = f"{system}\n\n{prompt}" if system else prompt
    if cfg.temperature is not None:
        payload["temperature"] = cfg.temperature
    if cfg.is_stream:
        payload["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        payload["ignore_eos"] = True
    return payload


def response_text(body: dict) -> str:
    """The generated text of a response or a stream chunk (chat or completions), all choices."""
    parts = []
    for choice in body.get("choices") or []:
        message = choice.get("delta") or choice.get("message") or {}
        text = choice.get("text") or message.get("content") or message.get("reasoning_content")
        parts.append(text or "")
    return "".join(parts)


async def iter_sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event, in order (several ``data:`` lines joined by newlines)."""
    data: list[str] = []
    async for line in lines:
        if not line:  # a blank line ends the event
            if data:
                yield "\n".join(data)
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def _record_usage(result: RequestResult, usage: dict) -> None:
    if usage.get("completion_tokens") is not None:
        result.output_tokens = int(usage["completion_tokens"])
    if usage.get("prompt_tokens") is not None:
        result.prompt_tokens = int(usage["prompt_tokens"])


async def _read_stream(
    client: httpx.AsyncClient, cfg: BenchConfig, payload: dict, start: float, result: RequestResult
) -> None:
    num_chunks, last, has_usage = 0, start, False
    async with client.stream("POST", cfg.url, json=payload) as response:
        result.http_status = response.status_code
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            result.error = f"HTTP {response.status_code}: {body[:MAX_ERROR_CHARS]}"
            return
        is_done = False
        async for data in iter_sse_data(response.aiter_lines()):
            if is_done:
                continue  # drain what follows [DONE] so the connection can be reused
            now = time.perf_counter()
            if data.strip() == "[DONE]":
                result.latency_s, is_done = now - start, True
                continue
            chunk = json.loads(data)
            if chunk.get("error"):
                result.error = f"error in stream: {json.dumps(chunk['error'])[:MAX_ERROR_CHARS]}"
                return
            if chunk.get("usage"):
                _record_usage(result, chunk["usage"])
                has_usage = True
            if text := response_text(chunk):
                result.text += text
                if result.ttft_s is None:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
                num_chunks += 1
    if not is_done:
        result.latency_s = time.perf_counter() - start
    if result.ttft_s is None:
        result.error = "the stream carried no generated text"
    elif not has_usage:
        result.output_tokens = num_chunks


async def _read_whole(
    client: httpx.AsyncClient, cfg: BenchConfig, payload: dict, start: float, result: RequestResult
) -> None:
    response = await client.post(cfg.url, json=payload)
    result.latency_s = time.perf_counter() - start
    result.http_status = response.status_code
    if response.status_code != 200:
        result.error = f"HTTP {response.status_code}: {response.text[:MAX_ERROR_CHARS]}"
        return
    body = response.json()
    if body.get("error"):
        result.error = f"error in response: {json.dumps(body['error'])[:MAX_ERROR_CHARS]}"
        return
    result.text = response_text(body)
    result.output_tokens = len(result.text.split())  # approximate, when no usage
    _record_usage(result, body.get("usage") or {})


async def send_request(
    client: httpx.AsyncClient, cfg: BenchConfig, prompt: str, system: str = ""
) -> RequestResult:
    """Send one prompt and measure it; failures are recorded in the result, never raised."""
    result = RequestResult()
    payload = build_payload(cfg, prompt, system)
    start = time.perf_counter()
    try:
        read = _read_stream if cfg.is_stream else _read_whole
        await read(client, cfg, payload, start, result)
    except Exception as exc:  # any failure of one request is a figure, not a crash
        result.error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        if not result.latency_s:
            result.latency_s = time.perf_counter() - start
    result.is_ok = not result.error
    return result


# ---------------------------------------------------------------- levels


async def run_level(
    client: httpx.AsyncClient,
    cfg: BenchConfig,
    prompts: list[str],
    concurrency: int,
    show_progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """Send ``prompts`` with at most ``concurrency`` in flight; the results and the wall time."""
    in_flight = asyncio.Semaphore(concurrency)
    system = shared_prefix(cfg)
    bar = tqdm(
        total=len(prompts), desc=f"concurrency {concurrency}", unit="req", disable=not show_progress
    )

    async def one(prompt: str) -> RequestResult:
        async with in_flight:
            result = await send_request(client, cfg, prompt, system)
        bar.update(1)
        return result

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    duration_s = time.perf_counter() - start
    bar.close()
    return list(results), duration_s


def _client(cfg: BenchConfig, max_connections: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    return httpx.AsyncClient(timeout=cfg.timeout_s, limits=limits, headers=headers, trust_env=False)


async def run_benchmark_async(cfg: BenchConfig, show_progress: bool = True) -> list[LevelReport]:
    """Warm up, then measure every concurrency level in ascending order."""
    warmup, level_prompts = plan_prompts(cfg)
    levels = sorted(cfg.concurrency_levels)
    async with _client(cfg, max(levels)) as client:
        if warmup:
            results, _ = await run_level(client, cfg, warmup, levels[0], show_progress=False)
            for error, count in Counter(r.error for r in results if not r.is_ok).items():
                logger.warning("%d warm-up request(s) failed: %s", count, error)
        reports = []
        for concurrency, prompts in zip(levels, level_prompts, strict=True):
            results, duration_s = await run_level(client, cfg, prompts, concurrency, show_progress)
            reports.append(summarize(concurrency, results, duration_s))
    add_speedups(reports)
    return reports


def run_benchmark(cfg: BenchConfig, show_progress: bool = True) -> list[LevelReport]:
    """Synchronous entry point: run the whole benchmark on a fresh event loop."""
    return asyncio.run(run_benchmark_async(cfg, show_progress))


def discover_model(base_url: str, api_key: str | None, timeout_s: float) -> str:
    """The first model id of the server's ``GET /v1/models``."""
    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout_s, trust_env=False)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise BenchmarkError(f"cannot list the models at {url} ({exc}); pass --model") from exc


# ---------------------------------------------------------------- report


def format_table(reports: list[LevelReport]) -> str:
    """The figures as a text table: one column per concurrency level."""

    def num(value: float | None, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    rows: list[tuple[str, list[str]]] = [
        ("requests ok / failed", [f"{r.num_ok} / {r.num_failed}" for r in reports]),
        ("duration (s)", [num(r.duration_s) for r in reports]),
        ("request throughput (req/s)", [num(r.request_throughput) for r in reports]),
        ("output throughput (tok/s)", [num(r.output_throughput) for r in reports]),
    ]
    if len(reports) > 1:
        base = min(r.concurrency for r in reports)
        rows.append((f"  vs concurrency {base}", [num(r.speedup) + "x" for r in reports]))
    rows += [
        ("output tokens", [str(r.total_output_tokens) for r in reports]),
        ("mean prompt tokens (server)", [num(r.mean_prompt_tokens, ".1f") for r in reports]),
    ]
    for label, attr in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("latency", "latency")):
        for stat in ("mean", "p50", "p90", "p99"):
            cells = []
            for r in reports:
                stats = getattr(r, attr)
                cells.append(num(None if stats is None else getattr(stats, f"{stat}_ms")))
            rows.append((f"{label} {stat} (ms)", cells))
    header = ("concurrency", [str(r.concurrency) for r in reports])
    label_width = max(len(label) for label, _ in [header, *rows])
    col_width = max(10, *(len(c) for _, cells in rows for c in cells))
    lines = []
    for i, (label, cells) in enumerate([header, *rows]):
        lines.append(label.ljust(label_width) + "".join(c.rjust(col_width + 2) for c in cells))
        if i == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def format_errors(reports: list[LevelReport], max_kinds: int = 5) -> str:
    """The distinct errors of each level with their counts (the most frequent first)."""
    lines = []
    for r in reports:
        if r.errors:
            lines.append(f"concurrency {r.concurrency}: {r.num_failed} request(s) failed")
            for error, count in list(r.errors.items())[:max_kinds]:
                lines.append(f"  {count} x {error}")
    return "\n".join(lines)


def to_json(cfg: BenchConfig, reports: list[LevelReport], started_at: str) -> dict:
    """Everything the run measured, plus its configuration."""
    return {
        "config": cfg.to_json(),
        "started_at": started_at,
        "levels": [r.to_json() for r in reports],
    }


# ---------------------------------------------------------------- CLI


def parse_concurrency(text: str) -> tuple[int, ...]:
    """``"16"`` -> (16,), ``"1,16,64"`` -> (1, 16, 64): ascending, without repeats."""
    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        levels = []
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError(
            f"expected an int >= 1 or a list like 1,16,64, not {text!r}"
        )
    return tuple(levels)


def build_parser() -> argparse.ArgumentParser:
    """The command line; the docstring above says what each figure means."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Prompt lengths are approximate: 1 random word ~ 1 token (see the module docstring).",
    )
    add = parser.add_argument
    add("--base-url", default=DEFAULT_BASE_URL, help="server root (default %(default)s)")
    add("--model", help="model name to send (default: the first of GET /v1/models)")
    add("--endpoint", choices=sorted(ENDPOINT_PATHS), default="chat", help="default %(default)s")
    add("--concurrency", type=parse_concurrency, default=(1,), help="int, or a list to sweep: 1,16")
    add("--num-prompts", type=int, help="measured requests per level (default: --iterations)")
    add("--iterations", type=int, default=32, help="requests per level (default %(default)s)")
    add("--warmup", type=int, default=1, help="unmeasured warm-up requests (default %(default)s)")
    add("--input-len", type=int, default=128, help="prompt words ~ tokens (default %(default)s)")
    add(
        "--output-len",
        "--seq-len",
        dest="output_len",
        type=int,
        default=128,
        help="max_tokens (default %(default)s)",
    )
    add("--prompt-file", help="one prompt per line instead of random words")
    add(
        "--shared-prefix-len",
        type=int,
        default=0,
        help="shared-prefix workload: a system prompt of this many words common to every "
        "request, before its own prompt (default 0: none)",
    )
    add("--temperature", type=float, help="sent with every request (default: the server's)")
    add("--stream", action=argparse.BooleanOptionalAction, default=True, help="SSE streaming")
    add("--ignore-eos", action="store_true", help='send "ignore_eos": true (vLLM, SGLang, Chitu)')
    add("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default $OPENAI_API_KEY")
    add("--seed", type=int, default=0, help="seed of the random prompts (default %(default)s)")
    add("--timeout", type=float, default=600.0, help="seconds per request (default %(default)s)")
    add("--json", metavar="PATH", help="also write the config and every figure here")
    return parser


def main(argv: list[str] | None = None, show_progress: bool = True) -> int:
    """Run the benchmark from the command line; the exit code (1 when a request failed)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model = args.model or discover_model(args.base_url, args.api_key, args.timeout)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        cfg = BenchConfig(
            model=model,
            base_url=args.base_url,
            endpoint=args.endpoint,
            concurrency_levels=args.concurrency,
            num_prompts=args.num_prompts if args.num_prompts is not None else args.iterations,
            input_len=args.input_len,
            output_len=args.output_len,
            is_stream=args.stream,
            num_warmup=args.warmup,
            api_key=args.api_key,
            seed=args.seed,
            timeout_s=args.timeout,
            ignore_eos=args.ignore_eos,
            prompt_file=args.prompt_file,
            shared_prefix_len=args.shared_prefix_len,
            temperature=args.temperature,
        )
    except ValueError as exc:  # a bad option value
        parser.error(str(exc))
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        reports = run_benchmark(cfg, show_progress=show_progress)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"\n{cfg.url}  model={cfg.model}  stream={cfg.is_stream}  prompts/level={cfg.num_prompts}"
        f"  input~{cfg.input_len} words  output={cfg.output_len} tokens"
        + (f"  shared prefix~{cfg.shared_prefix_len} words" if cfg.shared_prefix_len else "")
    )
    print(format_table(reports))
    if errors := format_errors(reports):
        print("\n" + errors)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(cfg, reports, started_at), indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if any(r.num_failed for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
