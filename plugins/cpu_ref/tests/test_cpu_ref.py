"""The oracle checked against independent computations on small shapes.

Every reference here is written from the spec's formula with different means
than the oracle uses (Python arithmetic, torch's float8 cast, SDPA, complex
multiplication, per-token loops), so a shared mistake is unlikely.
"""

from __future__ import annotations

import math

import pluggy
import pytest
import torch
import torch.nn.functional as F
from chitu_cpu_ref import attention as attention_module
from chitu_cpu_ref import linear as linear_module
from chitu_cpu_ref import plugin as ref

import chitu_core.hookspecs as hookspecs
from chitu_core.backend_info import BackendInfo

F8 = torch.float8_e4m3fn


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- plugin and device


def test_registers_against_the_contract():
    pm = pluggy.PluginManager("chitu")
    pm.add_hookspecs(hookspecs)
    pm.register(ref)  # pluggy checks every argument name against its spec
    names = {caller.name for caller in pm.get_hookcallers(ref)}
    assert {"chitu_linear", "chitu_fused_moe", "chitu_mla_decode", "chitu_sample"} <= names
    # The generic gloo collectives and eager "graphs" serve the CPU.
    for generic in ("chitu_all_reduce", "chitu_new_group", "chitu_send", "chitu_capture_graph"):
        assert generic not in names


def test_backend_info_and_availability():
    assert ref.chitu_backend_info() == BackendInfo(
        name="cpu_ref",
        device_type="cpu",
        dist_backend="gloo",
        priority=0,
        compute_dtype="float32",
        has_native_fp8=False,
        supports_graphs=False,
        needs_certificate=False,
    )
    assert ref.chitu_check_available() is None


def test_device_and_memory():
    device = ref.chitu_device(local_rank=3)
    assert device == torch.device("cpu")
    free, total = ref.chitu_memory_info(device)
    assert 0 < free <= total
    cache = ref.chitu_allocate_kv_cache(5, 4, 2, 8, torch.bfloat16, device)
    assert cache.shape == (5, 4, 2, 8) and cache.dtype == torch.bfloat16
    assert cache.is_contiguous() and not cache.any()
    assert ref.chitu_synchronize(device) is None and ref.chitu_empty_cache(device) is None


# ---------------------------------------------------------------- linear


def _e4m3_by_hand(code: int) -> float:
    """e4m3fn code -> value, straight from the format's definition (no NaN codes)."""
    sign = -1.0 if code >> 7 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0:
        return sign * (mantissa / 8) * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def _random_fp8(shape, generator) -> torch.Tensor:
    codes = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3F  # NaN codes -> a finite one
    return codes.view(F8)


