"""Every native op of the ascend plugin against cpu_ref on small shapes, bf16.

These tests check the operator MAPPING (arguments, layouts, index conventions)
against the FAKE torch_npu module, which implements each operator's documented
semantics on the CPU; they do not run on, or say anything about, NPU hardware.
Each test also asserts that the documented operator was actually called (no
silent generic fallback).
"""

from __future__ import annotations

import pytest
import torch

from chitu_core.quant import FORMAT_FP8_BLOCK128, FORMAT_UNQUANTIZED, quantize_fp8
from conformance.tolerances import assert_close

BF16 = torch.bfloat16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_device_and_memory_hooks(ascend_ops, fake_npu):
    device = ascend_ops.device(0)
    assert device.type == "cpu"  # the fake's one hack: the host stands in for npu:0
    free, total = ascend_ops.memory_info(device)
    assert 0 < free <= total
    ascend_ops.synchronize(device)
    ascend_ops.empty_cache(device)
    assert ascend_ops.info.dist_backend == "hccl" and not ascend_ops.info.supports_graphs
    assert {"mla_decode", "capture_graph", "sample"} <= set(ascend_ops.fallback)


def test_rms_norm(ascend_ops, ref_ops, npu_calls):
    x = torch.randn(7, 256, generator=_gen(0)).to(BF16)
    w = torch.randn(256, generator=_gen(1)).to(BF16)
    assert_close("rms_norm", ascend_ops.rms_norm(x, w, 1e-6), ref_ops.rms_norm(x, w, 1e-6), BF16)
    assert npu_calls["npu_rms_norm"] == 1


def test_add_rms_norm(ascend_ops, ref_ops, npu_calls):
    x = torch.randn(7, 256, generator=_gen(2)).to(BF16)
    r = (torch.randn(7, 256, generator=_gen(3)) * 3).to(BF16)
    w = torch.randn(256, generator=_gen(4)).to(BF16)
    normed, summed = ascend_ops.add_rms_norm(x, r, w, 1e-6)
    ref_normed, ref_summed = ref_ops.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(summed, r + x)
    assert_close("add_rms_norm", normed, ref_normed, BF16)
    assert npu_calls["npu_add_rms_norm"] == 1


@pytest.mark.parametrize("is_neox_style", [True, False])
@pytest.mark.parametrize("rot_dim", [64, 32])
def test_rope(ascend_ops, ref_ops, npu_calls, is_neox_style, rot_dim):
    q = torch.randn(5, 4, 64, generator=_gen(2)).to(BF16)
    k = torch.randn(5, 2, 64, generator=_gen(3)).to(BF16)
    positions = torch.tensor([0, 3, 17, 100, 511])
    freqs = 1.0 / 10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    angles = torch.arange(512).float()[:, None] * freqs[None]
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
    got = ascend_ops.rope(q, k, positions, cache, is_neox_style)
    ref = ref_ops.rope(q, k, positions, cache, is_neox_style)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == BF16
        assert_close("rope", g, r, BF16)
    assert npu_calls["npu_rotary_mul"] == 2


def test_silu_and_mul(ascend_ops, ref_ops, npu_calls):
    x = torch.randn(9, 2 * 96, generator=_gen(4)).to(BF16)
    assert_close("silu_and_mul", ascend_ops.silu_and_mul(x), ref_ops.silu_and_mul(x), BF16)
    assert ascend_ops.silu_and_mul(x[:0]).shape == (0, 96)
    assert npu_calls["npu_swiglu"] == 1


@pytest.mark.parametrize("fmt", ["unquantized", "fp8_block128", "fp8_channel"])
@pytest.mark.parametrize("m,n,k", [(1, 128, 128), (5, 300, 260), (0, 64, 256)])
def test_linear(ascend_ops, ref_ops, npu_calls, fmt, m, n, k):
    w = torch.randn(n, k, generator=_gen(5)) * 0.05
    q = quantize_fp8(w, fmt) if fmt != FORMAT_UNQUANTIZED else None
    weight, scale = (w.to(BF16), None) if q is None else (q.weight, q.scale)
    x = torch.randn(m, k, generator=_gen(6)).to(BF16)
    bias = torch.randn(n, generator=_gen(7)).to(BF16)
    got = ascend_ops.linear(x, ascend_ops.prepare_weight(weight, scale, fmt), bias)
    ref = ref_ops.linear(x, ref_ops.prepare_weight(weight, scale, fmt), bias)
    assert got.shape == (m, n) and got.dtype == BF16
    if m:
        assert_close("linear", got, ref, BF16)
        assert npu_calls["npu_weight_quant_batchmatmul"] == (fmt != FORMAT_UNQUANTIZED)


