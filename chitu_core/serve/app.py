"""FastAPI app: OpenAI's chat/completions/models endpoints plus /health and /metrics."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from chitu_core.engine.sampling import SamplingParams, TokenLogprobs
from chitu_core.errors import TokenizerError
from chitu_core.serve.async_engine import AsyncEngine, EngineStopped, RequestFailed
from chitu_core.serve.body_limit import BodySizeLimit
from chitu_core.serve.metrics import RequestCounter, ServerMetrics
from chitu_core.serve.openai_errors import APIError, error_body, install_error_handlers
from chitu_core.serve.protocol import ChatCompletionRequest, CompletionRequest

_MIN_TOP_P = 1e-30


@dataclass(frozen=True)
class ServerSettings:
    """Server-side limits and identity (the CLI maps its options onto this)."""

    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass
class _Choice:
    """Accumulated result of one choice (non-streaming)."""

    text: list[str] = field(default_factory=list)
    logprobs: list[tuple[int, TokenLogprobs]] = field(default_factory=list)
    finish_reason: str | None = None
    num_tokens: int = 0


def create_app(
    engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics | None = None
) -> FastAPI:
    """The ASGI app serving ``engine``; ``engine.start()`` is called at startup."""
    metrics = metrics or ServerMetrics()
    tokenizer = engine.engine.tokenizer

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="Chitu", version="0.1.0", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestCounter, counter=metrics.requests)
    install_error_handlers(app)

    async def check_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip(), settings.api_key
        ):
            raise APIError(
                401,
                "invalid or missing API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
            )

    def check_model(name: str) -> None:
        if name != settings.served_model_name:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves "
                f"'{settings.served_model_name}'",
                "model",
                "model_not_found",
            )

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.served_model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "chitu",
                    "max_model_len": engine.max_model_len,
                }
            ],
        }

    def sampling_params(
        req: ChatCompletionRequest | CompletionRequest, prompt_len: int, index: int
    ) -> SamplingParams:
        max_tokens = req.output_limit()
        if max_tokens is None:
            max_tokens = engine.max_model_len - prompt_len
        if prompt_len + max_tokens > engine.max_model_len:
            raise APIError(
                400,
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"the context of {engine.max_model_len} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=req.temperature,
                # float32 turns a top_p below ~1e-45 into 0, which the samplers reject (a failed
                # step, 500); any top_p below the top token's probability keeps that token only.
                top_p=max(req.top_p, _MIN_TOP_P),
                top_k=req.top_k,
                min_p=req.min_p,
                seed=None if req.seed is None else (req.seed + index) % 2**63,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty,
                stop=req.stop_strings(),
                stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
                logprobs=req.num_logprobs(),
            )
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_value") from exc

    def check_ids(ids: list[int]) -> list[int]:
        try:
            engine.engine.check_prompt(ids)
        except ValueError as exc:
            code = "context_length_exceeded" if "context" in str(exc) else "invalid_value"
            raise APIError(400, str(exc), "prompt", code) from exc
        return ids

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprobs(entries: list[tuple[int, TokenLogprobs]]) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                item(t.token_id, t.logprob) | {"top_logprobs": [item(i, lp) for i, lp in t.top]}
                for _, t in entries
            ]
        }

    def completion_logprobs(entries: list[tuple[int, TokenLogprobs]], offset: int = 0) -> dict:
        tokens = [token_text(t.token_id) for _, t in entries]
        offsets, position = [], offset
        for text in tokens:
            offsets.append(position)
            position += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [t.logprob for _, t in entries],
            "top_logprobs": [{token_text(i): lp for i, lp in t.top} for _, t in entries],
            "text_offset": offsets,
        }

    async def run_choice(
        index: int, ids: list[int], params: SamplingParams, sink: asyncio.Queue
    ) -> None:
        started, last = time.perf_counter(), None
        try:
            async for out in engine.generate(ids, params):
                now = time.perf_counter()
                if last is None:
                    metrics.ttft.observe(now - started)
                else:
                    metrics.inter_token.observe(now - last)
                last = now
                metrics.generation_tokens.inc()
                await sink.put((index, out))
        except (RequestFailed, EngineStopped) as exc:
            await sink.put((index, exc))

    async def outputs(
        jobs: list[tuple[list[int], SamplingParams]],
    ) -> AsyncIterator[tuple[int, Any]]:
        """Merge the outputs of every choice; cancelling this generator aborts them all."""
        sink: asyncio.Queue = asyncio.Queue()
        tasks = [
            asyncio.create_task(run_choice(i, ids, p, sink)) for i, (ids, p) in enumerate(jobs)
        ]
        remaining = len(jobs)
        try:
            while remaining:
                index, out = await sink.get()
                if isinstance(out, Exception) or out.finished:
                    remaining -= 1
                yield index, out
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def failure(exc: Exception) -> APIError:
        status = 503 if isinstance(exc, EngineStopped) else 500
        return APIError(status, str(exc), code="engine_error")

    async def accumulate(jobs) -> list[_Choice]:
        choices = [_Choice() for _ in jobs]
        async for index, out in outputs(jobs):
            if isinstance(out, Exception):
                raise failure(out)
            choice = choices[index]
            choice.text.append(out.text)
            choice.num_tokens = out.num_output_tokens
            if out.logprobs is not None:
                choice.logprobs.append((out.token_id, out.logprobs))
            if out.finished:
                choice.finish_reason = out.finish_reason
        return choices

    async def disconnected(request: Request) -> None:
        """Returns once the client has gone (the body is read: only http.disconnect is left)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def collect(jobs, request: Request) -> list[_Choice] | None:
        """The finished choices, or None if the client went away first (they are aborted:
        a non-streaming client that times out must not keep its sequences generating)."""
        work = asyncio.ensure_future(accumulate(jobs))
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)
        return None if work.cancelled() else work.result()

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    async def stream(jobs, prompt_tokens: int, include_usage: bool, chunk) -> AsyncIterator[str]:
        completion_tokens = [0] * len(jobs)
        async for index, out in outputs(jobs):
            if isinstance(out, Exception):
                err = failure(out)
                yield sse(error_body(err.status, err.message, code=err.code))
                return
            completion_tokens[index] = out.num_output_tokens
            logprobs = [(out.token_id, out.logprobs)] if out.logprobs is not None else None
            if out.text or logprobs:
                yield sse(chunk(index, out.text, logprobs, None))
            if out.finished:
                yield sse(chunk(index, None, None, out.finish_reason))
        if include_usage:
            yield sse(
                chunk(None, None, None, None)
                | {"usage": usage(prompt_tokens, sum(completion_tokens))}
            )
        yield sse("[DONE]")

    def streaming_response(body: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        messages = [
            {"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
            for m in req.messages
        ]
        try:
            ids = check_ids(tokenizer.encode_chat(messages))
        except TokenizerError as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}", "messages") from exc
        jobs = [(ids, sampling_params(req, len(ids), i)) for i in range(req.n)]
        metrics.prompt_tokens.inc(len(ids))
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": request_id, "created": created, "model": settings.served_model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            sent_role = set()

            def chunk(index, text, logprobs, finish_reason):
                if index is None:
                    return base | {"object": "chat.completion.chunk", "choices": []}
                delta = {} if finish_reason else {"content": text}
                if index not in sent_role:
                    sent_role.add(index)
                    delta = {"role": "assistant"} | delta
                choice = {
                    "index": index,
                    "delta": delta,
                    "finish_reason": finish_reason,
                    "logprobs": chat_logprobs(logprobs) if logprobs else None,
                }
                return (
                    base
                    | {"object": "chat.completion.chunk", "choices": [choice]}
                    | ({"usage": None} if include_usage else {})
                )

            return streaming_response(stream(jobs, len(ids), include_usage, chunk))
        choices = await collect(jobs, request)
        if choices is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(
            base
            | {
                "object": "chat.completion",
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": "".join(c.text)},
                        "logprobs": chat_logprobs(c.logprobs) if req.logprobs else None,
                        "finish_reason": c.finish_reason,
                    }
                    for i, c in enumerate(choices)
                ],
                "usage": usage(len(ids), sum(c.num_tokens for c in choices)),
            }
        )

    @app.post("/v1/completions", dependencies=[Depends(check_api_key)])
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompts = [
            check_ids(tokenizer.encode(p) if isinstance(p, str) else list(p)) for p in req.prompts()
        ]
        jobs = [(ids, sampling_params(req, len(ids), j)) for ids in prompts for j in range(req.n)]
        prompt_tokens = sum(len(ids) for ids in prompts)
        metrics.prompt_tokens.inc(prompt_tokens)
        base = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": settings.served_model_name,
        }
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(index, text, logprobs, finish_reason):
                if index is None:
                    return base | {"object": "text_completion", "choices": []}
                choice = {
                    "index": index,
                    "text": text or "",
                    "finish_reason": finish_reason,
                    "logprobs": completion_logprobs(logprobs) if logprobs else None,
                }
                return (
                    base
                    | {"object": "text_completion", "choices": [choice]}
                    | ({"usage": None} if include_usage else {})
                )

            return streaming_response(stream(jobs, prompt_tokens, include_usage, chunk))
        choices = await collect(jobs, request)
        if choices is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(
            base
            | {
                "object": "text_completion",
                "choices": [
                    {
                        "index": i,
                        "text": "".join(c.text),
                        "finish_reason": c.finish_reason,
                        "logprobs": completion_logprobs(c.logprobs)
                        if req.logprobs is not None
                        else None,
                    }
                    for i, c in enumerate(choices)
                ],
                "usage": usage(prompt_tokens, sum(c.num_tokens for c in choices)),
            }
        )

    return app