def _dense_by_blocks(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N, K] fp8 + [ceil(N/128), ceil(K/128)] scale -> fp64, one block at a time."""
    out = w8.to(torch.float64)  # torch's own float8 cast, not chitu's table
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] *= float(scale[i, j])
    return out


def test_linear_fp8_block_matches_hand_dequant():
    g = _gen(1)
    n, k = 130, 260  # partial last block row and column
    w8 = _random_fp8((n, k), g)
    scale = torch.rand(2, 3, generator=g) * 0.01 + 1e-3
    handle = ref.chitu_prepare_weight(w8, scale, "fp8_block128")
    assert handle.weight.element_size() == 1  # FP8 stays one byte

    cols = [0, 127, 128, 259]
    y = ref.chitu_linear(torch.eye(k)[cols], handle, None)  # y[i, n] = W[n, cols[i]]
    codes = w8.view(torch.uint8)
    for i, col in enumerate(cols):
        for row in (0, 1, 127, 128, 129):
            exact = _e4m3_by_hand(int(codes[row, col])) * float(scale[row // 128, col // 128])
            assert y[i, row].item() == torch.tensor(exact, dtype=torch.float32).item()

    x = torch.randn(5, k, generator=g)
    bias = torch.randn(n, generator=g)
    expected = x.double() @ _dense_by_blocks(w8, scale).T + bias.double()
    out = ref.chitu_linear(x, handle, bias)
    assert out.dtype == torch.float32 and out.shape == (5, n)
    torch.testing.assert_close(out, expected.float(), rtol=1e-6, atol=1e-6)
    # The uint8 view of the same codes is the same weight.
    same = ref.chitu_linear(x, ref.chitu_prepare_weight(codes, scale, "fp8_block128"), bias)
    assert torch.equal(same, out)


def test_linear_fp8_channel_and_unquantized():
    g = _gen(2)
    w8 = _random_fp8((7, 9), g)
    scale = torch.rand(7, generator=g) + 0.5
    y = ref.chitu_linear(
        torch.eye(9)[[4]], ref.chitu_prepare_weight(w8, scale, "fp8_channel"), None
    )
    for row in range(7):
        exact = _e4m3_by_hand(int(w8.view(torch.uint8)[row, 4])) * float(scale[row])
        assert y[0, row].item() == torch.tensor(exact, dtype=torch.float32).item()

    w = torch.randn(7, 9, generator=g)
    x = torch.randn(3, 9, generator=g).bfloat16()
    out = ref.chitu_linear(x, ref.chitu_prepare_weight(w, None, "unquantized"), None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (x.double() @ w.double().T).bfloat16())


def test_linear_row_chunks_do_not_change_the_result(monkeypatch):
    g = _gen(3)
    w8 = _random_fp8((300, 140), g)
    scale = torch.rand(3, 2, generator=g)
    handle = ref.chitu_prepare_weight(w8, scale, "fp8_block128")
    x = torch.randn(4, 140, generator=g)
    whole = ref.chitu_linear(x, handle, None)
    monkeypatch.setattr(linear_module, "ROWS_PER_CHUNK", 128)
    torch.testing.assert_close(ref.chitu_linear(x, handle, None), whole, rtol=1e-7, atol=0)


# ---------------------------------------------------------------- MoE


def _route(logits, top_k, bias=None, scoring="sigmoid", groups=(4, 2), renorm=True, factor=1.0):
    weights, ids = ref.chitu_moe_route(
        torch.tensor([logits], dtype=torch.float32),  # one token
        top_k,
        scoring,
        renorm,
        groups[0],
        groups[1],
        None if bias is None else torch.tensor(bias, dtype=torch.float32),
        factor,
    )
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    return weights, ids


def _by_id(weights, ids):
    """Row 0 as {expert id: weight} (the order within a row is unspecified)."""
    return {int(e): float(w) for e, w in zip(ids[0], weights[0], strict=True)}


def test_moe_route_deepseek_hand_example():
    # 8 experts in 4 groups {0,1} {2,3} {4,5} {6,7}; 2 groups, then 2 experts.
    s = [0.90, 0.10, 0.20, 0.30, 0.60, 0.50, 0.40, 0.05]
    logits = torch.logit(torch.tensor(s, dtype=torch.float64)).tolist()
    # Unbiased: group sums 1.0, 0.5, 1.1, 0.45 -> groups 2 and 0 -> experts 0 and 4.
    weights, ids = _route(logits, 2, factor=2.5)
    got = _by_id(weights, ids)
    assert set(got) == {0, 4}
    assert got[0] == pytest.approx(0.9 / 1.5 * 2.5) and got[4] == pytest.approx(0.6 / 1.5 * 2.5)
    # Bias +0.45 on group 1: selection 0.65, 0.75 -> group sums 1.0, 1.4, 1.1, 0.45 ->
    # groups 1 and 2 -> experts 3 (0.75) and 2 (0.65). Weights from the unbiased 0.3, 0.2.
    bias = [0, 0, 0.45, 0.45, 0, 0, 0, 0]
    got = _by_id(*_route(logits, 2, bias=bias, factor=2.5))
    assert set(got) == {2, 3}
    assert got[3] == pytest.approx(0.3 / 0.5 * 2.5) and got[2] == pytest.approx(0.2 / 0.5 * 2.5)
    got = _by_id(*_route(logits, 2, bias=bias, renorm=False, factor=2.5))
    assert got[3] == pytest.approx(0.3 * 2.5) and got[2] == pytest.approx(0.2 * 2.5)
    # A uniform shift changes no choice, even when it makes every selection score
    # negative (ineligible experts must lose to those, not score 0).
    assert set(_by_id(*_route(logits, 2, bias=[-5.0] * 8))) == {0, 4}


def test_moe_route_group_score_is_sum_of_top_two():
    # Group 0 wins by max (0.9) and by total (1.2); group 1 wins by top-2 sum (1.15 > 1.0).
    s = [0.9, 0.1, 0.1, 0.1, 0.6, 0.55, 0.01, 0.01]
    logits = torch.logit(torch.tensor(s, dtype=torch.float64)).tolist()
    _, ids = _route(logits, 2, groups=(2, 1))
    assert sorted(ids[0].tolist()) == [4, 5]


def test_moe_route_ties_go_to_lower_ids():
    _, ids = _route([0.0] * 6, 3, scoring="softmax", groups=(1, 1))
    assert ids[0].tolist() == [0, 1, 2]
    _, ids = _route([0.0, 2.0, 2.0, 2.0, 1.0, 2.0], 2, scoring="softmax", groups=(1, 1))
    assert sorted(ids[0].tolist()) == [1, 2]
    _, ids = _route([0.0] * 4, 2, groups=(2, 1))  # tied groups: the lower group
    assert sorted(ids[0].tolist()) == [0, 1]
    # DeepSeek-V3 size: an unstable sort reorders ties at this length.
    logits = [0.0 if e % 3 else 1.0 for e in range(256)]
    _, ids = _route(logits, 8, groups=(8, 4))
    assert sorted(ids[0].tolist()) == [0, 3, 6, 9, 12, 15, 18, 21]
    _, ids = _route([0.0] * 256, 8, groups=(8, 4))
    assert sorted(ids[0].tolist()) == list(range(8))


def test_moe_route_softmax_matches_formula():
    g = _gen(4)
    logits = torch.randn(5, 8, generator=g)
    weights, ids = ref.chitu_moe_route(logits, 2, "softmax", False, 1, 1, None, 1.0)
    probs = torch.softmax(logits.double(), -1)
    for t in range(5):
        best = sorted(range(8), key=lambda e: (-probs[t, e].item(), e))[:2]
        assert sorted(ids[t].tolist()) == sorted(best)
        torch.testing.assert_close(weights[t].double(), probs[t, ids[t].long()])
    renormed, _ = ref.chitu_moe_route(logits, 2, "softmax", True, 1, 1, None, 1.0)
    torch.testing.assert_close(renormed.sum(-1), torch.ones(5))


def test_moe_route_deepseek_shape_vs_python_loop():
    g = _gen(5)
    logits = torch.randn(4, 256, generator=g)
    bias = torch.randn(256, generator=g) * 0.1
    weights, ids = ref.chitu_moe_route(logits, 8, "sigmoid", True, 8, 4, bias, 2.5)
    for t in range(4):
        s = [1 / (1 + math.exp(-v)) for v in logits[t].tolist()]
        sel = [a + b for a, b in zip(s, bias.tolist(), strict=True)]
        group_score = [
            sum(sorted(sel[32 * gi : 32 * gi + 32], reverse=True)[:2]) for gi in range(8)
        ]
        groups = sorted(range(8), key=lambda gi: (-group_score[gi], gi))[:4]
        eligible = [e for e in range(256) if e // 32 in groups]
        best = sorted(eligible, key=lambda e: (-sel[e], e))[:8]
        total = sum(s[e] for e in best)
        expected = {e: s[e] / total * 2.5 for e in best}
        got = {int(e): float(w) for e, w in zip(ids[t], weights[t], strict=True)}
        assert set(got) == set(expected)
        for e in best:
            assert got[e] == pytest.approx(expected[e], rel=1e-6)


def _dense_experts(w8, scale):
    return torch.stack([_dense_by_blocks(w8[e], scale[e]) for e in range(w8.shape[0])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["unquantized", "fp8_block128", "fp8_channel"])
def test_fused_moe_vs_per_token_loop(fmt, dtype):
    g = _gen(6)
    num_experts, hidden, inter, tokens = 4, 160, 8, 6
    if fmt == "unquantized":
        w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.1
        w2 = torch.randn(num_experts, hidden, inter, generator=g) * 0.1
        h13 = ref.chitu_prepare_weight(w13, None, fmt)
        h2 = ref.chitu_prepare_weight(w2, None, fmt)
        dense13, dense2 = w13.double(), w2.double()
    elif fmt == "fp8_channel":
        w13, w2 = _random_fp8((4, 16, 160), g), _random_fp8((4, 160, 8), g)
        s13, s2 = torch.rand(4, 16, generator=g) * 0.01, torch.rand(4, 160, generator=g) * 0.01
        h13, h2 = ref.chitu_prepare_weight(w13, s13, fmt), ref.chitu_prepare_weight(w2, s2, fmt)
        dense13 = w13.to(torch.float64) * s13.double()[..., None]
        dense2 = w2.to(torch.float64) * s2.double()[..., None]
    else:
        w13, w2 = _random_fp8((4, 16, 160), g), _random_fp8((4, 160, 8), g)
        s13, s2 = torch.rand(4, 1, 2, generator=g) * 0.01, torch.rand(4, 2, 1, generator=g) * 0.01
        h13, h2 = ref.chitu_prepare_weight(w13, s13, fmt), ref.chitu_prepare_weight(w2, s2, fmt)
        dense13, dense2 = _dense_experts(w13, s13), _dense_experts(w2, s2)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.tensor([[0, 1], [1, 0], [2, 0], [0, 2], [1, 2], [2, 1]], dtype=torch.int32)
    weights = torch.rand(tokens, 2, generator=g)  # expert 3 gets no token

    out = ref.chitu_fused_moe(x, h13, h2, weights, ids)
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for j in range(2):
            e = int(ids[t, j])
            gate = dense13[e, :inter] @ x[t].double()
            up = dense13[e, inter:] @ x[t].double()
            hidden_act = (gate * torch.sigmoid(gate) * up).to(dtype).double()
            expected[t] += float(weights[t, j]) * (dense2[e] @ hidden_act)
    assert out.dtype == dtype
    if dtype == torch.bfloat16:
        # Bit-equal: both sides differ only by fp64 summation order before
        # rounding to bf16, and a missing bf16 rounding of the intermediate shows.
        assert torch.equal(out, expected.to(dtype))
    else:
        torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- attention


def _paged(contexts, block_size, generator, num_blocks=16):
    """Write each sequence's ``[L, H, D]`` keys/values (or values None) into shuffled blocks."""
    key_ctx, value_ctx = contexts
    heads, dim = key_ctx[0].shape[1:]
    key_cache = ref.chitu_allocate_kv_cache(
        num_blocks, block_size, heads, dim, torch.float32, "cpu"
    )
    value_cache = None
    if value_ctx is not None:
        dv = value_ctx[0].shape[-1]
        value_cache = ref.chitu_allocate_kv_cache(
            num_blocks, block_size, heads, dv, torch.float32, "cpu"
        )
    free = torch.randperm(num_blocks, generator=generator).tolist()
    max_blocks = max(-(-k.shape[0] // block_size) for k in key_ctx) + 1
    tables = torch.full((len(key_ctx), max_blocks), 999, dtype=torch.int32)  # junk past the end
    for b, keys in enumerate(key_ctx):
        used = -(-keys.shape[0] // block_size)
        tables[b, :used] = torch.tensor([free.pop() for _ in range(used)], dtype=torch.int32)
        pos = torch.arange(keys.shape[0])
        slots = tables[b, pos // block_size].long() * block_size + pos % block_size
        values = None if value_ctx is None else value_ctx[b]
        ref.chitu_store_kv(keys, values, key_cache, value_cache, slots)
    return key_cache, value_cache, tables


def test_store_kv_vs_loop():
    g = _gen(7)
    key, value = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 4, generator=g)
    slots = torch.tensor([9, 0, 3, 4, 11])
    key_cache, value_cache = torch.zeros(3, 4, 2, 3).bfloat16(), torch.zeros(3, 4, 2, 4)
    ref.chitu_store_kv(key, value, key_cache, value_cache, slots)
    expected_k, expected_v = torch.zeros(3, 4, 2, 3).bfloat16(), torch.zeros(3, 4, 2, 4)
    for t, slot in enumerate(slots.tolist()):
        expected_k[slot // 4, slot % 4] = key[t].bfloat16()
        expected_v[slot // 4, slot % 4] = value[t]
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)


def _sdpa(q, k, v, scale, causal_prefix=None):
    """Standard attention of one sequence in fp64: q [n, Hq, D], k/v [L, Hkv, *]."""
    q, k, v = (t.double().transpose(0, 1)[None] for t in (q, k, v))  # [1, H, len, D]
    mask = None
    if causal_prefix is not None:
        n, length = q.shape[2], k.shape[2]
        mask = torch.arange(length)[None, :] <= (torch.arange(n)[:, None] + length - n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)  # [n, Hq, Dv]


@pytest.mark.parametrize("queries_per_chunk", [256, 2])
def test_paged_attention_prefill_and_decode_vs_sdpa(queries_per_chunk, monkeypatch):
    monkeypatch.setattr(attention_module, "QUERIES_PER_CHUNK", queries_per_chunk)
    g = _gen(8)
    hq, hkv, d, dv, block_size, scale = 4, 2, 8, 6, 4, 0.3
    lengths, q_lens = [5, 9, 1, 4], [5, 3, 1, 0]  # fresh, cached prefix, single, no query
    keys = [torch.randn(n, hkv, d, generator=g) for n in lengths]
    values = [torch.randn(n, hkv, dv, generator=g) for n in lengths]
    key_cache, value_cache, tables = _paged((keys, values), block_size, g)
    context_lens = torch.tensor(lengths, dtype=torch.int32)

    q = torch.randn(sum(q_lens), hq, d, generator=g)
    cu = torch.tensor([0, 5, 8, 9, 9], dtype=torch.int32)
    out = ref.chitu_paged_attention_prefill(
        q, key_cache, value_cache, tables, cu, context_lens, scale
    )
    assert out.shape == (9, hq, dv) and out.dtype == torch.float32
    for b in range(3):
        expected = _sdpa(q[cu[b] : cu[b + 1]], keys[b], values[b], scale, causal_prefix=True)
        torch.testing.assert_close(out[cu[b] : cu[b + 1]], expected.float(), rtol=1e-5, atol=1e-6)

    q1 = torch.randn(4, hq, d, generator=g)
    out = ref.chitu_paged_attention_decode(q1, key_cache, value_cache, tables, context_lens, scale)
    for b in range(4):
        expected = _sdpa(q1[b : b + 1], keys[b], values[b], scale)
        torch.testing.assert_close(out[b : b + 1], expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("queries_per_chunk", [256, 2])
def test_mla_absorbed_vs_full_attention(queries_per_chunk, monkeypatch):
    monkeypatch.setattr(attention_module, "QUERIES_PER_CHUNK", queries_per_chunk)
    g = _gen(9)
    hq, rank, rope, nope, dv, block_size, scale = 3, 8, 4, 5, 6, 4, 0.25
    w_uk = torch.randn(hq, nope, rank, generator=g).double()  # c -> per-head nope key
    w_uv = torch.randn(hq, dv, rank, generator=g).double()  # c -> per-head value
    lengths = [6, 3]  # queries: the last 2 and the last 3 (the whole context)
    latents = [torch.randn(n, rank, generator=g) for n in lengths]
    k_pes = [torch.randn(n, rope, generator=g) for n in lengths]
    cached = [torch.cat([c, p], -1)[:, None, :] for c, p in zip(latents, k_pes, strict=True)]
    latent_cache, _, tables = _paged((cached, None), block_size, g)
    context_lens = torch.tensor(lengths, dtype=torch.int32)

    def full_attention(b, q_nope, q_pe):
        c, k_pe = latents[b].double(), k_pes[b].double()
        k_nope = torch.einsum("lr,hdr->lhd", c, w_uk)  # [L, Hq, nope]
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, hq, -1)], -1)
        v = torch.einsum("lr,hvr->lhv", c, w_uv)
        return _sdpa(torch.cat([q_nope, q_pe], -1), k, v, scale, causal_prefix=True)

    def absorbed_then_projected(out_latent):
        return torch.einsum("thr,hvr->thv", out_latent.double(), w_uv)

    q_nope = torch.randn(5, hq, nope, generator=g).double()
    q_pe = torch.randn(5, hq, rope, generator=g)
    q_latent = torch.einsum("thd,hdr->thr", q_nope, w_uk).float()
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    out = ref.chitu_mla_prefill(q_latent, q_pe, latent_cache, tables, cu, context_lens, scale)
    assert out.shape == (5, hq, rank) and out.dtype == torch.float32
    for b in range(2):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        expected = full_attention(b, q_nope[rows], q_pe[rows].double())
        torch.testing.assert_close(
            absorbed_then_projected(out[rows]), expected, rtol=1e-4, atol=1e-4
        )

    out = ref.chitu_mla_decode(q_latent[:2], q_pe[:2], latent_cache, tables, context_lens, scale)
    for b in range(2):
        expected = full_attention(b, q_nope[b : b + 1], q_pe[b : b + 1].double())
        torch.testing.assert_close(
            absorbed_then_projected(out[b : b + 1]), expected, rtol=1e-4, atol=1e-4
        )


# ---------------------------------------------------------------- small ops


def test_rms_norm_vs_formula():
    g = _gen(10)
    x, w = torch.randn(3, 16, generator=g), torch.randn(16, generator=g)
    expected = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(ref.chitu_rms_norm(x, w, 1e-6), expected.float())
    xb, wb = x.bfloat16(), w.bfloat16()
    x64 = xb.double()  # fp64 here keeps bf16 rounding ties out of the comparison
    hf = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * wb
    out = ref.chitu_rms_norm(xb, wb, 1e-6)
    assert out.dtype == torch.bfloat16
    # Bit-equal: rounding the normalised value before the weight is visible in bf16.
    assert torch.equal(out, hf)


def _cos_sin_cache(rot_dim, max_pos=64):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], -1).float()  # [max_pos, R]


