"""The ``chitu`` command line: ``plugins``, ``demo``, ``generate``, ``demo-model``, ``new-backend``.

Each command is a small function; user-facing options map onto library calls here
and nowhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import json
import logging
import signal
import sys

from chitu_core.backend import OP_NAMES, compute_paths, discover_backends
from chitu_core.errors import ChituError


def _demotions(name: str) -> list[str] | None:
    from conformance.gate import cached_demotions

    demoted = cached_demotions(name)
    return None if demoted is None else list(demoted)


def _backend_rows() -> list[dict]:
    rows = []
    for backend in discover_backends().values():
        info = backend.info
        rows.append(
            {
                "name": backend.name,
                "distribution": backend.distribution,
                "version": backend.version,
                "available": backend.is_available,
                "reason": backend.load_error or backend.unavailable_reason,
                "load_error": backend.load_error is not None,
                "device_type": info.device_type if info else None,
                "dist_backend": info.dist_backend if info else None,
                "priority": info.priority if info else None,
                # the hook contract versions the plugin declares (hookspecs.CONTRACT_VERSION)
                "contract": info.contract if info else None,
                "native_ops": list(backend.native_ops),
                # None: no valid certificate on this device (serve runs conformance first)
                "demoted_ops": _demotions(backend.name) if backend.is_available else None,
                "generic_ops": [op for op in OP_NAMES if op not in backend.native_ops]
                if info
                else [],
            }
        )
    return rows


def _mark(op: str, row: dict) -> str:
    if op in (row["demoted_ops"] or ()):
        return "D"
    return "N" if op in row["native_ops"] else "."


def cmd_plugins(args: argparse.Namespace) -> int:
    """Print the installed backends, their availability and which ops are native."""
    rows = _backend_rows()
    if args.json:
        print(json.dumps({"ops": list(OP_NAMES), "backends": rows}, indent=2))
        return 0
    if not rows:
        print("no backends installed (pip install -e plugins/cpu_ref)")
        return 0
    print(f"{'backend':<12} {'distribution':<18} {'version':<9} {'device':<7} status")
    for row in rows:
        status = (
            "available"
            if row["available"]
            else ("BROKEN: " if row["load_error"] else "unavailable: ")
        )
        status += row["reason"] or ""
        if row["available"]:
            demoted = row["demoted_ops"]
            if demoted is None:
                status += " (not certified on this device yet)"
            elif demoted:
                status += f" (certified; demoted to generic: {', '.join(demoted)})"
        print(
            f"{row['name']:<12} {row['distribution']:<18} {row['version']:<9} "
            f"{row['device_type'] or '-':<7} {status}"
        )
    loaded = [row for row in rows if not row["load_error"]]
    if loaded:
        print(
            "\nops: N = native implementation, . = generic torch fallback, D = native but demoted (failed conformance)"
        )
        names = [row["name"] for row in loaded]
        width = max(len(op) for op in OP_NAMES)
        print(" " * (width + 2) + "  ".join(f"{n:^8}" for n in names))
        for op in OP_NAMES:
            marks = "  ".join(f"{_mark(op, row):^8}" for row in loaded)
            print(f"{op:<{width}}  {marks}")
    for line in compute_paths(args.fp8_compute):
        print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run one FP8 linear on a backend and compare it with the CPU reference."""
    from chitu_core.demo import run_op_demo

    print(run_op_demo(args.backend, m=args.m, n=args.n, k=args.k))
    return 0


def cmd_new_backend(args: argparse.Namespace) -> int:
    """Write a runnable backend plugin package (``chitu_core/scaffold.py``) and say what next."""
    from chitu_core.scaffold import new_backend

    root = new_backend(args.name, args.dir, args.device_type)
    print(f"created {root}: backend {args.name!r} on device type {args.device_type!r}; next:")
    print(f"  pip install -e {root}")
    print("  chitu plugins")
    print(f"  chitu conformance --backend {args.name} --quick")
    return 0


