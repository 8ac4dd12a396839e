"""Paged MHA/GQA decode attention (flash-decoding) for ``chitu_paged_attention_decode``.

One query token per sequence attends to its whole paged context. The grid is
(kv head x group tile, split, sequence): each program streams the K and V
tiles of one kv head over one contiguous range of the context **once** for all
the query heads of the GQA group that read it (``tl.dot`` with the group
padded to 16 rows: the MMA has spare throughput in this memory-bound loop),
keeps an online fp32 softmax, and writes either the output (one split) or a
normalised fp32 partial plus its log-sum-exp for ``attn_reduce``.

A ``block_n`` tile of positions may span several cache blocks: position ``p``
of sequence ``b`` lives at block ``block_tables[b, p // block_size]``, offset
``p % block_size``; table entries are only read for positions below
``context_lens[b]`` (the rest may be garbage). ``context_lens`` is read on the
device only: the table width bounds the grid.

Bytes moved: ``sum_b ctx_b * Hkv * (D + Dv) * elt`` (K and V, the roofline term)
+ queries/outputs + ``4 * B * Hq * S * (Dv + 1)`` twice for S > 1 splits.
FLOPs: ``2 * sum_b ctx_b * Hq * (D + Dv)`` (x16/G with the group padding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from chitu_core.kernels import interpreting
from chitu_core.kernels.attn_reduce import (
    LOG2E,
    DecodeAttnConfig,
    attn_dot,
    check_block_size,
    check_paged_args,
    online_softmax_step,
    plan_splits,
    split_range,
    store_decode_output,
)

# Llama-3-8B shapes (G = 4, D = 128): on an H200 (benchmarks/attn_bench.py --sweep)
# block_n 32..128, 3..4 stages and 4..32 programs an SM were within 4% of each other
# at batch 64 / context 4096 (~290 us, 77% of the 4.8 TB/s roofline); 8 warps or
# block_n 32 were slower. A few programs an SM: the grid is rarely split at large batch.
GQA_DECODE_CONFIG = DecodeAttnConfig(
    block_h=16, block_n=64, num_warps=4, num_stages=4, target_ctas_per_sm=4.0
)

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def paged_decode_kernel(
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, DV]
    block_tables_ptr,  # [B, max_blocks] int32
    context_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, DV] (IS_SPLIT False)
    o_ws_ptr,  # [B, Hq, S, DV] fp32 (IS_SPLIT)
    lse_ws_ptr,  # [B, Hq, S] fp32 (IS_SPLIT)
    num_heads,
    group_size,
    num_g_tiles,
    max_len,  # max_blocks * BLOCK_SIZE
    qk_scale,  # softmax scale * log2(e)
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_btb,
    stride_ob,
    stride_oh,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid_hg = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2)
    kv_head = pid_hg // num_g_tiles
    offs_g = (pid_hg % num_g_tiles) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_mask = offs_g < group_size
    heads = kv_head * group_size + offs_g  # [BLOCK_G] query heads of this kv head

    ctx_len = tl.minimum(tl.load(context_lens_ptr + b), max_len)
    if IS_SPLIT:
        start, end = split_range(ctx_len, pid_s, tl.num_programs(1), BLOCK_N)
        if start >= end:  # nothing of this sequence here; the reduce skips the split
            return
    else:
        start, end = 0, ctx_len

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < D  # D, DV constexpr: all true, folded away, when BLOCK_D == D
    dv_mask = offs_dv < DV
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    q = q.to(k_cache_ptr.dtype.element_ty)
    k_base = k_cache_ptr + kv_head * stride_kh + offs_d[:, None]
    v_base = v_cache_ptr + kv_head * stride_vh + offs_dv[None, :]
    table = block_tables_ptr + b * stride_btb

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        # Physical block of every position; entries past the end are never read.
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        in_block = pos % BLOCK_SIZE
        k_t = tl.load(
            k_base + (block * stride_kb + in_block * stride_kt)[None, :],
            mask=valid[None, :] & d_mask[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        qk = attn_dot(q, k_t, tl.zeros([BLOCK_G, BLOCK_N], tl.float32), FP32_DOT)
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(qk, m_i, l_i)
        v = tl.load(
            v_base + (block * stride_vb + in_block * stride_vt)[:, None],
            mask=valid[:, None] & dv_mask[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_DV]
        acc = attn_dot(p.to(v.dtype), v, acc * alpha[:, None], FP32_DOT)

    store_decode_output(acc, m_i, l_i, b, heads, g_mask, offs_dv, dv_mask, pid_s, num_heads,
                        out_ptr, stride_ob, stride_oh, o_ws_ptr, lse_ws_ptr, DV, IS_SPLIT)  # fmt: skip


def paged_attention_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    config: DecodeAttnConfig = GQA_DECODE_CONFIG,
    num_sms: int | None = None,
) -> torch.Tensor:
    """Decode attention over the paged cache (semantics of ``chitu_paged_attention_decode``).

    Args:
        q: ``[B, Hq, D]`` bf16/fp16/fp32, the dtype of the caches.
        key_cache: ``[num_blocks, block_size, Hkv, D]``, ``block_size`` a power of two
            in 1..256, ``Hq % Hkv == 0`` (query head ``h`` reads kv head ``h // (Hq // Hkv)``).
        value_cache: ``[num_blocks, block_size, Hkv, Dv]``.
        block_tables: ``[B, max_blocks]`` int32; entries past a sequence's end are ignored.
        context_lens: ``[B]`` int32, ``1 <= context_lens[b] <= max_blocks * block_size``.
        scale: softmax scale.
        num_splits: context splits (flash-decoding); ``None`` picks it from the grid
            size, the table width and the SM count (host arithmetic only).
        config: tile/launch config (per-arch tables live in the plugins).
        num_sms: SM count for the split policy; ``None`` asks the device.

    Returns ``[B, Hq, Dv]`` in ``q.dtype`` (softmax in fp32). No host sync.
    Raises ``ValueError`` for unsupported shapes/dtypes (the caller falls back to
    the generic op).
    """
    if q.dim() != 3 or key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError("q must be [B, Hq, D] and the caches [num_blocks, block_size, Hkv, D]")
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    head_dim_v = value_cache.shape[-1]
    check_block_size(block_size)
    check_paged_args(block_tables, context_lens, batch)
    if key_cache.shape[-1] != head_dim or value_cache.shape[:3] != key_cache.shape[:3]:
        raise ValueError(
            f"cache shapes {tuple(key_cache.shape)}/{tuple(value_cache.shape)} do not match "
            f"q {tuple(q.shape)}"
        )
    if num_heads and (num_kv_heads == 0 or num_heads % num_kv_heads):
        raise ValueError(f"{num_heads} query heads do not share {num_kv_heads} kv heads evenly")
    if q.dtype not in _DTYPES or key_cache.dtype != q.dtype or value_cache.dtype != q.dtype:
        raise ValueError(
            f"q/key/value dtypes must be one of bf16, fp16, fp32 and equal, got "
            f"{q.dtype}/{key_cache.dtype}/{value_cache.dtype}"
        )
    if max(head_dim, head_dim_v) > 512:
        raise ValueError(f"head dims up to 512 are supported, got {head_dim}/{head_dim_v}")
    for name, t in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")

    out = torch.empty((batch, num_heads, head_dim_v), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    group = num_heads // num_kv_heads
    block_g = min(max(16, triton.next_power_of_2(group)), max(16, config.block_h))
    num_g_tiles = triton.cdiv(group, block_g)
    max_len = block_tables.shape[1] * block_size
    plan = plan_splits(
        out, max_len, batch * num_kv_heads * num_g_tiles, num_splits, config, num_sms
    )
    paged_decode_kernel[(num_kv_heads * num_g_tiles, plan.num_splits, batch)](
        q, key_cache, value_cache, block_tables, context_lens, out, plan.o_ws, plan.lse_ws,
        num_heads, group, num_g_tiles, max_len, scale * LOG2E,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        D=head_dim, DV=head_dim_v,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
        BLOCK_G=block_g, BLOCK_N=config.block_n, BLOCK_SIZE=block_size, IS_SPLIT=plan.is_split,
        FP32_DOT=interpreting() or q.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return plan.finish(context_lens, out)