def test_rope_neox_vs_hf_rotate_half():
    g = _gen(11)
    q, k = torch.randn(5, 3, 12, generator=g), torch.randn(5, 2, 10, generator=g)
    positions = torch.tensor([0, 7, 7, 30, 63])
    cache, r = _cos_sin_cache(8), 8

    def rotate_half(t):
        return torch.cat([-t[..., r // 2 :], t[..., : r // 2]], -1)

    cos = torch.cat([cache[positions, : r // 2]] * 2, -1)[:, None].double()
    sin = torch.cat([cache[positions, r // 2 :]] * 2, -1)[:, None].double()

    def hf(t):
        rot = t[..., :r].double()
        return torch.cat([rot * cos + rotate_half(rot) * sin, t[..., r:].double()], -1).float()

    q_out, k_out = ref.chitu_rope(q, k, positions, cache, True)
    torch.testing.assert_close(q_out, hf(q))
    torch.testing.assert_close(k_out, hf(k))
    assert torch.equal(q_out[..., r:], q[..., r:])


def test_rope_interleaved_vs_complex_multiply():
    g = _gen(12)
    q, k = torch.randn(4, 2, 8, generator=g), torch.randn(4, 1, 6, generator=g)
    positions = torch.tensor([1, 2, 40, 5])
    cache, r = _cos_sin_cache(6), 6
    rows = cache[positions].double()
    freqs_cis = torch.complex(rows[:, : r // 2], rows[:, r // 2 :])[:, None]  # [T, 1, R/2]

    def deepseek(t):  # DeepSeek-V3's apply_rotary_emb: pairs (2i, 2i+1) as complex numbers
        pairs = torch.view_as_complex(t[..., :r].double().reshape(*t.shape[:-1], -1, 2))
        rot = torch.view_as_real(pairs * freqs_cis).flatten(-2)
        return torch.cat([rot, t[..., r:].double()], -1).float()

    q_out, k_out = ref.chitu_rope(q, k, positions, cache, False)
    torch.testing.assert_close(q_out, deepseek(q))
    torch.testing.assert_close(k_out, deepseek(k))


def test_silu_and_mul():
    x = torch.randn(3, 10, generator=_gen(13))
    expected = F.silu(x[:, :5].double()) * x[:, 5:].double()
    torch.testing.assert_close(ref.chitu_silu_and_mul(x), expected.float())


# ---------------------------------------------------------------- sampling


def _sample(logits, temperature=1.0, top_p=1.0, top_k=0, generators=None):
    batch = logits.shape[0]
    return ref.chitu_sample(
        logits,
        torch.full((batch,), temperature),
        torch.full((batch,), top_p),
        torch.full((batch,), top_k, dtype=torch.int32),
        generators if generators is not None else [None] * batch,
    )


def test_sample_greedy_takes_lowest_id_on_ties():
    logits = torch.tensor([[1.0, 5.0, 5.0, 2.0], [3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 9.0]])
    out = _sample(logits, temperature=0.0)
    assert out.dtype == torch.int64 and out.tolist() == [1, 0, 3]


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(3, 1000, generator=_gen(14))
    alone_gen = _gen(123)
    alone = [_sample(logits[1:2], generators=[alone_gen]).item() for _ in range(6)]
    in_batch, batch_gens = [], [None, _gen(123), _gen(5)]
    for _ in range(6):
        torch.rand(7)  # the default RNG moves; the seeded row must not care
        in_batch.append(_sample(logits, generators=batch_gens)[1].item())
    assert in_batch == alone


PROBS = [0.4, 0.3, 0.2, 0.07, 0.03]


def test_sample_distribution_chi_square():
    draws, temperature = 20000, 0.7
    logits = torch.log(torch.tensor(PROBS)) * temperature  # softmax(logits / T) == PROBS
    gen = _gen(15)
    tokens = _sample(logits.expand(draws, -1), temperature=temperature, generators=[gen] * draws)
    counts = torch.bincount(tokens, minlength=5).double()
    expected = torch.tensor(PROBS, dtype=torch.float64) * draws
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 18.47  # 4 degrees of freedom, p = 0.001


@pytest.mark.parametrize(
    "top_k, top_p, allowed",
    [
        (2, 1.0, {0, 1}),
        (1, 1.0, {0}),
        (0, 0.65, {0, 1}),  # 0.4 < 0.65 <= 0.7
        (0, 0.75, {0, 1, 2}),
        (2, 0.5, {0}),  # top-p over the top-2 renormalised: 0.4 / 0.7 >= 0.5
        (-1, 1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_sample_top_k_top_p_never_leave_the_kept_set(top_k, top_p, allowed):
    draws = 2000
    logits = torch.log(torch.tensor(PROBS)).expand(draws, -1)
    gen = _gen(16)
    tokens = _sample(logits, top_k=top_k, top_p=top_p, generators=[gen] * draws)
    assert set(tokens.tolist()) == allowed


def test_sample_ties_keep_lower_ids_and_top_p_boundary():
    draws = 300
    logits = torch.zeros(draws, 100)  # 100 equally likely tokens
    gen = _gen(17)
    tokens = _sample(logits, top_k=3, generators=[gen] * draws)
    assert set(tokens.tolist()) == {0, 1, 2}
    # Exactly 0.25 each: tokens 0 and 1 reach top_p 0.5, so token 2 is out.
    tokens = _sample(torch.zeros(draws, 4), top_p=0.5, generators=[gen] * draws)
    assert set(tokens.tolist()) == {0, 1}


# ---------------------------------------------------------------- empty batches


def test_empty_batches():
    empty = torch.zeros(0, 8)
    handle = ref.chitu_prepare_weight(torch.randn(3, 8), None, "unquantized")
    assert ref.chitu_linear(empty, handle, torch.zeros(3)).shape == (0, 3)
    weights, ids = ref.chitu_moe_route(torch.zeros(0, 8), 2, "sigmoid", True, 4, 2, None, 1.0)
    assert weights.shape == ids.shape == (0, 2)
    experts = ref.chitu_prepare_weight(torch.randn(4, 6, 8), None, "unquantized")
    down = ref.chitu_prepare_weight(torch.randn(4, 8, 3), None, "unquantized")
    assert ref.chitu_fused_moe(empty, experts, down, weights, ids).shape == (0, 8)

    cache = torch.zeros(2, 4, 1, 8)
    no_seq = torch.zeros(0, 1, dtype=torch.int32)
    no_len = torch.zeros(0, dtype=torch.int32)
    ref.chitu_store_kv(
        torch.zeros(0, 1, 8), torch.zeros(0, 1, 8), cache, cache.clone(), no_len.long()
    )
    assert not cache.any()
    q = torch.zeros(0, 2, 8)
    assert ref.chitu_paged_attention_decode(q, cache, cache, no_seq, no_len, 1.0).shape == (0, 2, 8)
    cu = torch.zeros(1, dtype=torch.int32)
    prefill = ref.chitu_paged_attention_prefill(q, cache, cache, no_seq, cu, no_len, 1.0)
    assert prefill.shape == (0, 2, 8)
    q_latent, q_rope = torch.zeros(0, 2, 6), torch.zeros(0, 2, 2)
    assert ref.chitu_mla_decode(q_latent, q_rope, cache, no_seq, no_len, 1.0).shape == (0, 2, 6)
    assert ref.chitu_mla_prefill(q_latent, q_rope, cache, no_seq, cu, no_len, 1.0).shape == (
        0,
        2,
        6,
    )

    assert ref.chitu_rms_norm(empty, torch.ones(8), 1e-6).shape == (0, 8)
    q_out, k_out = ref.chitu_rope(q, torch.zeros(0, 1, 8), no_len.long(), _cos_sin_cache(4), True)
    assert q_out.shape == (0, 2, 8) and k_out.shape == (0, 1, 8)
    assert ref.chitu_silu_and_mul(empty).shape == (0, 4)
    assert _sample(torch.zeros(0, 5)).shape == (0,)
