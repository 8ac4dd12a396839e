"""Fixtures of the distributed tests: TP-ready tiny checkpoints, launching real rank processes.

Every run uses the CPU reference backend over gloo, in real processes on this host.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from chitu_core import demo_model
from chitu_core.demo_tokenizer import write_demo_tokenizer

HERE = Path(__file__).parent
REPO = HERE.parents[1]
RUN_TIMEOUT_S = 240.0  # one launch, start-up of every rank included (a loaded 2-core host)

# The tiny DeepSeek-V3 demo shape, resized so that TP=2 cuts every FP8 weight on its
# 128-wide scale blocks (the stock tiny one's q_b_proj has 2 x 96 rows per rank).
# q_b_proj 4 x (48 + 16) = 256 rows, o_proj 4 x 64 = 256 columns, MLP/expert/shared
# intermediate 256; kv_b_proj's 2 x 112 rows are not aligned (it is read dense). (The stock
# tiny one splits too, through zero-padded covering blocks: see test_model_parallel.py.)
TP_READY_DEEPSEEK = dict(
    vocab_size=512, hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
    q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=48, qk_rope_head_dim=16,
    v_head_dim=64, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
    n_shared_experts=1, max_position_embeddings=2048, original_max_position_embeddings=512,
)  # fmt: skip


@pytest.fixture(scope="session")
def deepseek_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DeepSeek-V3 with FP8 block weights whose TP=2 shards are 128-aligned."""
    with mock.patch.dict(demo_model._DEEPSEEK_SIZES, {"tiny": TP_READY_DEEPSEEK}):
        return demo_model.write_demo_model(
            tmp_path_factory.mktemp("dsv3_tp") / "dsv3", "deepseek_v3", "tiny"
        )


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama demo (bf16, 8 query heads, 2 KV heads)."""
    return demo_model.write_demo_model(
        tmp_path_factory.mktemp("llama_tp") / "llama", "llama", "tiny"
    )


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-MoE written by HF transformers, as an FP8 block release whose TP=2
    shards are off the 128 blocks (20 of 40 expert rows, 64 of 128 q rows per rank)."""
    pytest.importorskip("transformers", reason="transformers writes the Qwen3-MoE checkpoint")
    from hf_families import hf_checkpoint, write_fp8_checkpoint

    root = tmp_path_factory.mktemp("qwen3_moe_tp")
    src, _ = hf_checkpoint("qwen3_moe", root, vocab_size=512)
    write_fp8_checkpoint(src, root / "fp8", root / "twin")
    write_demo_tokenizer(root / "fp8", 512)
    return root / "fp8"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """torchrun's environment for ``rank`` of ``world`` on this host (one thread per rank)."""
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }


def run_world(args: list[str], world: int, log_dir: Path) -> None:
    """Run ``python *args`` as ``world`` ranks and wait; fail with the logs if any rank fails."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        log = open(log_dir / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                env=rank_env(rank, world, port),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    _wait_all(procs, logs, log_dir)


def run_torchrun(args: list[str], world: int, log_dir: Path) -> None:
    """Run ``python *args`` under ``torchrun --standalone --nproc_per_node world``."""
    torchrun = Path(sys.executable).parent / "torchrun"
    log = open(log_dir / "torchrun.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(torchrun), "--standalone", f"--nproc_per_node={world}", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    _wait_all([proc], [log], log_dir)


def _wait_all(procs: list[subprocess.Popen], logs: list, log_dir: Path) -> None:
    try:
        for proc in procs:
            proc.wait(RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    if any(proc.returncode != 0 for proc in procs):
        text = "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(log_dir.glob("*.log"))
        )
        pytest.fail(f"ranks exited with {[p.returncode for p in procs]}\n{text}")


def read_results(out: Path, index: int) -> tuple[dict, list[torch.Tensor]]:
    """What ``parity_worker.py`` wrote for its ``index``-th model."""
    tokens = json.loads((out / f"{index}.json").read_text())
    logits = load_file(out / f"{index}.safetensors")
    return tokens, [logits[f"seq{j}"] for j in range(len(logits))]