def add_fp8_compute_option(p: argparse.ArgumentParser) -> None:
    """``--fp8-compute``: engine commands, ``plugins``, conformance and the benchmarks."""
    from chitu_core.backend_info import FP8_COMPUTE_HELP, FP8_COMPUTE_MODES

    p.add_argument(
        "--fp8-compute", choices=FP8_COMPUTE_MODES, default="auto", help=FP8_COMPUTE_HELP
    )


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that builds an engine (generate, serve, bench)."""
    p.add_argument(
        "--backend",
        default="auto",
        help="backend name, or 'auto' (default): the available backend of highest priority "
        "(an accelerator's, else cpu); `chitu plugins` lists them",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="compute dtype (default: the backend's, e.g. bfloat16 on cpu and nvidia, float32 "
        "on cpu_ref); 'auto': the checkpoint's own, as "
        "transformers' dtype='auto' (config.json's dtype, a GGUF's float type), else the backend's",
    )
    p.add_argument(
        "--quantize",
        choices=["fp8"],
        help="quantize bf16 linear weights to FP8 at load (GGUF weights: dequantized, then FP8)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--num-blocks", type=int, help="KV-cache blocks (default: from free memory)")
    p.add_argument(
        "--kv-cache-gb",
        type=float,
        help="KV-cache size in GiB (default: what the memory plan leaves)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of device memory the engine may fill: weights, activations, KV cache "
        "(default 0.9)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="tokens per engine step: prefill chunk size (default 2048)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="decode without device graphs (CUDA graphs are captured by default where supported)",
    )
    p.add_argument(
        "--no-overlap-steps",
        dest="overlap_steps",
        action="store_false",
        help="read each decode step's tokens back before queuing the next step (by default the "
        "next decode step is queued first, so the device does not wait for the host)",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="compute every prompt in full (by default a request reuses the KV cache of the "
        "longest prefix, in whole blocks, that an earlier request computed: system prompts, "
        "multi-turn chat)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        help="sequences per batch (default: 256 where the KV cache holds 256 sequences of "
        "1024 tokens, fewer but at least 64 otherwise; the start-up log says which)",
    )
    add_fp8_compute_option(p)
    p.add_argument(
        "--max-model-len",
        type=int,
        help="context length, prompt + output (default: the model's, capped by the KV cache)",
    )
    p.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel ranks per pipeline stage (default 1)"
    )
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (default 1)")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        help="seconds a collective may wait before the run fails (a rank died; default 300)",
    )


def engine_config(args: argparse.Namespace, model: str):
    """Map the CLI options onto an EngineConfig (the one place that does so)."""
    from chitu_core.engine.llm_engine import EngineConfig

    return EngineConfig(
        model=model,
        backend=args.backend,
        dtype=args.dtype,
        quantize=args.quantize,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_gb=args.kv_cache_gb,
        memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        overlap_steps=args.overlap_steps,
        enable_prefix_caching=args.enable_prefix_caching,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        tp=args.tp,
        pp=args.pp,
        dist_timeout_s=args.dist_timeout,
        fp8_compute=args.fp8_compute,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """Complete one prompt and print the completion to stdout."""
    from chitu_core.demo_model import ensure_demo_model
    from chitu_core.distributed.launch import run_ranks
    from chitu_core.engine.llm_engine import LLMEngine
    from chitu_core.engine.sampling import SamplingParams

    model = args.model or str(ensure_demo_model())
    config = engine_config(args, model)

    def complete() -> int:  # rank 0 (the only rank without --tp/--pp)
        with LLMEngine(config) as engine:
            params = SamplingParams(
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
            )
            prompt = args.prompt
            if args.chat:
                prompt = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            completion = engine.generate([prompt], params)[0]
        print(completion.text)
        if args.print_token_ids:  # exact comparisons across backends and layouts
            print(json.dumps(completion.token_ids))
        return 0

    return run_ranks(config, complete)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model (default: the built-in random demo model) with the OpenAI API."""
    import os

    from chitu_core.demo_model import ensure_demo_model
    from chitu_core.distributed.launch import run_ranks
    from chitu_core.distributed.parallel import launched_as_rank
    from chitu_core.serve.server import listen_socket, serve

    # The port is taken first, by the process that will be rank 0 (see listen_socket).
    sock = None
    if not launched_as_rank() or os.environ.get("RANK") == "0":
        sock = listen_socket(args.host, args.port)
    model = args.model or str(ensure_demo_model())
    config = engine_config(args, model)

    def serve_http() -> int:  # rank 0; the other ranks follow its steps
        serve(
            config,
            host=args.host,
            port=args.port,
            api_key=args.api_key or os.environ.get("CHITU_API_KEY"),
            served_model_name=args.served_model_name,
            skip_conformance=args.skip_conformance,
            max_body_bytes=args.max_body_bytes,
            sock=sock,
            on_ready=lambda line: print(f"chitu: {line}", flush=True),
        )
        return 0

    return run_ranks(config, serve_http)


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default in ``--help``, unless its text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or any(action.default is value for value in (None, False, True, argparse.SUPPRESS))
        ):
            return text
        return text + " (default: %(default)s)"


