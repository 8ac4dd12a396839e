"""One rank of a parity run (also imported by the tests for the one-process reference).

Run as ``python parity_worker.py OUT_DIR --tp T --pp P MODEL...`` in every rank of a
torchrun-style launch (``RANK``, ``WORLD_SIZE``... set). Every rank builds its engine
shard of each model in turn; rank 0 generates ``PROMPTS`` greedily, recording the
logits each token was sampled from, and writes ``OUT_DIR/<i>.json`` (tokens) and
``OUT_DIR/<i>.safetensors`` (logits per sequence) for the ``i``-th model. The other
ranks follow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from chitu_core.distributed.parallel import shutdown
from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.engine.sampling import SamplingParams

# Three sequences of different lengths: with PP they go to two groups whose batches overlap.
# The first fills a KV block (16 tokens), so generating it again reuses the prefix cache.
PROMPTS = [
    [3, 77, 12, 400, 5, 9, 250, 31, 8, 100, 11, 60, 70, 80, 90, 13, 14, 15, 16, 17],
    [42, 7, 19],
    [300, 1, 2, 3, 4, 5, 6],
]
NUM_NEW_TOKENS = 5
DIST_TIMEOUT_S = 60.0


def engine_config(model: str | Path, tp: int = 1, pp: int = 1) -> EngineConfig:
    return EngineConfig(
        model=str(model),
        backend="cpu_ref",
        num_blocks=32,
        block_size=16,
        show_progress=False,
        tp=tp,
        pp=pp,
        dist_timeout_s=DIST_TIMEOUT_S,
    )


def generate(engine: LLMEngine) -> tuple[dict, list[torch.Tensor]]:
    """Greedy completions of PROMPTS and, per prompt, the logits ``[NUM_NEW_TOKENS, V]`` its
    tokens were sampled from (rank 0). Per sequence, not per step: with PP the engine
    batches the sequences differently (one group per stage). The dict holds the tokens
    and ``overlapped``: how many batches left the pipeline while another was in it."""
    rows: dict[int, list[torch.Tensor]] = {}
    launch_sample = engine._launch_sample
    overlapped = 0

    def recording(seqs, num_new_tokens, sample_mask, logits, scheduler):
        nonlocal overlapped
        overlapped += bool(engine._in_flight)  # another group's batch is in the pipeline
        for i, seq in enumerate(seqs):
            if sample_mask[i]:
                rows.setdefault(seq.seq_id, []).append(logits[i].clone())
        return launch_sample(seqs, num_new_tokens, sample_mask, logits, scheduler)

    engine._launch_sample = recording
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    completions = engine.generate(PROMPTS, params)
    result = {"tokens": [c.token_ids for c in completions], "overlapped": overlapped}
    return result, [torch.stack(rows[i]) for i in sorted(rows)]


def abort_in_pipeline(engine: LLMEngine, expected: list[int]) -> bool:
    """Abort requests whose batch is in the pipeline: the engine must still take it off
    (else the last stage would wait for rank 0 until its timeout) and go on serving;
    then the first prompt again, its first block from the prefix cache, same tokens."""
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(prompt, params) for prompt in PROMPTS[:2]]
    engine.step()
    was_in_pipeline = bool(engine._in_flight) or engine.dist.layout.pp == 1
    for seq_id in ids:
        engine.abort(seq_id)
    for _ in range(4):
        if not engine.has_unfinished():
            break
        engine.step()
    hits_before = engine.block_manager.num_hit_tokens
    again = engine.generate([PROMPTS[0]], params)[0].token_ids
    is_cached = engine.block_manager.num_hit_tokens - hits_before == 16
    return was_in_pipeline and not engine.has_unfinished() and again == expected and is_cached


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args(argv)
    for i, model in enumerate(args.models):
        with LLMEngine(engine_config(model, args.tp, args.pp)) as engine:
            if not engine.dist.is_driver:
                engine.follow()
                continue
            result, logits = generate(engine)
            result["abort_in_pipeline_ok"] = abort_in_pipeline(engine, result["tokens"][0])
        (args.out / f"{i}.json").write_text(json.dumps(result))
        named = {f"seq{j}": t.contiguous() for j, t in enumerate(logits)}
        save_file(named, args.out / f"{i}.safetensors")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
