"""``chitu serve``: build the engine (after the conformance gate) and run uvicorn."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn

from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.errors import ChituError
from chitu_core.serve.app import ServerSettings, create_app
from chitu_core.serve.async_engine import AsyncEngine
from chitu_core.serve.metrics import ServerMetrics

logger = logging.getLogger(__name__)


def certified_demotions(
    backend: str, skip_conformance: bool, fp8_compute: str = "auto"
) -> tuple[str, ...]:
    """Ops to demote to generic after the conformance gate (for the ``--fp8-compute`` mode
    served); () when there is no gate to run."""
    try:
        from conformance.gate import ensure_certified
    except (
        ImportError
    ):  # the conformance package is part of the distribution; guard a partial install
        logger.warning("conformance suite not importable: serving without a certificate check")
        return ()
    return tuple(ensure_certified(backend, skip=skip_conformance, fp8_compute=fp8_compute))


def resolve_backend_name(backend: str) -> str:
    """The concrete backend ``auto`` stands for (the gate certifies a named backend)."""
    from chitu_core.backend import discover_backends, select_backend

    return select_backend(backend, discover_backends()).name


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` now, for ``serve`` to hand to uvicorn.

    Taken before the model loads and before any rank is spawned: a port in use fails
    in a second with a clear message instead of after minutes of loading, and nothing
    started meanwhile (the ranks' rendezvous, gloo/NCCL listeners on ephemeral ports)
    can take the port. Connections made before the server is up wait in the backlog.
    Raises ``ChituError`` when the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as exc:
        sock.close()
        raise ChituError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def serve(
    config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 21002,
    api_key: str | None = None,
    served_model_name: str | None = None,
    skip_conformance: bool = False,
    graceful_timeout_s: float = 30.0,
    max_body_bytes: int = 4 * 1024 * 1024,
    sock: socket.socket | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the OpenAI-compatible server until SIGINT/SIGTERM.

    On SIGTERM uvicorn stops accepting connections, lets in-flight requests
    finish for up to ``graceful_timeout_s`` seconds, then the engine aborts what is
    left and its thread stops. ``sock``: a socket already listening on
    ``host:port`` (``listen_socket``); taken here when None. ``on_ready`` is called once
    the server accepts requests, with one line naming the model, URL, backend and compute
    path (the CLI prints it).
    """
    if sock is None:
        sock = listen_socket(host, port)
    backend = resolve_backend_name(config.backend)
    demote = certified_demotions(backend, skip_conformance, config.fp8_compute)
    if demote:
        logger.warning(
            "conformance: ops %s failed on this device and use the generic implementation", demote
        )
    config = EngineConfig(
        **{**config.__dict__, "backend": backend, "demote_ops": tuple(config.demote_ops) + demote}
    )
    engine = LLMEngine(config)
    if engine.is_distributed:
        # The ranks are out of step after a failed collective: nothing can be served any more.
        from chitu_core.distributed.launch import fatal

        engine.on_fatal = lambda error: fatal(f"{error}; the server cannot go on")
        engine.start_heartbeat()
    metrics = ServerMetrics()
    name = served_model_name or Path(str(config.model)).name
    app = create_app(
        AsyncEngine(engine, metrics), ServerSettings(name, api_key, max_body_bytes), metrics
    )
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logger.warning(
            "serving on %s without --api-key: anyone who can reach this port can use it", host
        )
    url_host = f"[{host}]" if ":" in host else host
    ready_line = f"serving {name} on http://{url_host}:{port}/v1 ({compute_path(engine)})"
    logger.info(ready_line)
    # uvicorn re-raises SIGTERM once its graceful shutdown is done; with the default handler
    # that kills the process (exit status -15) although it shut down cleanly. Exit 0 instead.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_cleanly) if in_main else None
    try:
        settings = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=graceful_timeout_s,
        )
        _ReadyServer(settings, on_ready and (lambda: on_ready(ready_line))).run(sockets=[sock])
    finally:
        sock.close()
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        logger.info("server stopped; closing the engine")
        engine.close()  # releases the other ranks of a distributed engine


_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def compute_path(engine: LLMEngine) -> str:
    """What serves: e.g. ``backend cpu, bf16`` or ``backend nvidia, FP8 weights, bf16``."""
    quant = engine.model_config.get("quantization_config") or {}
    fp8 = engine.config.quantize == "fp8" or quant.get("quant_method") == "fp8"
    dtype = str(engine.dtype).removeprefix("torch.")
    parts = [f"backend {engine.ops.info.name}", "FP8 weights" if fp8 else None]
    parts.append(_DTYPE_NAMES.get(dtype, dtype))
    if engine.is_distributed:
        parts.append(f"tp {engine.config.tp} pp {engine.config.pp}")
    return ", ".join(p for p in parts if p)


class _ReadyServer(uvicorn.Server):
    """uvicorn's server that calls ``on_ready`` once its start-up is done."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_ready = on_ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self._on_ready is not None and not self.should_exit:
            self._on_ready()


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