def add_global_options(parser: argparse.ArgumentParser, top_level: bool) -> None:
    """Options accepted before the subcommand and after it (``chitu serve -v``)."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        # A subcommand's copy must not reset what was given before the subcommand.
        default=False if top_level else argparse.SUPPRESS,
        help="log at INFO level (start-up details: memory plan, graphs, certificate)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chitu", description="Chitu LLM inference engine", formatter_class=HelpFormatter
    )
    add_global_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed backends and their native ops")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_fp8_compute_option(p)
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("demo", help="run an FP8 block-128 linear on a backend vs the CPU reference")
    p.add_argument("--backend", default="auto", help="backend name or 'auto' (default)")
    p.add_argument("-m", type=int, default=4, help="tokens (rows of x)")
    p.add_argument("-n", type=int, default=1000, help="output features")
    p.add_argument("-k", type=int, default=700, help="input features")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="complete a prompt and print the completion")
    p.add_argument(
        "--model",
        help="HF-format model directory or .gguf file (default: the built-in random demo model)",
    )
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message (chat template)"
    )
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 = greedy (default: 0)",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument(
        "--print-token-ids", action="store_true", help="also print the token ids (a JSON list)"
    )
    add_engine_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible server")
    p.add_argument(
        "model",
        nargs="?",
        help="HF-format model directory or .gguf file (default: the built-in random demo model)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=21002, help="TCP port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set CHITU_API_KEY)")
    p.add_argument(
        "--served-model-name", help="model id clients use (default: the model directory name)"
    )
    p.add_argument(
        "--skip-conformance",
        action="store_true",
        help="serve without a conformance certificate (not advised). A certificate records "
        "that the backend's ops matched the CPU reference on this device; without a valid one, "
        "serve first runs `chitu conformance --quick` on the backend (once per device and "
        "version; cpu_ref, the reference itself, needs none)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest request body in bytes; larger requests get 413",
    )
    add_engine_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("new-backend", help="write a backend plugin package to start from")
    p.add_argument("name", help="backend name: lowercase letters, digits and '_'")
    p.add_argument(
        "--dir", default=".", help="where to create chitu-NAME/ (default: ., the current directory)"
    )
    p.add_argument(
        "--device-type", default="cpu", help="torch device type (default cpu: runs anywhere)"
    )
    p.set_defaults(func=cmd_new_backend)

    from chitu_core.demo_model import add_demo_model_command
    from conformance.cli import add_conformance_command

    add_conformance_command(sub)

    add_demo_model_command(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
        add_global_options(command, top_level=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(signal, "SIGUSR1"):
        # `kill -USR1 PID` prints every thread's stack to stderr: where a stuck process
        # (a server or one of its ranks) is waiting. Not where stderr is no file (captured).
        with contextlib.suppress(io.UnsupportedOperation, ValueError):
            faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ChituError, ValueError) as exc:
        print(f"chitu: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
