"""TTFT of the shared-prefix workload with and without Chitu's prefix cache, back to back.

Starts ``chitu serve`` (the built-in demo model unless ``--model``) once per
configuration in ``--order`` (``on`` = default prefix caching, ``off`` =
``--no-prefix-caching``), runs ``benchmark_serving.py``'s shared-prefix workload
against it with greedy sampling, reads the prefix-cache counters from /metrics,
stops it, and compares the generated texts of the runs request by request.

    python benchmarks/prefix_cache_ttft.py --order on,off,on --json out.json \\
        -- --skip-conformance

Arguments after ``--`` go to ``chitu serve``. The runs share the machine with
whatever else runs on it; ``--order on,off,on`` shows how much the load drifted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from benchmark_serving import BenchConfig, run_benchmark

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30, trust_env=False).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def _start(model: str | None, caching: bool, server_args: list[str], log: Path):
    port = _free_port()
    cmd = [sys.executable, "-m", "chitu_core", "serve", *([model] if model else [])]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *server_args]
    if not caching:
        cmd.append("--no-prefix-caching")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chitu serve exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return proc, url, cmd
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"chitu serve not healthy in 900 s; see {log}")


def run_one(args: argparse.Namespace, caching: bool, log: Path) -> dict:
    """One server, one benchmark run: its TTFT figures, counters and texts."""
    proc, url, cmd = _start(args.model, caching, args.server_args, log)
    try:
        model = httpx.get(url + "/v1/models", timeout=30, trust_env=False).json()["data"][0]["id"]
        cfg = BenchConfig(
            model=model,
            base_url=url,
            endpoint="chat",
            concurrency_levels=(args.concurrency,),
            num_prompts=args.num_prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            num_warmup=1,
            seed=args.seed,
            ignore_eos=True,
            shared_prefix_len=args.shared_prefix_len,
            temperature=0.0,
        )
        load_before = os.getloadavg()[0]
        (report,) = run_benchmark(cfg, show_progress=False)
        hits = _metric(url, "chitu_prefix_cache_hits_total")
        queries = _metric(url, "chitu_prefix_cache_queries_total")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return {
        "prefix_caching": caching,
        "server_command": " ".join(cmd[2:]),
        "num_ok": report.num_ok,
        "num_failed": report.num_failed,
        "mean_prompt_tokens": report.mean_prompt_tokens,
        "duration_s": report.duration_s,
        "ttft_ms": {k: round(v, 1) for k, v in vars(report.ttft).items()} if report.ttft else None,
        "tpot_mean_ms": report.tpot.mean_ms if report.tpot else None,
        "prefix_cache_query_tokens": queries,
        "prefix_cache_hit_tokens": hits,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "texts": [r.text for r in report.results],
        "output_tokens": [r.output_tokens for r in report.results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", help="model directory (default: chitu serve's demo model)")
    add("--order", default="on,off", help="runs in order: on/off, e.g. on,off,on")
    add("--shared-prefix-len", type=int, default=330, help="system prompt words (~3 tokens each)")
    add("--input-len", type=int, default=21, help="question words (~3 demo tokens each)")
    add("--num-prompts", type=int, default=64)
    add("--concurrency", type=int, default=16)
    add("--output-len", type=int, default=16)
    add("--seed", type=int, default=0)
    add("--json", metavar="PATH", help="write the runs and the comparison here")
    add("--log-dir", default="/tmp", help="where the servers' logs go")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.server_args = argv[cut + 1 :]
    order = [part.strip() for part in args.order.split(",")]
    if not order or any(part not in ("on", "off") for part in order):
        parser.error(f"--order takes on/off items, got {args.order!r}")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs = []
    for k, part in enumerate(order):
        log = Path(args.log_dir) / f"prefix-cache-ttft-{k}-{part}.log"
        runs.append(run_one(args, part == "on", log))
        ttft = runs[-1]["ttft_ms"]
        print(f"run {k} caching {part}: mean TTFT {ttft and ttft['mean_ms']} ms", flush=True)
    on = [r for r in runs if r["prefix_caching"]]
    off = [r for r in runs if not r["prefix_caching"]]
    mean = lambda rs: sum(r["ttft_ms"]["mean_ms"] for r in rs) / len(rs)  # noqa: E731
    texts = {json.dumps(r["texts"]) for r in runs}
    summary = {
        "mean_ttft_ms_on": mean(on) if on else None,
        "mean_ttft_ms_off": mean(off) if off else None,
        "ratio_on_off": mean(on) / mean(off) if on and off else None,
        "identical_outputs": len(texts) == 1,
        "num_identical_requests": sum(
            len({r["texts"][i] for r in runs}) == 1 for i in range(args.num_prompts)
        ),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        result = {
            "started_at": started,
            "command": "python benchmarks/prefix_cache_ttft.py " + " ".join(argv),
            "workload": {
                k: getattr(args, k)
                for k in ("shared_prefix_len", "input_len", "num_prompts", "concurrency")
            }
            | {"output_len": args.output_len, "temperature": 0.0, "endpoint": "chat"},
            "cpu_count": os.cpu_count(),
            "summary": summary,
            "runs": runs,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if summary["identical_outputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
