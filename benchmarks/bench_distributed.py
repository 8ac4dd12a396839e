"""Per-token decode time under tensor / pipeline parallelism on this host.

Each layout (``TPxPP``) runs in a fresh ``python bench_distributed.py --run``
process that launches its ranks the way ``chitu serve --tp N`` does (spawned
on this host, gloo on the CPU, NCCL/HCCL on accelerators through the
backend's ``dist_backend``). Rank 0 prefills ``--batch`` random prompts, then
times the decode: milliseconds per generated token. Figures, not assertions: on a 2-core CPU TP cannot
be faster (the ranks share the cores); the point is that it runs and what
the collectives cost per token. Every rank gets ``--threads-per-rank``
threads (default 1: with more, OpenMP's spinning threads of several ranks on
a busy 2-core host make any comparison meaningless). Each batch size is timed
twice on the same engine: first with serial steps (each decode step's tokens
read back before the next step is queued), then as configured (by default the
next decode step is queued first, ``EngineConfig.overlap_steps``); the line
prints the ratio.

With ``--profile-dir DIR`` rank 0 of each layout in ``--profile-layouts``
(default: all) also runs ``--profile-steps`` decode steps of the largest batch
under ``torch.profiler`` after the timing, writes the trace
(``DIR/trace-TPxPP-bBATCH.json.gz``) and prints where a decode step's device
time goes: NCCL kernels (``nccl`` in the name), GEMMs, attention, other; NCCL
all-reduce microseconds per layer and per call; device-busy time against the
step's wall time (what is left is host work and waiting); and whether the
decode steps replayed CUDA graphs. CUPTI traces the kernels inside a CUDA
graph replay, so the split holds with graphs; ``--enforce-eager`` profiles
(and times) eager decode instead. NCCL kernel time on rank 0 includes waiting
for the slower rank to reach the same collective.

    python benchmarks/bench_distributed.py [--backend cpu_ref] [--size small]
        [--layouts 1x1 2x1 1x2] [--batch 1,32] [--prompt-len 16] [--new-tokens 16]
        [--threads-per-rank 1] [--json out.json] [--enforce-eager] [--no-overlap-steps]
        [--profile-dir DIR] [--profile-layouts 2x1] [--profile-steps 8]
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chitu_core.demo_model import write_demo_model
from chitu_core.distributed.launch import run_ranks
from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.engine.sampling import SamplingParams


@dataclass
class DecodeRun:
    """One ``decode_times_ms`` run: the figures and what the decode phase's steps did."""

    prefill_ms: float
    ms_per_token: float  # decode phase wall / tokens it returned
    tokens: list[list[int]]  # each sequence's tokens, in request order
    step_ms: list[float] = field(default_factory=list)  # wall of each decode-phase step()
    gc_ms: float = 0.0  # of which Python's garbage collector ran
    gc_collections: int = 0

    def step_summary(self) -> dict:
        """Median / p90 / max decode-step wall (ms) and the slowest step's index."""
        if not self.step_ms:
            return {}
        ordered = sorted(self.step_ms)
        slowest = max(range(len(self.step_ms)), key=self.step_ms.__getitem__)
        return {
            "median_step_ms": statistics.median(ordered),
            "p90_step_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "max_step_ms": ordered[-1],
            "slowest_step": slowest,
            "steps": len(ordered),
            "gc_ms": self.gc_ms,
            "gc_collections": self.gc_collections,
        }


class _GcClock:
    """Time spent in Python's garbage collector while in the ``with`` block."""

    def __init__(self) -> None:
        self.ms, self.collections, self._start = 0.0, 0, 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._start) * 1e3
            self.collections += 1

    def __enter__(self) -> _GcClock:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info) -> None:
        gc.callbacks.remove(self._callback)


