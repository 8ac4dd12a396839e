"""Engine benchmark on the built-in demo model (CPU or any backend).

Prints decode tokens/s at batch 1 and 16 for the FP8 demo model on the chosen
backend and on the generic torch ops, and the FP8 model's weight bytes against
its bf16 twin (same random draws, not quantized). Figures, not assertions.

    python benchmarks/bench_engine.py [--backend auto] [--size small] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from chitu_core.backend import OP_NAMES
from chitu_core.demo_model import write_demo_model
from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.engine.memory_plan import tensor_bytes as weight_bytes
from chitu_core.engine.sampling import SamplingParams


def decode_tokens_per_s(
    engine: LLMEngine, batch: int, prompt_len: int = 16, new_tokens: int = 32
) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config["vocab_size"]
    for _ in range(batch):
        engine.add_request(
            torch.randint(0, vocab - 8, (prompt_len,), generator=gen).tolist(), params
        )
    engine.step()  # the prefill of every prompt
    tokens, start = 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += len(engine.step())
    engine.ops.synchronize(engine.device)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp8_dir = write_demo_model(Path(tmp) / "fp8", "deepseek_v3", args.size, fp8=True)
        bf16_dir = write_demo_model(Path(tmp) / "bf16", "deepseek_v3", args.size, fp8=False)
        common = dict(backend=args.backend, num_blocks=512, show_progress=False)
        runs = {"backend": (), "generic": tuple(OP_NAMES)}
        for label, demote in runs.items():
            engine = LLMEngine(EngineConfig(model=fp8_dir, demote_ops=demote, **common))
            name = (
                f"{engine.ops.info.name}"
                if label == "backend"
                else f"generic ops on {engine.device}"
            )
            for batch in (1, 16):
                rows[f"{label} batch {batch}"] = tps = decode_tokens_per_s(engine, batch)
                print(f"decode {name:<24} {engine.dtype}  batch {batch:>2}: {tps:8.1f} tokens/s")
        fp8_bytes = weight_bytes(
            LLMEngine(EngineConfig(model=fp8_dir, dtype="bfloat16", **common)).model
        )
        bf16_engine = LLMEngine(EngineConfig(model=bf16_dir, dtype="bfloat16", **common))
        bf16_bytes = weight_bytes(bf16_engine.model)
    rows |= {
        "fp8_weight_bytes": fp8_bytes,
        "bf16_weight_bytes": bf16_bytes,
        "ratio": fp8_bytes / bf16_bytes,
    }
    print(
        f"weights: FP8 model {fp8_bytes / 2**20:.2f} MiB, bf16 twin {bf16_bytes / 2**20:.2f} MiB, "
        f"ratio {fp8_bytes / bf16_bytes:.3f} (target <= 0.52; embeddings and norms stay bf16)"
    )
    for label in runs:
        print(
            f"{label}: batch 16 / batch 1 throughput = {rows[f'{label} batch 16'] / rows[f'{label} batch 1']:.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
