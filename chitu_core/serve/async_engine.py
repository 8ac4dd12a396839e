"""Runs the LLMEngine in a background thread and streams its outputs to asyncio requests.

Only the engine thread touches the engine: requests and aborts reach it through
a thread-safe command queue and are applied between steps, so a long step never
blocks the event loop and many clients share every step (continuous batching).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from chitu_core.engine.llm_engine import LLMEngine, StepError, StepOutput
from chitu_core.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)


class RequestFailed(Exception):
    """The engine failed this request (e.g. a backend exception during its step)."""


class EngineStopped(Exception):
    """The server is shutting down; the request was aborted."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    seq_id: int | None = None


class AsyncEngine:
    """Thread-owning wrapper: ``async for out in engine.generate(ids, params)``."""

    def __init__(self, engine: LLMEngine, metrics: Any = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._prefix_counted = (0, 0)  # prefix-cache (queries, hits) already counted
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._keys = itertools.count()
        self._streams: dict[int, _Stream] = {}  # request key -> stream (engine thread only)
        self._by_seq: dict[int, int] = {}  # seq id -> request key (engine thread only)
        self._thread = threading.Thread(target=self._run, name="chitu-engine", daemon=True)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is still running and stop the engine thread."""
        self._stop.set()
        self._wakeup.set()
        self._thread.join(timeout)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[StepOutput]:
        """Stream the outputs of one sequence; cancelling the iteration aborts it."""
        if self._stop.is_set():
            raise EngineStopped("the server is shutting down")
        key = next(self._keys)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", key, stream, prompt_token_ids, params))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # client went away, or an error: free the KV blocks
                self._commands.put(("abort", key))
                self._wakeup.set()

    # -- engine thread -----------------------------------------------------------------
    def _deliver(self, key: int, item: Any) -> None:
        stream = self._streams.get(key)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, item)

    def _forget(self, key: int) -> None:
        stream = self._streams.pop(key, None)
        if stream is not None and stream.seq_id is not None:
            self._by_seq.pop(stream.seq_id, None)

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, key, stream, prompt, params = command
                self._streams[key] = stream
                try:
                    stream.seq_id = self.engine.add_request(prompt, params)
                    self._by_seq[stream.seq_id] = key
                except ValueError as exc:  # validated by the app already; keep the thread alive
                    self._deliver(key, RequestFailed(str(exc)))
                    self._forget(key)
            else:
                _, key = command
                stream = self._streams.get(key)
                if stream is not None and stream.seq_id is not None:
                    self.engine.abort(stream.seq_id)
                self._forget(key)

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        self.metrics.running.set(scheduler.num_running)
        self.metrics.waiting.set(scheduler.num_waiting)
        self.metrics.kv_free.set(blocks.num_free_blocks)
        self.metrics.kv_used.set(blocks.num_used_blocks)
        self.metrics.kv_cached.set(blocks.num_cached_blocks)
        # The block manager keeps totals; the counters advance by what is new.
        queries, hits = blocks.num_query_tokens, blocks.num_hit_tokens
        self.metrics.prefix_cache_queries.inc(queries - self._prefix_counted[0])
        self.metrics.prefix_cache_hits.inc(hits - self._prefix_counted[1])
        self._prefix_counted = (queries, hits)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._apply_commands()
            self._update_gauges()
            if not self.engine.has_unfinished():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except StepError as exc:
                logger.error("%s", exc)
                if self.metrics is not None:
                    self.metrics.step_errors.inc()
                for seq_id in exc.seq_ids:
                    key = self._by_seq.get(seq_id)
                    if key is not None:
                        self._deliver(
                            key, RequestFailed(f"the backend failed during generation: {exc.cause}")
                        )
                        self._forget(key)
                continue
            except Exception as exc:  # a bug outside the step's own fault handling
                logger.exception("engine step raised; failing every active request")
                if self.metrics is not None:
                    self.metrics.step_errors.inc()
                self._fail_all(RequestFailed(f"internal engine error: {type(exc).__name__}: {exc}"))
                continue
            for out in outputs:
                key = self._by_seq.get(out.seq_id)
                if key is None:
                    continue
                self._deliver(key, out)
                if out.finished:
                    self._forget(key)
        self._apply_commands()
        self._fail_all(EngineStopped("the server is shutting down"))
        self._update_gauges()

    def _fail_all(self, error: Exception) -> None:
        for key in list(self._streams):
            stream = self._streams[key]
            if stream.seq_id is not None:
                self.engine.abort(stream.seq_id)
            self._deliver(key, error)
            self._forget(key)