def decode_times_ms(engine: LLMEngine, batch: int, prompt_len: int, new_tokens: int) -> DecodeRun:
    """Prefill ``batch`` random prompts of ``prompt_len`` tokens, then decode greedily.

    The prefill phase lasts until every sequence has its first token; the decode
    phase counts the tokens the steps after it return (with PP a step moves one
    sequence group, so steps are not counted, tokens are), and records each step's
    wall time and the garbage collector's share of the phase. The prompts are the
    same on every call with the same arguments.
    """
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config["vocab_size"]
    ids = []
    for _ in range(batch):
        prompt = torch.randint(0, vocab - 8, (prompt_len,), generator=gen).tolist()
        ids.append(engine.add_request(prompt, params))
    outputs: dict[int, list[int]] = {seq_id: [] for seq_id in ids}
    start = time.perf_counter()
    while any(not out for out in outputs.values()):
        for out in engine.step():
            outputs[out.seq_id].append(out.token_id)
    prefill_ms = (time.perf_counter() - start) * 1e3
    tokens, step_ms = 0, []
    with _GcClock() as gc_clock:
        start = last = time.perf_counter()
        while engine.has_unfinished():
            step = engine.step()
            now = time.perf_counter()
            step_ms.append((now - last) * 1e3)
            last = now
            tokens += len(step)
            for out in step:
                outputs[out.seq_id].append(out.token_id)
        ms = (time.perf_counter() - start) * 1e3 / max(tokens, 1)
    return DecodeRun(
        prefill_ms,
        ms,
        [outputs[seq_id] for seq_id in ids],
        step_ms,
        gc_clock.ms,
        gc_clock.collections,
    )


# -- profile of a few decode steps --------------------------------------------------------
# Device kernels by name (lower case); the first category whose pattern matches wins.
KERNEL_CATEGORIES = (
    # Collectives: NCCL's kernels and any other all-reduce kernel (e.g. torch symmetric memory).
    ("nccl", ("nccl", "all_reduce", "allreduce")),
    ("attention", ("attn", "attention", "paged_decode", "paged_prefill", "mla_decode", "flash")),
    (
        "gemm",
        (
            "gemm", "gemv", "fp8_mm", "fp8_wide", "splitk_reduce", "dequant_kernel", "moe_gate_up",
            "moe_down", "nvjet", "cutlass", "cublas", "xmma", "matmul", "sm90_", "sm80_",
        ),
    ),
)  # fmt: skip
DEVICE_EVENT_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def kernel_category(name: str) -> str:
    lower = name.lower()
    for category, patterns in KERNEL_CATEGORIES:
        if any(p in lower for p in patterns):
            return category
    return "other"


def nccl_op(name: str) -> str:
    """``allreduce``, ``allgather``, ``reducescatter``, ``sendrecv`` or ``other`` of an NCCL kernel."""
    lower = name.lower().replace("_", "")
    for op in ("allreduce", "allgather", "reducescatter", "sendrecv", "broadcast"):
        if op in lower:
            return op
    return "sendrecv" if "send" in lower or "recv" in lower else "other"


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize_trace(events: list[dict], steps: int, num_layers: int) -> dict:
    """Per-step device time of a Chrome trace's ``traceEvents`` covering ``steps`` decode
    steps of a model with ``num_layers`` layers on this rank (microseconds)."""
    steps = max(steps, 1)
    device = [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_EVENT_CATEGORIES]
    by_cat: dict[str, float] = {c: 0.0 for c, _ in KERNEL_CATEGORIES} | {"other": 0.0}
    nccl_us: dict[str, float] = {}
    nccl_calls: dict[str, int] = {}
    by_name: dict[str, list[float]] = {}
    for e in device:
        name, dur = e.get("name", "?"), float(e.get("dur", 0.0))
        category = kernel_category(name) if e["cat"] == "kernel" else "other"
        by_cat[category] += dur
        if category == "nccl":
            op = nccl_op(name)
            nccl_us[op] = nccl_us.get(op, 0.0) + dur
            nccl_calls[op] = nccl_calls.get(op, 0) + 1
        slot = by_name.setdefault(name, [0.0, 0])
        slot[0] += dur
        slot[1] += 1
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    graph_launches = sum("graphlaunch" in e.get("name", "").lower() for e in runtime)
    kernel_launches = sum("launchkernel" in e.get("name", "").lower() for e in runtime)
    total = sum(by_cat.values())
    allreduce = nccl_us.get("allreduce", 0.0)
    allreduce_calls = nccl_calls.get("allreduce", 0)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:10]
    return {
        "steps": steps,
        "num_layers": num_layers,
        "device_us_per_step": total / steps,
        "us_per_step": {c: t / steps for c, t in by_cat.items()},
        "busy_us_per_step": _busy_us(
            [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in device]
        )
        / steps,
        "kernels_per_step": len(device) / steps,
        "nccl_us_per_step": {op: t / steps for op, t in nccl_us.items()},
        "nccl_calls_per_step": {op: n / steps for op, n in nccl_calls.items()},
        "allreduce_us_per_layer": allreduce / steps / max(num_layers, 1),
        "allreduce_us_per_call": allreduce / allreduce_calls if allreduce_calls else 0.0,
        "nccl_us_per_layer": by_cat["nccl"] / steps / max(num_layers, 1),
        "graph_launches_per_step": graph_launches / steps,
        "kernel_launches_per_step": kernel_launches / steps,
        "top_kernels": [
            {"name": n[:100], "us_per_step": t / steps, "calls_per_step": c / steps}
            for n, (t, c) in top
        ],
    }