def _route_args(num_experts, top_k, scoring, renormalize, groups, topk_groups, bias, scale):
    logits = torch.randn(6, num_experts, generator=_gen(8))
    b = torch.randn(num_experts, generator=_gen(9)) * 0.1 if bias else None
    return logits, top_k, scoring, renormalize, groups, topk_groups, b, scale


@pytest.mark.parametrize(
    "args,operator",
    [
        ((16, 4, "softmax", True, 1, 1, False, 1.0), "npu_moe_gating_top_k_softmax"),
        ((16, 2, "softmax", False, 1, 1, False, 2.0), "npu_moe_gating_top_k_softmax"),
        ((256, 8, "sigmoid", True, 8, 4, True, 2.5), "npu_moe_gating_top_k"),
        ((64, 6, "sigmoid", True, 8, 4, True, 2.5), None),  # undocumented shape: generic
        ((256, 8, "sigmoid", False, 8, 4, True, 1.0), None),  # no renorm: generic
    ],
)
def test_moe_route(ascend_ops, ref_ops, npu_calls, args, operator):
    route_args = _route_args(*args)
    weights, ids = ascend_ops.moe_route(*route_args)
    ref_weights, ref_ids = ref_ops.moe_route(*route_args)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    order, ref_order = ids.long().sort(dim=-1), ref_ids.long().sort(dim=-1)
    assert torch.equal(order.values, ref_order.values)
    assert_close(
        "moe_route",
        weights.gather(1, order.indices),
        ref_weights.gather(1, ref_order.indices),
        torch.float32,
    )
    called = {"npu_moe_gating_top_k_softmax", "npu_moe_gating_top_k"} & set(npu_calls)
    assert called == ({operator} if operator else set())


@pytest.mark.parametrize("fmt", [FORMAT_UNQUANTIZED, FORMAT_FP8_BLOCK128])
@pytest.mark.parametrize("num_tokens", [5, 0])
def test_fused_moe(ascend_ops, ref_ops, npu_calls, fmt, num_tokens):
    experts, hidden, inter, top_k = 4, 160, 96, 2
    w13 = torch.randn(experts, 2 * inter, hidden, generator=_gen(10)) * 0.08
    w2 = torch.randn(experts, hidden, inter, generator=_gen(11)) * 0.1
    x = torch.randn(num_tokens, hidden, generator=_gen(12)).to(BF16)
    logits = torch.randn(num_tokens, experts, generator=_gen(13))
    topk_weights, topk_ids = ref_ops.moe_route(logits, top_k, "softmax", True, 1, 1, None, 1.0)

    def handles(ops):
        if fmt == FORMAT_UNQUANTIZED:
            return [ops.prepare_weight(w.to(BF16), None, fmt) for w in (w13, w2)]
        return [ops.prepare_weight(q.weight, q.scale, fmt) for q in map(quantize_fp8, (w13, w2))]

    got = ascend_ops.fused_moe(x, *handles(ascend_ops), topk_weights, topk_ids)
    ref = ref_ops.fused_moe(x, *handles(ref_ops), topk_weights, topk_ids)
    assert got.shape == (num_tokens, hidden) and got.dtype == BF16
    if num_tokens:
        assert_close("fused_moe", got, ref, BF16)
        expected = {"npu_moe_init_routing", "npu_swiglu", "npu_moe_finalize_routing"}
        expected.add(
            "npu_grouped_matmul" if fmt == FORMAT_UNQUANTIZED else "npu_weight_quant_batchmatmul"
        )
        assert expected <= set(npu_calls)


