"""The generic ops against independent hand computations on tiny shapes."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from chitu_core import hookspecs
from chitu_core.backend import COMPOSED_OPS, LIFECYCLE_HOOKS
from chitu_core.ops import GENERIC_OPS, attention, collectives, memory
from chitu_core.ops.attention import (
    mla_decode,
    mla_prefill,
    paged_attention_decode,
    paged_attention_prefill,
    store_kv,
)
from chitu_core.ops.linear import linear, prepare_weight
from chitu_core.ops.moe import fused_moe, moe_route
from chitu_core.ops.small import rms_norm, rope, sample, silu_and_mul
from chitu_core.quant import (
    FORMAT_FP8_BLOCK128,
    FORMAT_FP8_CHANNEL,
    FORMAT_UNQUANTIZED,
    dequantize_block_fp8,
    quantize_fp8,
)

CPU = torch.device("cpu")


def test_generic_ops_cover_every_optional_hook_with_the_spec_arguments():
    specs = {
        name[len("chitu_") :]: obj
        for name, obj in vars(hookspecs).items()
        if name.startswith("chitu_") and callable(obj) and name not in LIFECYCLE_HOOKS
    }
    del specs["backend_info"], specs["check_available"]
    assert set(GENERIC_OPS) == set(specs)
    for op, spec in specs.items():
        expected = list(inspect.signature(spec).parameters)
        params = inspect.signature(GENERIC_OPS[op]).parameters.values()
        assert [p.name for p in params if p.kind != p.KEYWORD_ONLY] == expected, op
        # Keyword-only: the ops a composed op is built from (bind_ops passes the backend's).
        parts = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
        assert parts == list(COMPOSED_OPS.get(op, ())), op


# ---------------------------------------------------------------- memory


def test_memory_hooks_on_the_host():
    cache = memory.allocate_kv_cache(3, 4, 2, 8, torch.bfloat16, CPU)
    assert cache.shape == (3, 4, 2, 8) and cache.dtype == torch.bfloat16
    assert cache.is_contiguous() and not cache.any()
    free, total = memory.memory_info(CPU)
    assert 0 < free <= total
    memory.synchronize(CPU)
    memory.empty_cache(CPU)

    def fn():
        return torch.ones(2)

    assert memory.capture_graph(fn, CPU) is fn


# ---------------------------------------------------------------- linear


def test_linear_unquantized_with_bias_and_empty_batch():
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(3)
    handle = prepare_weight(w, None, FORMAT_UNQUANTIZED)
    torch.testing.assert_close(linear(x, handle, b), x @ w.T + b)
    assert linear(x[:0], handle, None).shape == (0, 3)
    with pytest.raises(TypeError, match="prepare_weight"):
        linear(x, w, None)


@pytest.mark.parametrize("fmt", [FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL])
def test_linear_fp8_matches_dequantize_then_matmul(fmt):
    torch.manual_seed(0)
    # Non-multiples of 128 exercise the partial last block row and column.
    q = quantize_fp8(torch.randn(130, 200), fmt)
    handle = prepare_weight(q.weight, q.scale, fmt)
    x = torch.randn(4, 200)
    dense = q.weight.float() * (
        q.scale[:, None] if fmt == FORMAT_FP8_CHANNEL else _expand(q.scale, 130, 200)
    )
    torch.testing.assert_close(linear(x, handle, None), x @ dense.T, rtol=1e-5, atol=1e-4)
    if fmt == FORMAT_FP8_BLOCK128:
        torch.testing.assert_close(dense, dequantize_block_fp8(q.weight, q.scale))
    out = linear(x.bfloat16(), handle, None)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 130)


def _expand(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]


# ---------------------------------------------------------------- MoE


def test_moe_route_deepseek_grouped_bias_changes_choice_not_weights():
    # 8 experts in 4 groups of 2, 2 groups eligible, top-2, sigmoid scoring.
    s = torch.tensor([[0.9, 0.1, 0.2, 0.3, 0.5, 0.6, 0.4, 0.45]])
    logits = torch.log(s / (1 - s))
    args = dict(top_k=2, scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2)
    # No bias: group sums 1.0, 0.5, 1.1, 0.85 -> groups 2 and 0 -> experts 0 and 5.
    weights, ids = moe_route(logits, **args, correction_bias=None, routed_scaling_factor=2.5)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert sorted(ids[0].tolist()) == [0, 5]
    # Bias +0.5 on group 1: its selection sum 1.5 wins with group 2; inside
    # them the biased scores 0.7, 0.8, 0.5, 0.6 pick experts 3 and 2 ...
    bias = torch.tensor([0, 0, 0.5, 0.5, 0, 0, 0, 0])
    weights, ids = moe_route(logits, **args, correction_bias=bias, routed_scaling_factor=2.5)
    got = dict(zip(ids[0].tolist(), weights[0].tolist(), strict=True))
    # ... but the weights are the unbiased 0.2 and 0.3, renormalised, times 2.5.
    assert got.keys() == {2, 3}
    assert got[2] == pytest.approx(2.5 * 0.2 / 0.5, rel=1e-5)
    assert got[3] == pytest.approx(2.5 * 0.3 / 0.5, rel=1e-5)


def test_moe_route_softmax_and_ties_towards_lower_ids():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    weights, ids = moe_route(logits, 2, "softmax", False, 1, 1, None, 1.0)
    probs = logits.softmax(-1)
    assert ids[0].tolist() == [1, 2] and ids[1].tolist() == [0, 1]
    torch.testing.assert_close(weights, probs.gather(1, ids.long()))
    # Grouped: all four groups tie, so groups 0 and 1 are eligible.
    flat = torch.zeros(1, 8)
    _, ids = moe_route(flat, 3, "sigmoid", True, 4, 2, None, 1.0)
    assert ids[0].tolist() == [0, 1, 2]
    weights, ids = moe_route(logits[:0], 2, "softmax", True, 1, 1, None, 1.0)
    assert weights.shape == ids.shape == (0, 2)


@pytest.mark.parametrize("fmt", [FORMAT_UNQUANTIZED, FORMAT_FP8_BLOCK128])
def test_fused_moe_matches_a_per_token_loop(fmt):
    torch.manual_seed(0)
    num_experts, hidden, inter, num_tokens, top_k = 4, 16, 8, 5, 2
    w13_dense, w2_dense = (
        torch.randn(num_experts, 2 * inter, hidden),
        torch.randn(num_experts, hidden, inter),
    )
    if fmt == FORMAT_UNQUANTIZED:
        w13 = prepare_weight(w13_dense, None, fmt)
        w2 = prepare_weight(w2_dense, None, fmt)
    else:
        q13, q2 = quantize_fp8(w13_dense, fmt), quantize_fp8(w2_dense, fmt)
        w13, w2 = (
            prepare_weight(q13.weight, q13.scale, fmt),
            prepare_weight(q2.weight, q2.scale, fmt),
        )
    w13_dense, w2_dense = w13.dequantize(), w2.dequantize()
    x = torch.randn(num_tokens, hidden)
    # Expert 3 is never chosen: idle experts must be skipped cleanly.
    ids = torch.tensor([[0, 2], [2, 0], [1, 2], [0, 1], [2, 1]], dtype=torch.int32)
    weights = torch.rand(num_tokens, top_k)

    expected = torch.zeros(num_tokens, hidden)
    for t in range(num_tokens):
        for j in range(top_k):
            e = ids[t, j]
            h = w13_dense[e] @ x[t]
            expected[t] += weights[t, j] * (w2_dense[e] @ (F.silu(h[:inter]) * h[inter:]))
    out = fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, hidden)


# ---------------------------------------------------------------- attention

BLOCK = 4


def _cache(num_blocks, heads, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, BLOCK, heads, dim, generator=g)


def _contiguous(cache, table, length):
    """A sequence's first `length` cache rows: [L, H, D]."""
    return torch.cat([cache[b] for b in table.tolist()])[:length]