def format_profile(layout: str, batch: int, p: dict) -> list[str]:
    """The printed summary of ``summarize_trace``'s result (plus ``wall_ms_per_step``...)."""
    us = p["us_per_step"]
    total = p["device_us_per_step"]
    lines = [
        f"profile {layout} batch {batch}, rank 0, {p['steps']} decode steps launched in"
        f" {p.get('step_calls', p['steps'])} step() calls ({p['mode']}; decode graphs captured:"
        f" {p['decode_graphs'] or 'no'}):"
    ]
    if not total:
        lines.append("  no device kernels in the trace (a CPU run): see the trace for host ops")
        return lines
    wall = p["wall_ms_per_step"] * 1e3
    split = ", ".join(
        f"{c} {us[c]:.0f} us ({100 * us[c] / total:.0f}%)"
        for c in ("nccl", "gemm", "attention", "other")
    )
    lines.append(f"  device time per step {total:.0f} us: {split}")
    lines.append(
        f"  wall per step {wall:.0f} us (under the profiler), device busy {p['busy_us_per_step']:.0f} us"
        f" ({100 * p['busy_us_per_step'] / wall:.0f}%): {wall - p['busy_us_per_step']:.0f} us of"
        " host work / waiting per step"
    )
    calls = ", ".join(f"{op} {n:g}" for op, n in sorted(p["nccl_calls_per_step"].items()))
    lines.append(
        f"  NCCL all-reduce us per layer {p['allreduce_us_per_layer']:.1f} "
        f"({p['num_layers']} layers on this rank), per all-reduce call "
        f"{p['allreduce_us_per_call']:.1f} us; all NCCL per layer {p['nccl_us_per_layer']:.1f} us;"
        f" NCCL calls per step: {calls or 'none'} (includes waiting for the other rank)"
    )
    lines.append(
        f"  per step: {p['kernels_per_step']:.0f} device kernels/copies, "
        f"{p['graph_launches_per_step']:g} CUDA graph launches, "
        f"{p['kernel_launches_per_step']:.0f} host kernel launches"
    )
    if p["graph_launches_per_step"] and p["kernels_per_step"] < p["num_layers"]:
        lines.append(
            "  NOTE: kernels inside the graphs were not traced; rerun with --enforce-eager "
            "for the per-kernel split"
        )
    for k in p["top_kernels"][:6]:
        lines.append(
            f"    {k['us_per_step']:8.1f} us/step {k['calls_per_step']:6.1f} calls  {k['name'][:80]}"
        )
    return lines


