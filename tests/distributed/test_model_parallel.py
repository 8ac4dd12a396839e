"""Shard plans, sharded loading and the TP collectives, in one process.

``simulate_tp`` (tests/tp_threads.py) runs the ``tp`` ranks of a TP group as
threads whose all-reduce and all-gather meet at a barrier: the sharded model
code runs exactly as in separate processes, minus the process start-up (real
processes are in test_parity.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tp_threads import simulate_tp

from chitu_core.backend import load_backend
from chitu_core.demo_model import write_demo_model
from chitu_core.distributed.model_parallel import ModelParallel, Shard, stage_layers
from chitu_core.errors import CheckpointError
from chitu_core.loader import CheckpointReader, load_model
from chitu_core.models.base import ForwardBatch

# One prefill of a 9-token prompt: rows are independent, only summation order differs.
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def ops():
    return load_backend("cpu_ref")


def _prefill(model: Any, ops: Any, prompt: list[int]) -> torch.Tensor:
    """Logits ``[1, V]`` of one prefill of ``prompt`` on a fresh cache."""
    layout = model.kv_cache_layout()
    caches = []
    for _ in range(layout.num_layers):
        key = ops.allocate_kv_cache(
            4, 16, layout.num_kv_heads, layout.key_dim, model.dtype, model.device
        )
        value = None
        if layout.value_dim is not None:
            value = ops.allocate_kv_cache(
                4, 16, layout.num_kv_heads, layout.value_dim, model.dtype, model.device
            )
        caches.append((key, value))
    n = len(prompt)
    batch = ForwardBatch(
        input_ids=torch.tensor(prompt),
        positions=torch.arange(n),
        slot_mapping=torch.arange(16, 16 + n),
        block_tables=torch.tensor([[1]], dtype=torch.int32),
        context_lens=torch.tensor([n], dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
        last_token_indices=torch.tensor([n - 1]),
        is_decode=False,
    )
    with torch.inference_mode():
        return model(batch, caches)


PROMPT = [3, 77, 12, 400, 5, 9, 250, 31, 8]


def test_llama_tp4_replicates_the_two_kv_heads(llama_dir: Path, ops) -> None:
    reference, _ = load_model(llama_dir, ops, torch.float32, show_progress=False)
    expected = _prefill(reference, ops, PROMPT)

    def rank(parallel: ModelParallel):
        model, _ = load_model(llama_dir, ops, torch.float32, show_progress=False, parallel=parallel)
        return model.kv_cache_layout().num_kv_heads, model.heads, _prefill(model, ops, PROMPT)

    results = simulate_tp(4, rank)
    assert [r[0] for r in results] == [1, 1, 1, 1]  # 2 KV heads over 4 ranks: one each
    assert [r[1].kv_start for r in results] == [0, 0, 1, 1]
    for _, _, logits in results:
        assert (logits - expected).abs().max().item() < LOGIT_ATOL


def test_stock_tiny_deepseek_fp8_splits_off_the_128_blocks(tmp_path: Path, ops) -> None:
    """Its q_b_proj has 2 x 96 rows and o_proj 2 x 64 columns per rank: each rank holds
    the zero-masked covering blocks (models/row_span.py) and matches one process."""
    path = write_demo_model(tmp_path / "ds", "deepseek_v3", "tiny")
    reference, _ = load_model(path, ops, torch.float32, show_progress=False)
    expected = _prefill(reference, ops, PROMPT)

    def rank(parallel: ModelParallel):
        model, _ = load_model(path, ops, torch.float32, show_progress=False, parallel=parallel)
        attn = model.layers[0].attn
        assert attn.q_span.padded and attn.q_b.weight.dtype == torch.float8_e4m3fn
        return _prefill(model, ops, PROMPT)

    for logits in simulate_tp(2, rank):
        assert (logits - expected).abs().max().item() < LOGIT_ATOL


def test_bf16_checkpoint_splits_anywhere(tmp_path: Path, ops) -> None:
    """The same shapes in bf16 load at TP=2 (no FP8 block rule) and match one process."""
    path = write_demo_model(tmp_path / "ds", "deepseek_v3", "tiny", fp8=False)
    reference, _ = load_model(path, ops, torch.float32, show_progress=False)
    expected = _prefill(reference, ops, PROMPT)

    def rank(parallel: ModelParallel):
        model, _ = load_model(path, ops, torch.float32, show_progress=False, parallel=parallel)
        return _prefill(model, ops, PROMPT)

    for logits in simulate_tp(2, rank):
        assert (logits - expected).abs().max().item() < LOGIT_ATOL


def test_reader_slices_equal_slices_of_the_whole(deepseek_dir: Path, ops) -> None:
    reader = CheckpointReader(
        deepseek_dir, ops, torch.float32, torch.device("cpu"), show_progress=False
    )
    name, shape = "model.layers.0.self_attn.kv_b_proj", (448, 128)
    whole = reader.linear_weight(name, shape, quantize=False).dequantize(torch.float32)
    for shard in (Shard(0, 0, 224), Shard(0, 224, 448), Shard(0, 100, 300)):  # not 128-aligned
        part = reader.dequantized_weight(name, shape, torch.float32, shard)
        assert torch.equal(part, whole[shard.start : shard.stop])
    name, shape = "model.layers.0.self_attn.o_proj", (256, 256)
    whole = reader.linear_weight(name, shape)
    part = reader.linear_weight(name, shape, shard=Shard(1, 128, 256))
    assert torch.equal(part.weight.float(), whole.weight[:, 128:].float())
    assert torch.equal(part.scale, whole.scale[:, 1:])
    with pytest.raises(CheckpointError, match="128"):
        reader.linear_weight(name, shape, shard=Shard(1, 64, 192))
    padded = reader.tensor("model.embed_tokens.weight", (512, 256), shard=Shard(0, 384, 576))
    assert padded.shape == (192, 256) and not padded[128:].any()


def test_vocab_parallel_embedding_and_head_with_padding() -> None:
    vocab, dim, tp = 10, 3, 4  # shards of 3 rows; the last holds 1 real row
    table = torch.randn(vocab, dim)
    ids = torch.tensor([0, 9, 4, 5, 3])

    def rank(parallel: ModelParallel):
        shard = parallel.vocab_shard(vocab)
        rows = torch.zeros(shard.size, dim)
        real = table[shard.start : min(shard.stop, vocab)]
        rows[: real.shape[0]] = real
        logits = torch.ones(2, dim) @ rows.t()  # [2, Vr]
        return parallel.embed(ids, rows, shard), parallel.gather_vocab(logits, vocab)

    for embedded, logits in simulate_tp(tp, rank):
        assert torch.equal(embedded, table[ids])
        assert torch.allclose(logits, torch.ones(2, dim) @ table.t())


def test_head_splits() -> None:
    plan = [ModelParallel(4, r, all_reduce_fn=id, all_gather_fn=id) for r in range(4)]
    assert [p.heads(8, 8).kv_start for p in plan] == [0, 2, 4, 6]
    assert [p.heads(8, 2).kv_start for p in plan] == [0, 0, 1, 1]
    assert [p.heads(8, 1).kv_start for p in plan] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="multiple of the KV head count"):
        plan[0].heads(12, 3)
    with pytest.raises(ValueError, match="not divisible"):
        plan[0].heads(6, 6)


def test_stage_layers() -> None:
    assert [stage_layers(3, 2, s) for s in range(2)] == [range(0, 2), range(2, 3)]
    assert [list(stage_layers(61, 4, s))[0] for s in range(4)] == [0, 16, 31, 46]
    with pytest.raises(ValueError, match="fewer than"):
        stage_layers(2, 3, 0)


def test_qwen2_biases_and_tied_embeddings_split(tmp_path: Path, ops) -> None:
    """q/k/v biases are cut with their rows; a tied LM head is the vocab shard of the embedding."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=500,  # not a multiple of tp=4: the last vocab shard is padded
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    hf = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in hf.model.layers:  # non-zero biases, so a mis-cut one shows
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    hf.save_pretrained(tmp_path)
    reference, _ = load_model(tmp_path, ops, torch.float32, show_progress=False)
    expected = _prefill(reference, ops, PROMPT)

    def rank(parallel: ModelParallel):
        model, _ = load_model(tmp_path, ops, torch.float32, show_progress=False, parallel=parallel)
        return _prefill(model, ops, PROMPT)

    for logits in simulate_tp(4, rank):
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max().item() < LOGIT_ATOL


