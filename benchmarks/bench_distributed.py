"""Per-token decode time under tensor / pipeline parallelism on this host.

Each layout (``TPxPP``) runs in a fresh ``python bench_distributed.py --run``
process that launches its ranks the way ``chitu serve --tp N`` does (spawned
on this host, gloo on the CPU, NCCL/HCCL on accelerators through the
backend's ``dist_backend``). Rank 0 prefills ``--batch`` random prompts, then
times the decode: milliseconds per generated token. Figures, not assertions: on a 2-core CPU TP cannot
be faster (the ranks share the cores); the point is that it runs and what
the collectives cost per token. Every rank gets ``--threads-per-rank``
threads (default 1: with more, OpenMP's spinning threads of several ranks on
a busy 2-core host make any comparison meaningless).

    python benchmarks/bench_distributed.py [--backend cpu_ref] [--size small]
        [--layouts 1x1 2x1 1x2] [--batch 1,32] [--prompt-len 16] [--new-tokens 16]
        [--threads-per-rank 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from chitu_core.demo_model import write_demo_model
from chitu_core.distributed.launch import run_ranks
from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.engine.sampling import SamplingParams


def decode_times_ms(
    engine: LLMEngine, batch: int, prompt_len: int, new_tokens: int
) -> tuple[float, float]:
    """Prefill ``batch`` random prompts of ``prompt_len`` tokens, then decode.

    Returns ``(prefill ms, decode ms per generated token)``: the prefill phase
    lasts until every sequence has its first token; the decode phase counts the
    tokens the steps after it return (with PP a step moves one sequence group, so
    steps are not counted, tokens are).
    """
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config["vocab_size"]
    for _ in range(batch):
        prompt = torch.randint(0, vocab - 8, (prompt_len,), generator=gen).tolist()
        engine.add_request(prompt, params)
    started, start = set(), time.perf_counter()
    while len(started) < batch:
        started |= {out.seq_id for out in engine.step()}
    prefill_ms = (time.perf_counter() - start) * 1e3
    tokens, start = 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += len(engine.step())
    return prefill_ms, (time.perf_counter() - start) * 1e3 / max(tokens, 1)


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
    )

    def measure() -> int:
        results = []
        with LLMEngine(config) as engine:
            decode_times_ms(engine, 1, args.prompt_len, 4)  # warm-up: first calls compile
            for batch in batches:
                prefill, ms = decode_times_ms(engine, batch, args.prompt_len, args.new_tokens)
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
                results.append(result)
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
                    f"{result['prefill_ms']:.0f} ms",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
