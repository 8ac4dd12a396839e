"""Causal varlen prefill attention over the paged KV cache, in Triton (MHA/GQA and MLA).

One kernel, ``paged_prefill_kernel``, serves ``chitu_paged_attention_prefill``
and ``chitu_mla_prefill``. A program owns a tile of ``BLOCK_M`` rows of one
sequence (``BLOCK_M / HEADS`` consecutive queries times ``HEADS`` query heads of
one kv group) and streams that sequence's keys and values through its block
table, ``BLOCK_N`` at a time, with a flash-attention online softmax in fp32
(base-2 exponentials, the rescale deferred to the end). Key tiles that lie
wholly below the tile's first query position need no mask; the few on the
diagonal are masked; those past the last query's position are never read.

MLA in absorbed form is multi-query attention whose one kv "head" is the cached
latent row: the score adds two dot products, ``q_latent . c`` (R wide) and
``q_rope . k_pe`` (P wide, loaded separately, so 576 = 512 + 64 needs no
padding), and the value tile *is* the ``c`` tile already loaded for the score
(one load, used twice). All 128 heads share it, so heads are packed into rows.

Grid: ``(T // BLOCK_Q + B, Hq / HEADS)`` with ``BLOCK_Q = BLOCK_M / HEADS``.
Sequence ``b`` owns programs ``[cu[b] // BLOCK_Q + b, ...)`` (disjoint, enough
for ``ceil(q_len / BLOCK_Q)`` tiles); each program finds its sequence by
counting those starts on the device, so the launch needs no host sync and no
``max_q_len``. Within a sequence the last (longest, causally) query tiles run
first, which shortens the tail of the launch.

Why no SDPA path: the hook sees only the paged cache, so torch SDPA would need
the context gathered into contiguous K/V (an extra copy of every key), a
per-sequence loop or padding (host syncs), and still could not serve a cached
prefix or MLA's 576/512 split. The benchmark times SDPA (flash, causal,
contiguous K/V) as the speed to aim for instead.

FLOPs (causal): ``2 * Hq * (D + Dv) * sum_b sum_i (pos_i + 1)``. Bytes: the
queries and outputs once, each kv tile once per program that reads it (L2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from chitu_core.kernels import interpreting

SEARCH_BLOCK = 128  # sequences examined per vector step of the program -> sequence search


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape and launch parameters of ``paged_prefill_kernel``.

    block_m: rows per program: ``block_m / heads`` queries times ``heads`` query
        heads of one kv group (a power of two >= 16, the MMA's minimum M).
    block_n: keys per step (a power of two >= 16).
    pack_heads: query heads of one kv group that one program handles together,
        so that their rows share each K/V tile load (GQA, and MLA's 128 heads over
        one latent). The launcher uses the largest power of two <= this that
        divides both the group size and ``block_m``.
    num_warps, num_stages: Triton launch options (stages: software pipelining of
        the key/value loads).
    """

    block_m: int = 64
    block_n: int = 64
    pack_heads: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.pack_heads < 1:
            raise ValueError(f"pack_heads must be >= 1, got {self.pack_heads}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


# Defaults fit every target's shared memory (sm_86: 99 KB); per-arch tables live in the
# vendor plugins. Timings on an H200 (benchmarks/prefill_bench.py): Llama-8B 4 x 1024 in
# 0.20 ms (torch SDPA flash: 0.17 ms), MLA 1 x 2048 x 128 heads in 3.3 ms with the
# portable MLA default and 2.2 ms with MLA_CONFIG_SM90 (64x64 rows, 8 warps, 221 KB).
DEFAULT_CONFIG = PrefillConfig()
DEFAULT_MLA_CONFIG = PrefillConfig(block_m=32, block_n=32, pack_heads=16, num_stages=2)
MLA_CONFIG_SM90 = PrefillConfig(block_m=64, block_n=64, pack_heads=16, num_warps=8, num_stages=2)


@triton.jit
def _mma(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b, fp32 accumulate. DOT_FP32 widens the operands and asks for an
    exact fp32 product: fp32 caches (no silent TF32) and the CPU interpreter, whose
    bf16 ``tl.dot`` is wrong (see ``chitu_core.kernels.interpreting``)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _kv_step(
    acc, m_i, l_i, q, q_pe, q_pos, n0, kv_end, seq_table_ptr, k_ptr, k_pe_ptr, v_ptr,
    kv_head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, qk_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, ROPE_DIM: tl.constexpr, ROPE_PAD: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, V_IS_K: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """One key tile ``[n0, n0 + BLOCK_N)`` into the online softmax of a row tile.

    MASKED: the tile straddles the causal diagonal or the context's end, so
    keys past ``kv_end`` are not read and scores past each row's position are
    -inf; unmasked tiles lie wholly below every row's position.
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    if MASKED:
        n_ok = offs_n < kv_end
    else:
        n_ok = offs_n >= 0  # all true; keeps one code path for the masks below
    # Table entries past the context are garbage: only those of keys in range are read.
    page = tl.load(seq_table_ptr + offs_n // PAGE_SIZE, mask=n_ok, other=0)
    slot = page.to(tl.int64) * stride_kb + (offs_n % PAGE_SIZE) * stride_ks + kv_head * stride_kh
    k_mask = n_ok[:, None] & (offs_d < D)[None, :]
    k = tl.load(k_ptr + slot[:, None] + offs_d[None, :], mask=k_mask, other=0.0)  # [BN, D_PAD]
    s = _mma(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), tl.float32), DOT_FP32)
    if ROPE_DIM > 0:
        offs_p = tl.arange(0, ROPE_PAD)
        pe_mask = n_ok[:, None] & (offs_p < ROPE_DIM)[None, :]
        k_pe = tl.load(k_pe_ptr + slot[:, None] + offs_p[None, :], mask=pe_mask, other=0.0)
        s = _mma(q_pe, tl.trans(k_pe), s, DOT_FP32)
    s = s * qk_scale  # log2 domain
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
    # Every row sees key 0 in its first tile, so m_new is finite from then on.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_IS_K:
        v = k  # MLA: the value is the latent part of the key row (D == DV)
    else:
        offs_v = tl.arange(0, DV_PAD)
        v_slot = page.to(tl.int64) * stride_vb + (offs_n % PAGE_SIZE) * stride_vs
        v_slot += kv_head * stride_vh
        v_mask = n_ok[:, None] & (offs_v < DV)[None, :]
        v = tl.load(v_ptr + v_slot[:, None] + offs_v[None, :], mask=v_mask, other=0.0)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_FP32)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["num_seqs"])  # one compiled variant whatever the batch
def paged_prefill_kernel(
    q_ptr,  # [T, Hq, D] queries (MLA: q_latent)
    q_pe_ptr,  # [T, Hq, ROPE_DIM] MLA q_rope, or q_ptr when ROPE_DIM == 0
    k_ptr,  # key cache [num_blocks, PAGE_SIZE, Hkv, >= D] (MLA: the latent cache)
    k_pe_ptr,  # MLA: the latent cache + D (k_pe columns); else k_ptr
    v_ptr,  # value cache [num_blocks, PAGE_SIZE, Hkv, DV]; unused when V_IS_K
    out_ptr,  # [T, Hq, DV], contiguous in the last dim
    block_tables_ptr,  # [B, max_blocks] int32
    cu_seqlens_ptr,  # [B + 1] int32
    context_lens_ptr,  # [B] int32
    num_seqs,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_pt, stride_ph,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_bt,
    GROUP: tl.constexpr,  # query heads per kv head
    HEADS: tl.constexpr,  # query heads per program (divides GROUP and BLOCK_M)
    D: tl.constexpr, D_PAD: tl.constexpr,
    ROPE_DIM: tl.constexpr, ROPE_PAD: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr,
    V_IS_K: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEARCH: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    BLOCK_Q: tl.constexpr = BLOCK_M // HEADS
    pid = tl.program_id(0)
    head0 = tl.program_id(1) * HEADS
    kv_head = head0 // GROUP

    # Sequence of this program: the last b whose first program cu[b] // BLOCK_Q + b <= pid.
    seq = tl.program_id(0) * 0 - 1
    for b0 in range(0, num_seqs, SEARCH):
        bs = b0 + tl.arange(0, SEARCH)
        cu = tl.load(cu_seqlens_ptr + bs, mask=bs < num_seqs, other=0)
        seq += tl.sum(((cu // BLOCK_Q + bs <= pid) & (bs < num_seqs)).to(tl.int32))
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    local = pid - (q_start // BLOCK_Q + seq)
    if local * BLOCK_Q >= q_len:
        return  # a spare program of this sequence (or an empty sequence)
    tile = tl.cdiv(q_len, BLOCK_Q) - 1 - local  # longest tiles first
    context_len = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    q_idx = tile * BLOCK_Q + rows // HEADS  # query index within the sequence
    heads = head0 + rows % HEADS
    row_ok = q_idx < q_len
    q_pos = context_len - q_len + q_idx  # cache position of each row's query
    tok = (q_start + q_idx).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    q_rows = tok[:, None] * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_ptr + q_rows + offs_d[None, :], mask=row_ok[:, None] & (offs_d < D)[None, :])
    q_pe = q
    if ROPE_DIM > 0:
        offs_p = tl.arange(0, ROPE_PAD)
        pe_rows = tok[:, None] * stride_pt + heads[:, None] * stride_ph
        pe_mask = row_ok[:, None] & (offs_p < ROPE_DIM)[None, :]
        q_pe = tl.load(q_pe_ptr + pe_rows + offs_p[None, :], mask=pe_mask)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DV_PAD), tl.float32)
    first_pos = context_len - q_len + tile * BLOCK_Q
    kv_end = context_len - q_len + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len)  # last pos + 1
    kv_full = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys [0, kv_full) are seen by every row
    seq_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(0, kv_full, BLOCK_N):
        acc, m_i, l_i = _kv_step(
            acc, m_i, l_i, q, q_pe, q_pos, n0, kv_end, seq_table_ptr, k_ptr, k_pe_ptr, v_ptr,
            kv_head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, qk_scale,
            D, D_PAD, ROPE_DIM, ROPE_PAD, DV, DV_PAD, V_IS_K, PAGE_SIZE, BLOCK_N, False, DOT_FP32,
        )  # fmt: skip
    for n0 in range(kv_full, kv_end, BLOCK_N):
        acc, m_i, l_i = _kv_step(
            acc, m_i, l_i, q, q_pe, q_pos, n0, kv_end, seq_table_ptr, k_ptr, k_pe_ptr, v_ptr,
            kv_head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, qk_scale,
            D, D_PAD, ROPE_DIM, ROPE_PAD, DV, DV_PAD, V_IS_K, PAGE_SIZE, BLOCK_N, True, DOT_FP32,
        )  # fmt: skip

    acc = acc / l_i[:, None]
    offs_v = tl.arange(0, DV_PAD)
    out_ptrs = out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_v[None, :]
    out_mask = row_ok[:, None] & (offs_v < DV)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _heads_per_program(group: int, config: PrefillConfig) -> int:
    """Largest power of two <= config.pack_heads dividing the group size and block_m."""
    heads = 1
    while heads * 2 <= config.pack_heads and group % (heads * 2) == 0:
        heads *= 2
    return min(heads, config.block_m)


def _check_common(q, cache, block_tables, cu_seqlens_q, context_lens) -> None:
    if q.dim() != 3 or cache.dim() != 4:
        raise ValueError(
            f"expected q [T, Hq, D] and a cache [num_blocks, block_size, Hkv, D], "
            f"got {tuple(q.shape)} and {tuple(cache.shape)}"
        )
    num_seqs = context_lens.shape[0]
    if cu_seqlens_q.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"cu_seqlens_q must be [B + 1] and block_tables [B, max_blocks] for B = "
            f"{num_seqs} sequences, got {tuple(cu_seqlens_q.shape)}, {tuple(block_tables.shape)}"
        )
    for name, t in (("block_tables", block_tables), ("cu_seqlens_q", cu_seqlens_q),
                    ("context_lens", context_lens)):  # fmt: skip
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")


def _launch(q, q_pe, k, k_pe, v, out, block_tables, cu_seqlens_q, context_lens, scale,
            group, rope_dim, v_is_k, config) -> torch.Tensor:  # fmt: skip
    """Grid, strides and constexprs shared by both launchers; ``out`` is filled and returned."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    if num_tokens == 0 or num_heads == 0:
        return out
    heads = _heads_per_program(group, config)
    block_q = config.block_m // heads
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    cu_seqlens_q = cu_seqlens_q.contiguous()
    context_lens = context_lens.contiguous()
    dv = out.shape[-1]
    grid = (num_tokens // block_q + num_seqs, num_heads // heads)
    paged_prefill_kernel[grid](
        q, q_pe, k, k_pe, v, out, block_tables, cu_seqlens_q, context_lens,
        num_seqs, scale * math.log2(math.e),
        q.stride(0), q.stride(1), q_pe.stride(0), q_pe.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        GROUP=group, HEADS=heads,
        D=head_dim, D_PAD=triton.next_power_of_2(head_dim),
        ROPE_DIM=rope_dim, ROPE_PAD=triton.next_power_of_2(max(rope_dim, 1)),
        DV=dv, DV_PAD=triton.next_power_of_2(dv), V_IS_K=v_is_k,
        PAGE_SIZE=k.shape[1], BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        SEARCH=SEARCH_BLOCK,
        DOT_FP32=interpreting() or q.dtype == torch.float32 or k.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def paged_attention_prefill(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal varlen attention of packed queries over the paged cache (MHA/GQA).

    Args:
        q: ``[T, Hq, D]`` bf16/fp16/fp32 (any strides with a unit last stride).
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]`` /
            ``[..., Dv]`` in q's dtype; query head ``h`` reads kv head
            ``h // (Hq // Hkv)``.
        block_tables: ``[B, max_blocks]`` int32; entries past each context's end
            are never read.
        cu_seqlens_q: ``[B + 1]`` int32 prefix sums of query lengths (empty
            sequences allowed).
        context_lens: ``[B]`` int32, cached tokens per sequence, new ones included
            (``>= q_len``; not checked, that would need a host sync).
        scale: softmax scale.
        max_q_len: accepted for callers that know it; unused (the grid is sized
            from ``T`` and ``B``, see the module docstring).
        config: tile shape; ``DEFAULT_CONFIG`` when None.

    Query ``i`` of sequence ``b`` sits at position ``context_lens[b] - q_len[b] + i``
    and sees cache positions ``0..`` that position. Returns ``[T, Hq, Dv]`` in
    q's dtype. No host sync; ``T == 0`` launches nothing.
    """
    del max_q_len
    _check_common(q, key_cache, block_tables, cu_seqlens_q, context_lens)
    num_heads, num_kv_heads = q.shape[1], key_cache.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not share {num_kv_heads} kv heads evenly")
    if key_cache.shape[-1] != q.shape[-1] or value_cache.shape[:3] != key_cache.shape[:3]:
        raise ValueError(
            f"key cache {tuple(key_cache.shape)}, value cache {tuple(value_cache.shape)} "
            f"do not match q {tuple(q.shape)}"
        )
    if not key_cache.dtype == value_cache.dtype == q.dtype:
        raise ValueError(
            f"q, key_cache and value_cache must share one dtype, got {q.dtype}, "
            f"{key_cache.dtype}, {value_cache.dtype}"
        )
    q, key_cache, value_cache = map(_last_dim_contiguous, (q, key_cache, value_cache))
    out = q.new_empty(q.shape[0], num_heads, value_cache.shape[-1])
    return _launch(q, q, key_cache, key_cache, value_cache, out, block_tables, cu_seqlens_q,
                   context_lens, scale, num_heads // num_kv_heads, 0, False,
                   config or DEFAULT_CONFIG)  # fmt: skip


def mla_prefill(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal varlen MLA prefill, absorbed form, over the paged latent cache.

    Args:
        q_latent: ``[T, Hq, R]`` (already multiplied by ``W_UK``), bf16/fp16/fp32.
        q_rope: ``[T, Hq, P]`` rotated rope part, same dtype.
        latent_cache: ``[num_blocks, block_size, 1, >= R + P]``: per token ``c``
            (``[:R]``) then ``k_pe`` (``[R:R+P]``).
        block_tables, cu_seqlens_q, context_lens, max_q_len: as in
            ``paged_attention_prefill``.
        scale: softmax scale.
        config: tile shape; ``DEFAULT_MLA_CONFIG`` when None.

    ``score = scale * (q_latent . c + q_rope . k_pe)``; returns ``softmax(score) @
    c`` as ``[T, Hq, R]`` in q_latent's dtype.
    """
    del max_q_len
    _check_common(q_latent, latent_cache, block_tables, cu_seqlens_q, context_lens)
    rank, rope_dim = q_latent.shape[-1], q_rope.shape[-1]
    if q_rope.shape[:2] != q_latent.shape[:2] or latent_cache.shape[2] != 1:
        raise ValueError(
            f"expected q_rope [T, Hq, P] beside q_latent {tuple(q_latent.shape)} and a cache "
            f"with one kv head, got {tuple(q_rope.shape)}, {tuple(latent_cache.shape)}"
        )
    if latent_cache.shape[-1] < rank + rope_dim:
        raise ValueError(
            f"latent cache rows hold {latent_cache.shape[-1]} values, fewer than R + P = "
            f"{rank} + {rope_dim}"
        )
    if latent_cache.dtype != q_latent.dtype:
        raise ValueError(
            f"latent_cache must have q_latent's dtype, got {latent_cache.dtype}, {q_latent.dtype}"
        )
    q_rope = q_rope.to(q_latent.dtype)
    q_latent, q_rope, latent_cache = map(_last_dim_contiguous, (q_latent, q_rope, latent_cache))
    out = q_latent.new_empty(q_latent.shape[0], q_latent.shape[1], rank)
    k_pe = latent_cache[..., rank:]  # same strides, offset by R elements
    return _launch(q_latent, q_rope, latent_cache, k_pe, latent_cache, out, block_tables,
                   cu_seqlens_q, context_lens, scale, q_latent.shape[1], rope_dim, True,
                   config or DEFAULT_MLA_CONFIG)  # fmt: skip