def profile_decode(engine: LLMEngine, batch: int, prompt_len: int, steps: int, trace: Path) -> dict:
    """Rank 0: ``steps`` calls of ``engine.step()`` on ``batch`` fresh decoding sequences under
    torch.profiler (after their prefill and two untraced decode steps); the trace goes to
    ``trace`` (gzipped) and the summary is returned.

    The window starts with nothing queued on the device and ends when the device is idle,
    so it holds exactly the forward steps launched in it: with queued-ahead steps one more
    than the calls. Per-step figures divide by that count (``device_steps``).
    """
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(1)
    vocab = engine.model_config["vocab_size"]
    for _ in range(batch):
        engine.add_request(
            torch.randint(0, vocab - 8, (prompt_len,), generator=gen).tolist(), params
        )
    started: set[int] = set()
    while len(started) < batch:
        started |= {out.seq_id for out in engine.step()}
    engine.step()
    overlap, engine.overlap_steps = engine.overlap_steps, False
    engine.step()  # returns the step queued ahead, if any, and queues none
    engine.overlap_steps = overlap
    on_device = engine.device.type != "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    engine.ops.synchronize(engine.device)
    executor, launched = engine.executor, 0
    execute = executor.execute

    def counted(*args, **kwargs):
        nonlocal launched
        launched += 1
        return execute(*args, **kwargs)

    executor.execute = counted
    done = 0
    try:
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            while done < steps and engine.has_unfinished():
                engine.step()
                done += 1
            engine.ops.synchronize(engine.device)
            wall_s = time.perf_counter() - start
    finally:
        del executor.execute  # the class's method again
    while engine.has_unfinished():
        engine.step()
    trace.parent.mkdir(parents=True, exist_ok=True)
    raw = trace.with_suffix("")  # .json
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
        shutil.copyfileobj(src, dst)
    events = json.loads(raw.read_text()).get("traceEvents", [])
    raw.unlink()
    device_steps = max(launched, 1)
    summary = summarize_trace(events, device_steps, len(engine.runner.kv_caches))
    graphs = engine.runner.graphs
    summary |= {
        "step_calls": done,
        "wall_ms_per_step": wall_s * 1e3 / device_steps,
        "decode_graphs": graphs.buckets if graphs is not None else None,
        "mode": "eager (--enforce-eager)"
        if engine.config.enforce_eager
        else ("CUDA graphs" if graphs is not None else "eager (no graphs in this layout)"),
        "trace": str(trace),
    }
    return summary


