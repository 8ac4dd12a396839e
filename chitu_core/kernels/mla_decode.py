"""Paged MLA decode attention (DeepSeek-V3, absorbed form) for ``chitu_mla_decode``.

With ``R = kv_lora_rank`` (512) and ``P = qk_rope_head_dim`` (64), every cached
token is one row ``[c (R), k_pe (P)]`` shared by all query heads, so decode is
multi-query attention with keys ``[c, k_pe]`` and values ``c``::

    score[h, j] = scale * (q_latent[h] . c_j + q_rope[h] . k_pe_j)
    out[h] = softmax_j(score[h]) @ c            # [H, R], still in latent space

The grid is (head tile, split, sequence) with the head tiles of one (sequence,
split) adjacent, so the ``ceil(H / block_h)`` programs that read the same
latent tiles run together and all but the first find them in L2. Each program
loads a ``[block_n, R]`` latent tile and a ``[block_n, P]`` rope tile (the
576-wide row is not a power of two, so the two parts are separate loads), uses
the latent tile twice (``q_latent @ c^T`` and ``p @ c``) and keeps an fp32
``[block_h, R]`` accumulator: 64 x 512 fp32 is 128 KB of registers, so
``block_h = 64`` wants 8 warps (128 accumulator registers a thread).

At 128 heads this is MMA-bound rather than HBM-bound (see FLOPs below): the
``q_latent @ c^T`` product is a chain of 36 dependent small MMAs a step and
Triton overlaps neither steps nor the two warpgroups' work, so the kernel
reaches about 20% of the bf16 peak (H200); warp-specialised kernels
(FlashMLA) do several times better on sm_90.

Bytes moved (HBM): ``sum_b ctx_b * (R + P) * elt`` (the roofline term) + queries
and outputs + ``4 * B * H * S * (R + 1)`` twice for S > 1 splits.
FLOPs: ``2 * sum_b ctx_b * H * (2R + P)``: at H = 128 about 240 FLOP per latent
byte, close to the H100's bf16 ridge point, so the MMA rate matters here too.
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

# DeepSeek-V3 (128 heads, R 512, P 64): two head tiles of 64, 8 warps, 64 positions a
# step (best of the H200 sweep in benchmarks/attn_bench.py: 350 us at batch 64 / context
# 4096 against 454 us with 32 positions and 730+ us with 16 warps); 155 KB of shared
# memory, so sm_86 (99 KB) needs block_n = 16. The programs are large: aim at about one
# wave (split only when batch x head tiles is below the SM count).
MLA_DECODE_CONFIG = DecodeAttnConfig(
    block_h=64, block_n=64, num_warps=8, num_stages=2, target_ctas_per_sm=1.0,
    min_tokens_per_split=256, max_splits=32,
)  # fmt: skip

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def mla_decode_kernel(
    q_latent_ptr,  # [B, H, R]
    q_rope_ptr,  # [B, H, P]
    cache_ptr,  # [num_blocks, BLOCK_SIZE, 1, R + P]
    block_tables_ptr,  # [B, max_blocks] int32
    context_lens_ptr,  # [B] int32
    out_ptr,  # [B, H, R] (IS_SPLIT False)
    o_ws_ptr,  # [B, H, S, R] fp32 (IS_SPLIT)
    lse_ws_ptr,  # [B, H, S] fp32 (IS_SPLIT)
    num_heads,
    max_len,  # max_blocks * BLOCK_SIZE
    qk_scale,  # softmax scale * log2(e)
    stride_qlb,
    stride_qlh,
    stride_qrb,
    stride_qrh,
    stride_cb,
    stride_ct,
    stride_btb,
    stride_ob,
    stride_oh,
    R: tl.constexpr,
    P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2)
    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = heads < num_heads

    ctx_len = tl.minimum(tl.load(context_lens_ptr + b), max_len)
    if IS_SPLIT:
        start, end = split_range(ctx_len, pid_s, tl.num_programs(1), BLOCK_N)
        if start >= end:  # nothing of this sequence here; the reduce skips the split
            return
    else:
        start, end = 0, ctx_len

    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    r_mask = offs_r < R  # R, P constexpr: all true, folded away, when BLOCK_R == R
    p_mask = offs_p < P
    q_latent = tl.load(
        q_latent_ptr + b * stride_qlb + heads[:, None] * stride_qlh + offs_r[None, :],
        mask=h_mask[:, None] & r_mask[None, :],
        other=0.0,
    ).to(cache_ptr.dtype.element_ty)  # [BLOCK_H, BLOCK_R]
    q_rope = tl.load(
        q_rope_ptr + b * stride_qrb + heads[:, None] * stride_qrh + offs_p[None, :],
        mask=h_mask[:, None] & p_mask[None, :],
        other=0.0,
    ).to(cache_ptr.dtype.element_ty)  # [BLOCK_H, BLOCK_P]
    table = block_tables_ptr + b * stride_btb

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        # Physical block of every position; entries past the end are never read.
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        rows = cache_ptr + block * stride_cb + (pos % BLOCK_SIZE) * stride_ct  # [BLOCK_N]
        c = tl.load(
            rows[:, None] + offs_r[None, :], mask=valid[:, None] & r_mask[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_R]
        k_pe_t = tl.load(
            rows[None, :] + R + offs_p[:, None], mask=valid[None, :] & p_mask[:, None], other=0.0
        )  # [BLOCK_P, BLOCK_N]
        qk = attn_dot(q_rope, k_pe_t, tl.zeros([BLOCK_H, BLOCK_N], tl.float32), FP32_DOT)
        qk = attn_dot(q_latent, tl.trans(c), qk, FP32_DOT)
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(qk, m_i, l_i)
        acc = attn_dot(p.to(c.dtype), c, acc * alpha[:, None], FP32_DOT)

    store_decode_output(acc, m_i, l_i, b, heads, h_mask, offs_r, r_mask, pid_s, num_heads,
                        out_ptr, stride_ob, stride_oh, o_ws_ptr, lse_ws_ptr, R, IS_SPLIT)  # fmt: skip


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    config: DecodeAttnConfig = MLA_DECODE_CONFIG,
    num_sms: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode over the paged latent cache (semantics of ``chitu_mla_decode``).

    Args:
        q_latent: ``[B, H, R]`` bf16/fp16/fp32 (the cache dtype), the no-rope query
            already multiplied by ``W_UK``.
        q_rope: ``[B, H, P]`` rotated rope query (cast to the cache dtype).
        latent_cache: ``[num_blocks, block_size, 1, >= R + P]``: per token ``c`` then
            ``k_pe``; ``block_size`` a power of two in 1..256.
        block_tables: ``[B, max_blocks]`` int32; entries past a sequence's end are ignored.
        context_lens: ``[B]`` int32, ``1 <= context_lens[b] <= max_blocks * block_size``.
        scale: softmax scale.
        num_splits: context splits; ``None`` picks it from the grid size, the table
            width and the SM count (host arithmetic only).
        config: tile/launch config (per-arch tables live in the plugins).
        num_sms: SM count for the split policy; ``None`` asks the device.

    Returns ``[B, H, R]`` in ``q_latent.dtype`` (softmax in fp32). No host sync.
    Raises ``ValueError`` for unsupported shapes/dtypes (the caller falls back).
    """
    if q_latent.dim() != 3 or q_rope.dim() != 3 or latent_cache.dim() != 4:
        raise ValueError(
            "q_latent/q_rope must be [B, H, R]/[B, H, P], latent_cache "
            "[num_blocks, block_size, 1, R + P]"
        )
    batch, num_heads, rank = q_latent.shape
    rope_dim = q_rope.shape[-1]
    block_size = latent_cache.shape[1]
    check_block_size(block_size)
    check_paged_args(block_tables, context_lens, batch)
    if q_rope.shape[:2] != (batch, num_heads):
        raise ValueError(f"q_rope {tuple(q_rope.shape)} does not match q_latent {q_latent.shape}")
    if latent_cache.shape[2] != 1 or latent_cache.shape[3] < rank + rope_dim:
        raise ValueError(
            f"latent_cache must be [num_blocks, block_size, 1, R + P = {rank + rope_dim}], "
            f"got {tuple(latent_cache.shape)}"
        )
    if q_latent.dtype not in _DTYPES or latent_cache.dtype != q_latent.dtype:
        raise ValueError(
            f"q_latent and latent_cache must share a dtype in bf16/fp16/fp32, got "
            f"{q_latent.dtype}/{latent_cache.dtype}"
        )
    if q_rope.dtype not in _DTYPES:
        raise ValueError(f"q_rope dtype {q_rope.dtype} is not supported")
    if rank > 1024 or rope_dim > 256 or rank < 1 or rope_dim < 1:
        raise ValueError(f"R up to 1024 and P 1..256 are supported, got R={rank}, P={rope_dim}")
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope), ("latent_cache", latent_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")

    out = torch.empty((batch, num_heads, rank), dtype=q_latent.dtype, device=q_latent.device)
    if out.numel() == 0:
        return out
    block_h = config.block_h
    num_h_tiles = triton.cdiv(num_heads, block_h)
    max_len = block_tables.shape[1] * block_size
    plan = plan_splits(out, max_len, batch * num_h_tiles, num_splits, config, num_sms)
    mla_decode_kernel[(num_h_tiles, plan.num_splits, batch)](
        q_latent, q_rope, latent_cache, block_tables, context_lens, out, plan.o_ws, plan.lse_ws,
        num_heads, max_len, scale * LOG2E,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        latent_cache.stride(0), latent_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        R=rank, P=rope_dim,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), BLOCK_P=max(16, triton.next_power_of_2(rope_dim)),
        BLOCK_H=block_h, BLOCK_N=config.block_n, BLOCK_SIZE=block_size, IS_SPLIT=plan.is_split,
        FP32_DOT=interpreting() or q_latent.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return plan.finish(context_lens, out)
