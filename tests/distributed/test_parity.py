"""TP=2, PP=2 and TP=2 x PP=2 in real processes (gloo) match one process.

Three models run in each launch: the DeepSeek-V3 demo with FP8 block weights
(MLA heads split, MoE intermediate split, vocab-parallel head), the Llama demo
(GQA heads split, bf16) and an HF-written Qwen3-MoE FP8 release whose shards are
off the 128 blocks (zero-masked covering blocks, ``models/row_span.py``). The
greedy tokens of three prompts generated together must be identical, and the
logits each token was sampled from close: TP
changes only the order of fp32 summations (row-parallel partial sums are
all-reduced); PP batches the sequences differently (one group per stage,
overlapping in the pipeline), which changes nothing for Llama and the MoE's
summation order for DeepSeek. Measured: max |diff| about 1e-6 on logits of
magnitude ~3; LOGIT_ATOL leaves room for other BLAS builds while a wrong
shard, a missing all-reduce or a batch handed to the wrong stage moves logits
by O(1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import HERE, read_results, run_torchrun, run_world
from parity_worker import engine_config, generate

from chitu_core.engine.llm_engine import LLMEngine

LOGIT_ATOL = 1e-4


MODELS = ("deepseek_v3", "llama", "qwen3_moe")


@pytest.fixture(scope="module")
def model_dirs(deepseek_dir: Path, llama_dir: Path, qwen3_moe_dir: Path) -> list[Path]:
    return [deepseek_dir, llama_dir, qwen3_moe_dir]


@pytest.fixture(scope="module")
def references(model_dirs: list[Path]) -> dict[str, tuple]:
    """One-process greedy tokens and step logits of each model."""
    results = {}
    for name, path in zip(MODELS, model_dirs, strict=True):
        with LLMEngine(engine_config(path)) as engine:
            results[name] = generate(engine)
    return results


@pytest.mark.parametrize(
    ("tp", "pp", "launcher"),
    [(2, 1, "env"), (1, 2, "env"), (2, 2, "torchrun")],
    ids=["tp2", "pp2", "tp2xpp2-torchrun"],
)
def test_matches_one_process(tp, pp, launcher, model_dirs, references, tmp_path: Path) -> None:
    args = [str(HERE / "parity_worker.py"), str(tmp_path), *map(str, model_dirs)]
    args += ["--tp", str(tp), "--pp", str(pp)]
    if launcher == "torchrun":
        run_torchrun(args, tp * pp, tmp_path)
    else:
        run_world(args, tp * pp, tmp_path)
    for index, name in enumerate(MODELS):
        ref, ref_logits = references[name]
        result, logits = read_results(tmp_path, index)
        assert result["tokens"] == ref["tokens"], f"{name}: greedy tokens differ"
        if pp > 1:  # the two sequence groups' batches were in the pipeline together
            assert result["overlapped"] > 0
        assert result["abort_in_pipeline_ok"]
        assert [t.shape for t in logits] == [t.shape for t in ref_logits]
        diff = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits, strict=True))
        print(f"{name} tp={tp} pp={pp}: max |logit diff| = {diff:.3g}")
        assert diff < LOGIT_ATOL, f"{name}: max |logit diff| {diff:.3g}"
        assert all(torch.isfinite(t).all() for t in logits)