def test_all_reduce_add_rms_norm_routing() -> None:
    """TP=1: add_rms_norm alone; TP > 1 without a fused op: all_reduce, then add_rms_norm
    of the sum; with the backend's fused op bound: that op alone, once."""
    from chitu_core.ops import GENERIC_OPS

    x, residual, weight = torch.randn(3, 8), torch.randn(3, 8), torch.rand(8) + 0.5
    calls: list[str] = []

    def add_rms_norm(a, r, w, eps):
        calls.append("add_rms_norm")
        return GENERIC_OPS["add_rms_norm"](a, r, w, eps)

    def all_reduce(t):
        calls.append("all_reduce")
        return t.mul_(2)  # two ranks holding the same partial

    def fused(a, r, w, eps):
        calls.append("fused")
        return "normed", "summed"

    _, summed = ModelParallel().all_reduce_add_rms_norm(
        x.clone(), residual, weight, 1e-6, add_rms_norm
    )
    assert calls == ["add_rms_norm"]
    torch.testing.assert_close(summed, x + residual)
    calls.clear()
    composed = ModelParallel(2, 0, all_reduce_fn=all_reduce, all_gather_fn=id)
    _, summed = composed.all_reduce_add_rms_norm(x.clone(), residual, weight, 1e-6, add_rms_norm)
    assert calls == ["all_reduce", "add_rms_norm"]
    torch.testing.assert_close(summed, 2 * x + residual)
    calls.clear()
    bound = ModelParallel(
        2, 0, all_reduce_fn=all_reduce, all_gather_fn=id, all_reduce_add_rms_norm_fn=fused
    )
    assert bound.all_reduce_add_rms_norm(x, residual, weight, 1e-6, add_rms_norm) == (
        "normed",
        "summed",
    )
    assert calls == ["fused"]