def _sdpa(q, k, v, scale, mask=None):
    """q [S, Hq, D], k/v [L, Hkv, D] -> [S, Hq, Dv] via SDPA with kv heads repeated."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


def test_store_kv_writes_slots_and_casts():
    key_cache = memory.allocate_kv_cache(3, BLOCK, 2, 5, torch.bfloat16, CPU)
    value_cache = memory.allocate_kv_cache(3, BLOCK, 2, 3, torch.bfloat16, CPU)
    key, value = torch.randn(3, 2, 5), torch.randn(3, 2, 3)
    store_kv(key, value, key_cache, value_cache, torch.tensor([9, 0, 5]))
    assert torch.equal(key_cache[2, 1], key[0].bfloat16())
    assert torch.equal(value_cache[1, 1], value[2].bfloat16())
    assert torch.equal(key_cache[0, 0], key[1].bfloat16())
    assert int((key_cache != 0).any(-1).any(-1).sum()) == 3  # nothing else written
    # MLA: only the latent, no values.
    latent_cache = memory.allocate_kv_cache(2, BLOCK, 1, 6, torch.float32, CPU)
    latent = torch.randn(2, 1, 6)
    store_kv(latent, None, latent_cache, None, torch.tensor([1, 7]))
    assert torch.equal(latent_cache[0, 1], latent[0]) and torch.equal(latent_cache[1, 3], latent[1])


def test_paged_attention_decode_matches_sdpa_on_contiguous_context():
    key_cache, value_cache = _cache(10, 2, 8, 0), _cache(10, 2, 6, 1)
    # Entries past each sequence's end are garbage (out of range): ignored.
    tables = torch.tensor([[7, 2, 999], [4, -1, 55], [1, 9, 3]], dtype=torch.int32)
    lens = torch.tensor([5, 1, 12], dtype=torch.int32)
    q = torch.randn(3, 4, 8)
    out = paged_attention_decode(q, key_cache, value_cache, tables, lens, 0.3)
    assert out.shape == (3, 4, 6)
    for b in range(3):
        n_blocks = -(-int(lens[b]) // BLOCK)
        k = _contiguous(key_cache, tables[b, :n_blocks], lens[b])
        v = _contiguous(value_cache, tables[b, :n_blocks], lens[b])
        torch.testing.assert_close(out[b], _sdpa(q[b : b + 1], k, v, 0.3)[0])
    empty = paged_attention_decode(q[:0], key_cache, value_cache, tables[:0], lens[:0], 0.3)
    assert empty.shape == (0, 4, 6)


@pytest.mark.parametrize("max_scores", [1 << 28, 1])  # 1: one query per chunk
def test_paged_attention_prefill_with_cached_prefix_matches_masked_sdpa(monkeypatch, max_scores):
    monkeypatch.setattr(attention, "_MAX_SCORE_ELEMENTS", max_scores)
    key_cache, value_cache = _cache(8, 1, 8, 2), _cache(8, 1, 8, 3)
    tables = torch.tensor([[3, 5], [0, 6]], dtype=torch.int32)
    # Sequence 0: 4 cached + 3 new tokens; sequence 1: 5 new tokens.
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
    lens = torch.tensor([7, 5], dtype=torch.int32)
    q = torch.randn(8, 2, 8)
    out = paged_attention_prefill(q, key_cache, value_cache, tables, cu_seqlens, lens, 0.35)
    for b in range(2):
        s, e, ctx = int(cu_seqlens[b]), int(cu_seqlens[b + 1]), int(lens[b])
        k = _contiguous(key_cache, tables[b], ctx)
        v = _contiguous(value_cache, tables[b], ctx)
        q_pos = torch.arange(ctx - (e - s), ctx)
        mask = torch.arange(ctx)[None, :] <= q_pos[:, None]  # [S, L]
        torch.testing.assert_close(out[s:e], _sdpa(q[s:e], k, v, 0.35, mask))
    empty = paged_attention_prefill(
        q[:0], key_cache, value_cache, tables[:0], cu_seqlens[:1], lens[:0], 0.35
    )
    assert empty.shape == (0, 2, 8)


def _mla_reference(q_latent, q_rope, rows, rank, scale, mask):
    """Hand formula: scale * (q_latent . c + q_rope . k_pe), softmax, @ c."""
    c, k_pe = rows[:, 0, :rank], rows[:, 0, rank:]
    scores = scale * (
        torch.einsum("shr,lr->shl", q_latent, c) + torch.einsum("shp,lp->shl", q_rope, k_pe)
    )
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("shl,lr->shr", scores.softmax(-1), c)


def test_mla_decode_and_prefill_match_the_latent_formula():
    rank, rope_dim, heads = 6, 2, 3
    latent_cache = _cache(6, 1, rank + rope_dim, 4)
    tables = torch.tensor([[2, 0], [5, 1]], dtype=torch.int32)
    lens = torch.tensor([6, 3], dtype=torch.int32)
    q_latent, q_rope = torch.randn(2, heads, rank), torch.randn(2, heads, rope_dim)
    out = mla_decode(q_latent, q_rope, latent_cache, tables, lens, 0.5)
    for b in range(2):
        rows = _contiguous(latent_cache, tables[b], lens[b])
        ref = _mla_reference(
            q_latent[b : b + 1],
            q_rope[b : b + 1],
            rows,
            rank,
            0.5,
            torch.ones(1, int(lens[b]), dtype=torch.bool),
        )
        torch.testing.assert_close(out[b : b + 1], ref)

    # Prefill: sequence 0 has 6 tokens, the last 4 new.
    q_latent, q_rope = torch.randn(4, heads, rank), torch.randn(4, heads, rope_dim)
    cu_seqlens = torch.tensor([0, 4], dtype=torch.int32)
    out = mla_prefill(q_latent, q_rope, latent_cache, tables[:1], cu_seqlens, lens[:1], 0.5)
    rows = _contiguous(latent_cache, tables[0], 6)
    mask = torch.arange(6)[None, :] <= torch.arange(2, 6)[:, None]
    torch.testing.assert_close(out, _mla_reference(q_latent, q_rope, rows, rank, 0.5, mask))


# ---------------------------------------------------------------- small ops


def test_rms_norm_and_silu_and_mul():
    x, w = torch.randn(3, 8).bfloat16(), torch.randn(8).bfloat16()
    xf = x.float()
    ref = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * w
    torch.testing.assert_close(rms_norm(x, w, 1e-6), ref)
    y = torch.randn(2, 6)
    torch.testing.assert_close(silu_and_mul(y), y[:, :3] * torch.sigmoid(y[:, :3]) * y[:, 3:])
    assert silu_and_mul(y[:0]).shape == (0, 3)


@pytest.mark.parametrize("is_neox_style", [True, False])
def test_rope_matches_the_pair_formula(is_neox_style):
    rot = 4
    freqs = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    angles = torch.arange(16).float()[:, None] * freqs[None, :]
    cos_sin_cache = torch.cat([angles.cos(), angles.sin()], dim=-1)  # [16, R]
    q, k = torch.randn(3, 2, 10), torch.randn(3, 1, 6)
    positions = torch.tensor([0, 5, 11])
    q_out, k_out = rope(q, k, positions, cos_sin_cache, is_neox_style)
    for x, out in ((q, q_out), (k, k_out)):
        expected = x.clone()
        for t, p in enumerate(positions.tolist()):
            for i in range(rot // 2):
                ia, ib = (i, i + rot // 2) if is_neox_style else (2 * i, 2 * i + 1)
                c, s = math.cos(p * freqs[i]), math.sin(p * freqs[i])
                a, b = x[t, :, ia], x[t, :, ib]
                expected[t, :, ia], expected[t, :, ib] = a * c - b * s, b * c + a * s
        torch.testing.assert_close(out, expected)
        assert torch.equal(out[..., rot:], x[..., rot:])
    q_empty, k_empty = rope(q[:0], k[:0], positions[:0], cos_sin_cache, is_neox_style)
    assert q_empty.shape == (0, 2, 10) and k_empty.shape == (0, 1, 6)


def _sample(logits, temperature, top_p=1.0, top_k=0, generators=None):
    batch = logits.shape[0]
    return sample(
        logits,
        torch.full((batch,), float(temperature)),
        torch.full((batch,), float(top_p)),
        torch.full((batch,), top_k, dtype=torch.int32),
        generators if generators is not None else [None] * batch,
    )


def test_sample_greedy_takes_the_lowest_id_among_ties():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    out = _sample(logits, 0.0)
    assert out.dtype == torch.int64 and out.tolist() == [1, 0]
    assert _sample(logits[:0], 0.0).shape == (0,)


def test_sample_top_k_1_and_tiny_top_p_equal_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(_sample(logits, 1.0, top_k=1), greedy)
    assert torch.equal(_sample(logits, 1.0, top_p=1e-6), greedy)


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)

    def run(rows, gens):
        batch = len(rows)
        return sample(
            logits[rows],
            torch.full((batch,), 1.3),
            torch.full((batch,), 0.9),
            torch.full((batch,), 100, dtype=torch.int32),
            gens,
        )

    draws = [run([2], [torch.Generator().manual_seed(7)]).item() for _ in range(3)]
    alone = [run([2], [torch.Generator().manual_seed(s)])[0].item() for s in range(20)]
    mixed = [
        run([0, 2, 1], [None, torch.Generator().manual_seed(s), torch.Generator().manual_seed(99)])[
            1
        ].item()
        for s in range(20)
    ]
    assert len(set(draws)) == 1
    assert alone == mixed
    assert len(set(alone)) > 1  # it does sample


def test_sample_frequencies_follow_top_k_then_top_p():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4).contiguous()
    counts = torch.bincount(_sample(logits, 1.0), minlength=4).float() / 20000
    torch.testing.assert_close(counts, probs, atol=0.02, rtol=0)
    # top_k=3 leaves 0.5/0.95, 0.3/0.95, 0.15/0.95; top_p=0.6 then keeps the
    # first two (0.526 before the second < 0.6, 0.842 before the third).
    counts = torch.bincount(_sample(logits, 1.0, top_p=0.6, top_k=3), minlength=4).float() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.02, rtol=0)


# ---------------------------------------------------------------- collectives


def _collectives_worker(rank: int, world: int, init_file: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        group = collectives.new_group([0, 1], 30.0)
        t = torch.full((2, 4), float(rank + 1))
        assert collectives.all_reduce(t, group) is t and torch.equal(t, torch.full((2, 4), 3.0))
        x = torch.arange(4.0).view(2, 2) + 10 * rank
        gathered = collectives.all_gather(x, group, 1)
        assert torch.equal(
            gathered,
            torch.cat([torch.arange(4.0).view(2, 2), torch.arange(4.0).view(2, 2) + 10], 1),
        )
        y = torch.arange(8.0).view(2, 4) * (rank + 1)
        expected = (torch.arange(8.0).view(2, 4) * 3).chunk(2, dim=1)[rank]
        assert torch.equal(collectives.reduce_scatter(y, group, 1), expected)
        buf = torch.zeros(3)
        if rank == 0:
            collectives.send(torch.tensor([1.0, 2.0, 3.0]), 1, group)
        else:
            assert collectives.recv(buf, 0, group) is buf and buf.tolist() == [1.0, 2.0, 3.0]
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_over_gloo_with_two_ranks(tmp_path):
    torch.multiprocessing.spawn(_collectives_worker, args=(2, str(tmp_path / "init")), nprocs=2)
