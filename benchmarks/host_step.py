"""Host work of one decode step at a given batch, with the model's device work taken out.

The engine runs as usual (scheduler, block tables, the step's host payload, the sampler,
detokenizing, stop checks) over the tiny demo Llama on ``cpu_ref``, but the forward
returns a prepared logits tensor at once: what is left of each ``step()`` is host work,
the part that must stay under 10% of a decode step at batch 256 (issue 23). On a GPU the
same work overlaps the device's step (``overlap_steps``); ``bench_e2e.py`` measures it
there as step wall time minus the wait for tokens.

    python benchmarks/host_step.py --batches 64,256
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from chitu_core.demo_model import write_demo_model
from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.engine.sampling import SamplingParams


def host_us_per_step(engine: LLMEngine, batch: int, steps: int) -> float:
    """Median wall microseconds of a decode ``step()`` of ``batch`` sequences."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request([3 + (i + j) % 400 for j in range(32)], params)
    while engine.scheduler.num_waiting:
        engine.step()
    walls = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    return 1e6 * sorted(walls)[len(walls) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    path = write_demo_model(tempfile.mkdtemp(prefix="host-step-"), "llama", "tiny")
    engine = LLMEngine(
        EngineConfig(
            model=path, backend="cpu_ref", num_blocks=8192, max_num_seqs=max(batches),
            max_model_len=256, show_progress=False,
        )
    )  # fmt: skip
    vocab = engine.model.vocab_size
    logits = {}

    def no_model(batch, hidden_states=None):  # the device's work, taken out
        rows = batch.last_token_indices.shape[0]
        if rows not in logits:
            logits[rows] = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
        return logits[rows]

    engine.runner.forward = no_model
    # one thread: the stand-in logits and the CPU sampler are device work on a GPU; their
    # intra-op threads only add waits on a loaded host
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, vocab {vocab}")
    host_us_per_step(engine, max(batches), 4)  # warm-up
    for batch in batches:
        us = host_us_per_step(engine, batch, args.steps)
        print(f"batch {batch:>4}: host work {us:8.0f} us per decode step (median)")


if __name__ == "__main__":
    main()