def _paged_setup(seed, q_lens, ctx_lens, heads, kv_heads, dim, block_size=16, num_blocks=24):
    gen = _gen(seed)
    key_cache = torch.zeros(num_blocks, block_size, kv_heads, dim, dtype=BF16)
    value_cache = torch.zeros_like(key_cache)
    max_blocks = max(-(-c // block_size) for c in ctx_lens) + 1
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(ctx_lens), max_blocks), 10**6, dtype=torch.int32)  # junk past end
    used = 0
    for b, ctx in enumerate(ctx_lens):
        need = -(-ctx // block_size)
        tables[b, :need] = perm[used : used + need].int()
        used += need
    slots = torch.cat(
        [
            tables[b, torch.arange(c) // block_size].long() * block_size
            + torch.arange(c) % block_size
            for b, c in enumerate(ctx_lens)
        ]
    )
    keys = torch.randn(len(slots), kv_heads, dim, generator=gen).to(BF16)
    values = torch.randn(len(slots), kv_heads, dim, generator=gen).to(BF16)
    q = torch.randn(sum(q_lens), heads, dim, generator=gen).to(BF16)
    return q, key_cache, value_cache, tables, slots, keys, values


def test_store_kv_is_exact(ascend_ops, ref_ops, npu_calls):
    _, kc, vc, _, slots, keys, values = _paged_setup(14, [1], [37], 4, 2, 64)
    ref_k, ref_v = kc.clone(), vc.clone()
    ascend_ops.store_kv(keys, values, kc, vc, slots)
    ref_ops.store_kv(keys, values, ref_k, ref_v, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    latent = torch.zeros(4, 16, 1, 40, dtype=BF16)
    ref_latent = latent.clone()
    ascend_ops.store_kv(keys[:10, :1, :40], None, latent, None, slots[:10] % 64)
    ref_ops.store_kv(keys[:10, :1, :40], None, ref_latent, None, slots[:10] % 64)
    assert torch.equal(latent, ref_latent)
    assert npu_calls["npu_scatter_nd_update_"] == 3


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_paged_attention_decode(ascend_ops, ref_ops, npu_calls, heads, kv_heads):
    ctx = [1, 37, 64]
    q, kc, vc, tables, slots, keys, values = _paged_setup(15, [1, 1, 1], ctx, heads, kv_heads, 64)
    ref_ops.store_kv(keys, values, kc, vc, slots)
    lens = torch.tensor(ctx, dtype=torch.int32)
    got = ascend_ops.paged_attention_decode(q, kc, vc, tables, lens, 0.125)
    ref = ref_ops.paged_attention_decode(q, kc, vc, tables, lens, 0.125)
    assert_close("paged_attention_decode", got, ref, BF16)
    assert npu_calls["npu_fused_infer_attention_score"] == 1


def test_paged_attention_prefill_with_cached_prefix(ascend_ops, ref_ops, npu_calls):
    q_lens, ctx = [5, 1, 20], [5, 30, 33]  # sequences 1 and 2 have a cached prefix
    q, kc, vc, tables, slots, keys, values = _paged_setup(16, q_lens, ctx, 8, 2, 64)
    ref_ops.store_kv(keys, values, kc, vc, slots)
    cu = torch.tensor([0, 5, 6, 26], dtype=torch.int32)
    lens = torch.tensor(ctx, dtype=torch.int32)
    got = ascend_ops.paged_attention_prefill(q, kc, vc, tables, cu, lens, 0.125)
    ref = ref_ops.paged_attention_prefill(q, kc, vc, tables, cu, lens, 0.125)
    assert_close("paged_attention_prefill", got, ref, BF16)
    assert npu_calls["npu_fused_infer_attention_score"] == 1


def test_attention_outside_the_documented_shapes_falls_back(ascend_ops, ref_ops, npu_calls):
    """block_size 8 (not a multiple of 16): the generic op, same numbers."""
    q, kc, vc, tables, slots, keys, values = _paged_setup(17, [1, 1], [9, 20], 4, 2, 32, 8, 12)
    ref_ops.store_kv(keys, values, kc, vc, slots)
    lens = torch.tensor([9, 20], dtype=torch.int32)
    got = ascend_ops.paged_attention_decode(q, kc, vc, tables, lens, 0.2)
    assert_close(
        "paged_attention_decode",
        got,
        ref_ops.paged_attention_decode(q, kc, vc, tables, lens, 0.2),
        BF16,
    )
    assert npu_calls["npu_fused_infer_attention_score"] == 0
