"""Start-up memory split: KV budget from free memory, weight bytes, the log line."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from chitu_core.demo_model import write_demo_model
from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.engine.memory_plan import (
    DEFAULT_MAX_NUM_SEQS,
    GIB,
    MIN_DEFAULT_MAX_NUM_SEQS,
    MemoryPlan,
    choose_max_num_seqs,
    choose_num_blocks,
    profile_prefill,
    tensor_bytes,
)
from chitu_core.models.base import KVCacheLayout

LAYOUT = KVCacheLayout(num_layers=2, num_kv_heads=2, key_dim=64, value_dim=64)  # 1 KiB/token bf16


def _ops(free: int, total: int):
    return SimpleNamespace(memory_info=lambda device: (free, total))


def test_accelerator_budget_leaves_the_utilization_headroom():
    gpu = torch.device("meta")  # any non-CPU device: the accelerator rule applies
    per_block = LAYOUT.bytes_per_token(torch.bfloat16) * 16
    blocks = choose_num_blocks(_ops(50 * GIB, 80 * GIB), gpu, LAYOUT, torch.bfloat16, 16)
    assert blocks == int(50 * GIB - 0.1 * 80 * GIB) // per_block
    blocks = choose_num_blocks(
        _ops(50 * GIB, 80 * GIB), gpu, LAYOUT, torch.bfloat16, 16, memory_utilization=0.5
    )
    assert blocks == (10 * GIB) // per_block
    capped = choose_num_blocks(
        _ops(50 * GIB, 80 * GIB), gpu, LAYOUT, torch.bfloat16, 16, max_useful_blocks=100
    )
    assert capped == 100


def test_no_room_left_names_the_option():
    with pytest.raises(ValueError, match="--gpu-memory-utilization"):
        choose_num_blocks(_ops(7 * GIB, 80 * GIB), torch.device("meta"), LAYOUT, torch.bfloat16, 16)


def test_host_budget_and_explicit_sizes():
    cpu = torch.device("cpu")
    per_block = LAYOUT.bytes_per_token(torch.bfloat16) * 16
    assert choose_num_blocks(_ops(8 * GIB, 16 * GIB), cpu, LAYOUT, torch.bfloat16, 16) == (
        2 * GIB // per_block
    )
    assert choose_num_blocks(_ops(0, 0), cpu, LAYOUT, torch.bfloat16, 16, num_blocks=7) == 7
    assert (
        choose_num_blocks(_ops(0, 0), cpu, LAYOUT, torch.bfloat16, 16, kv_cache_gb=1.0)
        == GIB // per_block
    )


@dataclass(frozen=True, eq=False)
class Handle:  # like a backend's prepared-weight handle
    weight: torch.Tensor
    scale: torch.Tensor | None


def test_tensor_bytes_counts_handles_once_and_skips_non_weights():
    shared = torch.zeros(10, dtype=torch.bfloat16)
    model = torch.nn.Module()
    model.layers = [
        Handle(torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(1, 1)),
        Handle(shared, None),
    ]
    model.lm_head = shared  # tied: counted once
    model.norm = torch.nn.Parameter(torch.ones(3))
    model.cos_sin = torch.zeros(1000)  # a rope table, not a weight
    assert tensor_bytes(model) == 32 + 4 + 20 + 12


def test_engine_logs_its_memory_plan(tmp_path, caplog):
    path = write_demo_model(tmp_path, "llama", "tiny")
    with caplog.at_level("INFO", logger="chitu_core.engine.llm_engine"):
        engine = LLMEngine(
            EngineConfig(model=path, backend="cpu_ref", num_blocks=40, show_progress=False)
        )
    plan = engine.memory
    assert plan.num_blocks == 40 and plan.weight_bytes == tensor_bytes(engine.model) > 0
    assert plan.kv_bytes == 40 * 16 * engine.model.kv_cache_layout().bytes_per_token(engine.dtype)
    assert plan.max_full_length_seqs == 39 * 16 // engine.max_model_len
    assert any("memory: weights" in r.getMessage() for r in caplog.records)
    # the profiling prefill runs on any backend (here the host) over a one-block cache
    assert profile_prefill(
        engine.model, engine.ops, engine.device, engine.dtype,
        engine.model.kv_cache_layout(), 16, 64,
    ) >= 0  # fmt: skip


def test_max_num_seqs_default_is_256_where_the_cache_holds_them():
    # 256 sequences of 1024 tokens = 16384 blocks of 16 (+ the scratch block)
    assert choose_max_num_seqs(None, 256 * 64 + 1, 16, 8192)[0] == DEFAULT_MAX_NUM_SEQS
    chosen, why = choose_max_num_seqs(None, 100 * 64 + 1, 16, 8192)
    assert chosen == 100 and "lowered" in why and "holds 100 sequences of 1024" in why
    # a short context counts its own length; a tiny cache keeps the old floor of 64
    assert choose_max_num_seqs(None, 256 * 8 + 1, 16, 128)[0] == DEFAULT_MAX_NUM_SEQS
    assert choose_max_num_seqs(None, 33, 16, 496)[0] == MIN_DEFAULT_MAX_NUM_SEQS
    assert choose_max_num_seqs(8, 10**6, 16, 8192) == (8, "--max-num-seqs")


def test_engine_reports_its_max_num_seqs_and_binds_the_fp8_mode(tmp_path, caplog):
    path = write_demo_model(tmp_path, "llama", "tiny")
    with caplog.at_level("INFO"):
        engine = LLMEngine(
            EngineConfig(
                model=path, backend="cpu_ref", num_blocks=20000, show_progress=False,
                fp8_compute="soft",
            )
        )  # fmt: skip
    assert engine.max_num_seqs == DEFAULT_MAX_NUM_SEQS == engine.memory.max_num_seqs
    assert engine.scheduler.config.max_num_seqs == DEFAULT_MAX_NUM_SEQS
    assert engine.ops.options.fp8_compute == "soft"  # the flag reaches the bound backend
    messages = [r.getMessage() for r in caplog.records]
    assert any("max_num_seqs 256 (default 256" in m for m in messages)
    assert any("fp8 compute 'soft' on backend 'cpu_ref'" in m for m in messages)


def test_describe_mentions_every_part():
    text = MemoryPlan(2 * GIB, GIB // 2, 10 * GIB, 1001, 16, 4096).describe()
    assert "weights 2.00 GiB" in text and "KV cache 10.00 GiB = 1001 blocks x 16 tokens" in text
    assert "(3 concurrent sequences of 4096 tokens)" in text


def test_profile_of_a_later_pipeline_stage_starts_from_hidden_states():
    seen = {}

    class StageModel:  # a second pipeline stage: no embedding, hidden states in
        parallel = SimpleNamespace(is_first_stage=False)
        hidden_size = 24

        def __call__(self, batch, caches, hidden_states=None):
            seen["hidden"] = hidden_states
            seen["tokens"] = batch.input_ids.shape[0]
            return hidden_states

    ops = SimpleNamespace(
        allocate_kv_cache=lambda n, bs, h, d, dtype, device: torch.zeros(n, bs, h, d, dtype=dtype),
        memory_info=lambda device: (GIB, 2 * GIB),
        synchronize=lambda device: None,
    )
    profile_prefill(StageModel(), ops, torch.device("cpu"), torch.bfloat16, LAYOUT, 16, 40)
    assert seen["tokens"] == 40
    assert seen["hidden"].shape == (40, 24) and seen["hidden"].dtype == torch.bfloat16