def run_layout(args: argparse.Namespace) -> int:
    """``--run``: one layout; rank 0 writes its figure to ``--json``."""
    batches = [int(b) for b in args.batch.split(",")]
    config = EngineConfig(
        model=args.model,
        backend=args.backend,
        num_blocks=max(batches) * -(-(args.prompt_len + args.new_tokens) // 16) + 1,
        max_num_seqs=max(64, max(batches)),
        show_progress=False,
        tp=args.tp,
        pp=args.pp,
        dist_timeout_s=120.0,
        enforce_eager=args.enforce_eager,
        overlap_steps=not args.no_overlap_steps,
    )

    def measure() -> int:
        results = []
        with LLMEngine(config) as engine:
            graphs = engine.runner.graphs
            decode_times_ms(engine, 1, args.prompt_len, 4)  # warm-up: first calls compile
            for batch in batches:
                # A few steps at this batch size first, so that neither timing below pays
                # for first calls (kernel compiles for new shapes, eager layouts).
                decode_times_ms(engine, batch, args.prompt_len, 4)
                # Baseline first, same engine: every decode step read back before the next.
                engine.overlap_steps = False
                serial = decode_times_ms(engine, batch, args.prompt_len, args.new_tokens)
                engine.overlap_steps = config.overlap_steps
                run = decode_times_ms(engine, batch, args.prompt_len, args.new_tokens)
                prefill, ms = run.prefill_ms, run.ms_per_token
                result = {
                    "tp": args.tp,
                    "pp": args.pp,
                    "batch": batch,
                    "device": str(engine.device),
                }
                result |= {"prompt_len": args.prompt_len, "prefill_ms": prefill}
                # ms_per_batch_step: every sequence one token further (the inter-token latency)
                result |= {"ms_per_token": ms, "ms_per_batch_step": ms * batch}
                result |= {"tokens_per_s": 1e3 / ms, "threads_per_rank": torch.get_num_threads()}
                result |= {"overlap_steps": config.overlap_steps}
                result["tokens_per_s_no_overlap"] = 1e3 / serial.ms_per_token
                result |= run.step_summary()
                # Greedy on the same prompts: the two runs must give the same tokens.
                result["same_tokens_as_serial"] = run.tokens == serial.tokens
                result["decode_graphs"] = graphs.buckets if graphs is not None else None
                results.append(result)
            if args.profile_dir:
                batch = max(batches)
                trace = Path(args.profile_dir) / f"trace-{args.tp}x{args.pp}-b{batch}.json.gz"
                row = next(r for r in results if r["batch"] == batch)
                try:  # the timings above are kept whatever happens here
                    row["profile"] = profile_decode(
                        engine, batch, args.prompt_len, args.profile_steps, trace
                    )
                except Exception as exc:
                    row["profile_error"] = f"{type(exc).__name__}: {exc}"
        Path(args.json).write_text(json.dumps(results))
        return 0

    return run_ranks(config, measure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cpu_ref")
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--model", help="checkpoint directory (default: a demo DeepSeek-V3 FP8)")
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"], help="TPxPP")
    parser.add_argument("--batch", default="1", help="batch size, or a list: 1,32")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="decode without CUDA graphs (every layout)"
    )
    parser.add_argument(
        "--no-overlap-steps",
        action="store_true",
        help="time (and profile) decode without queuing each step ahead (every layout)",
    )
    parser.add_argument(
        "--profile-dir", help="profile decode on rank 0 after the timing; traces go here"
    )
    parser.add_argument(
        "--profile-layouts", nargs="+", help="layouts to profile (default: every one run)"
    )
    parser.add_argument(
        "--profile-steps", type=int, default=8, help="decode steps profiled (default 8)"
    )
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return run_layout(args)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(write_demo_model(Path(tmp) / "model", "deepseek_v3", args.size))
        results = []
        for layout in args.layouts:
            tp, pp = (int(n) for n in layout.lower().split("x"))
            out = Path(tmp) / f"{layout}.json"
            cmd = [sys.executable, __file__, "--run", "--model", model, "--backend", args.backend]
            cmd += ["--tp", str(tp), "--pp", str(pp), "--batch", args.batch]
            cmd += ["--new-tokens", str(args.new_tokens), "--json", str(out)]
            cmd += ["--prompt-len", str(args.prompt_len)]
            if args.enforce_eager:
                cmd += ["--enforce-eager"]
            if args.no_overlap_steps:
                cmd += ["--no-overlap-steps"]
            if args.profile_dir and (
                args.profile_layouts is None or layout.lower() in args.profile_layouts
            ):
                cmd += ["--profile-dir", args.profile_dir]
                cmd += ["--profile-steps", str(args.profile_steps)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank)}
            subprocess.run(cmd, check=True, env=env)
            for result in json.loads(out.read_text()):
                results.append(result)
                print(
                    f"TP={tp} PP={pp} batch {result['batch']} on {result['device']} "
                    f"({result['threads_per_rank']} threads/rank): decode "
                    f"{result['tokens_per_s']:.1f} tokens/s, {result['ms_per_token']:.2f} ms per "
                    f"token ({result['ms_per_batch_step']:.1f} ms between a sequence's tokens); "
                    f"prefill of {result['batch']} x {args.prompt_len} tokens "
                    f"{result['prefill_ms']:.0f} ms; decode graphs "
                    f"{result['decode_graphs'] or 'off'}; steps "
                    + (
                        f"overlapped: {result['tokens_per_s'] / result['tokens_per_s_no_overlap']:.2f}x "
                        f"the {result['tokens_per_s_no_overlap']:.1f} tokens/s of serial steps, "
                        f"same greedy tokens: {result['same_tokens_as_serial']}"
                        if result["overlap_steps"]
                        else "serial"
                    ),
                    flush=True,
                )
                if "median_step_ms" in result:
                    print(
                        f"  decode steps: median {result['median_step_ms']:.2f} ms, p90 "
                        f"{result['p90_step_ms']:.2f}, max {result['max_step_ms']:.2f} (step "
                        f"{result['slowest_step']} of {result['steps']}); garbage collector "
                        f"{result['gc_ms']:.1f} ms in {result['gc_collections']} collections",
                        flush=True,
                    )
                if "profile_error" in result:
                    print(f"profile {layout}: failed: {result['profile_error']}", flush=True)
                if "profile" in result:
                    print("\n".join(format_profile(layout, result["batch"], result["profile"])))
                    print(f"  trace: {result['profile']['trace']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
