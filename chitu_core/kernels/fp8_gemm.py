"""Soft-FP8 GEMM: ``y[M, N] = x[M, K] @ dequant(W)^T`` with W kept as e4m3 bits in memory.

W is ``[N, K]`` uint8 (e4m3fn codes) with DeepSeek-V3 block scales
(``weight_scale_inv [ceil(N/128), ceil(K/128)]`` fp32) or per-channel scales
(``[N]`` fp32). The codes are widened to bf16 in registers by integer bit
manipulation (``e4m3_widen.py``), so the kernel needs no FP8 hardware and
compiles for sm_80/sm_86 and HIP; the MMA runs in bf16 on the tensor cores.

Three kernels and a fallback, picked per M (and K) by the plugins' config tables
(``Fp8GemmConfig.kind``):

* ``gemv`` (decode, M <= 16 or so): memory-bound; each program streams
  ``[BLOCK_N, 128]`` weight tiles, FMA at M <= 4, a small swap-AB MMA above;
  split-K so that every SM streams the weight, partials summed in the launch.
* ``mm`` (M 2..32): ``acc[M, N] = x @ widen(W)^T``, the widened tile the MMA's
  B operand, reused over the token tile.
* ``wide`` (batched decode, M 33..128): swap-AB ``acc[N, M] = widen(W) @ x^T``,
  the widened tile the MMA's A operand, taken from registers.
* ``dequant`` (prefill): widen the whole weight to bf16, then cuBLAS.

K-permuted weights (``permute_k``, ``k_perm=True``; what the NVIDIA plugin packs): within
each 16-wide K group the four codes that one thread of the MMA operand fragment holds
(k = 2t, 2t+1, 2t+8, 2t+9) sit in one 32-bit word. The ``wide`` kernel loads words and
widens them straight into its operand registers, without the byte permutes that gather
codes from K order (sm_90 SASS, Triton 3.9, 64 x 128 x 64 tile: 16 instead of 72 PRMT and
9 instead of 25 LDS per K step); ``gemv``/``mm`` permute their x tile the same way in
registers and ``dequant`` un-permutes before its store. The sum over K does not depend on
the order, so every kernel takes either layout.

Block scales: with ``scale_on_acc`` the exact e4m3 values go into the MMA and
each 128-wide K step's partial product is multiplied by its scale in fp32
(exact operands, one FMA per accumulator element per K step); otherwise the
scale is folded into the widened tile before the MMA (one bf16 rounding of
``e4m3 * scale``, no per-step accumulator work; the ``wide`` kernel does it inside
the widening, ``e4m3_scaled_to_bf16``).

Bytes moved: N*K (weight) + 2*M*K (x) + 2*M*N (y) [+ 8*SPLIT_K*M*N partials].
FLOPs: 2*M*N*K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from chitu_core.kernels import interpreting
from chitu_core.kernels.e4m3_widen import (
    FOLD_SCALE_MAX,
    FOLD_SCALE_MIN,
    e4m3_scaled_to_bf16,
    e4m3_to_bf16,
    e4m3_to_f16_x256,
    e4m3_word_scaled_to_bf16,
)

SCALE_BLOCK = 128  # DeepSeek-V3 block size along N and K

# scale_mode values (constexpr in the kernel)
SCALE_BLOCK_ON_ACC = 0
SCALE_BLOCK_ON_WEIGHT = 1
SCALE_CHANNEL = 2


@dataclass(frozen=True)
class Fp8GemmConfig:
    """Tile shape and launch parameters of the soft-FP8 GEMM (``fp8_gemm``).

    kind: which kernel runs it:
        ``"gemv"``: ``fp8_gemv_kernel`` (decode, M <= 16): no tensor cores when
            ``block_m <= 4`` (fp32 FMA), a small swap-AB ``tl.dot`` otherwise;
            always ``block_k = 128`` (one scale block per step).
        ``"mm"``: ``fp8_mm_kernel`` (batched decode and prefill): ``acc[M, N] = x @ W^T``
            with the widened weight tile as the MMA's B operand, reused over the M tile.
        ``"wide"``: ``fp8_wide_kernel`` (batched decode and prefill): swap-AB
            ``acc[N, M] = widen(W) @ x^T``, the widened tile the MMA's register operand.
        ``"dequant"``: widen the whole weight to a bf16 scratch buffer
            (``dequant_kernel``), then cuBLAS (prefill fallback).
    split_k: number of K slices (1: no split); 0 picks it from the SM count, at most
        ``max_split_k`` (``pick_split_k``).
    target_ctas_per_sm: with ``split_k = 0``: 0 picks the split that fills whole waves
        of one program per SM; a positive value picks the one whose program count is
        nearest this many per SM (what the short-lived decode mm programs want).
    scale_on_acc: block scales applied to the fp32 accumulator per K step
        (exact operands) instead of folded into the widened weight tile.
    fused_reduce: split-K partials summed by the last program of each output
        tile (one launch, counters in a cached buffer) instead of a second kernel.
        NVIDIA only (its ordering is checked there); ignored elsewhere.
    prefetch: gemv only: load the next weight tile before using the current one.
    """

    block_n: int = 64
    block_m: int = 16
    block_k: int = 128
    split_k: int = 0
    max_split_k: int = 16
    target_ctas_per_sm: float = 0.0
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4
    scale_on_acc: bool = True
    kind: str = "wide"
    fused_reduce: bool = True
    prefetch: bool = False

    def __post_init__(self) -> None:
        for name in ("block_n", "block_m", "block_k"):
            v = getattr(self, name)
            least = 1 if (self.kind == "gemv" and name == "block_m") else 16
            if v < least or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= {least}, got {v}")
        if self.kind == "gemv" and 4 < self.block_m < 16:
            raise ValueError(
                f"gemv block_m must be 1, 2, 4 (FMA) or >= 16 (MMA), got {self.block_m}"
            )
        if self.kind not in ("gemv", "mm", "wide", "dequant"):
            raise ValueError(f"kind must be gemv, mm, wide or dequant, got {self.kind!r}")
        if self.split_k < 0:
            raise ValueError(f"split_k must be >= 0 (0 = automatic), got {self.split_k}")
        if self.target_ctas_per_sm < 0:
            raise ValueError(f"target_ctas_per_sm must be >= 0, got {self.target_ctas_per_sm}")


@triton.jit
def _dot(a, b, acc, DOT_IN_FP32: tl.constexpr):
    """acc + a @ b, fp32 accumulate; DOT_IN_FP32 only for the CPU interpreter."""
    if DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in grouped order: GROUP_M token tiles in a
    row share one weight tile while it is in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


K_PERM_GROUP = 16  # K-permuted weights reorder codes within groups of this many
# position p of a group holds the code of k = _K_PERM_SOURCE[p] (``k_perm_tile`` in-kernel)
_K_PERM_SOURCE = torch.tensor(
    [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15], dtype=torch.long
)


def permute_k(w_bits: torch.Tensor) -> torch.Tensor:
    """The K-permuted copy of ``[..., K]`` e4m3 codes (K % 16 == 0) that ``fp8_gemm`` takes
    with ``k_perm=True``: within each 16-wide K group, byte ``4t + j`` holds the code of
    ``k = 2t + (j & 1) + 8 * (j >> 1)``, the four codes that one thread of a 16x16 MMA
    operand fragment holds (k = 2t, 2t+1, 2t+8, 2t+9), so one 32-bit load feeds it."""
    k = w_bits.shape[-1]
    if k % K_PERM_GROUP:
        raise ValueError(f"K-permuted weights need K % {K_PERM_GROUP} == 0, got K = {k}")
    src = _K_PERM_SOURCE.to(w_bits.device)
    g = w_bits.reshape(*w_bits.shape[:-1], k // K_PERM_GROUP, K_PERM_GROUP)
    return g[..., src].reshape(w_bits.shape).contiguous()


def unpermute_k(w_bits: torch.Tensor) -> torch.Tensor:
    """The inverse of ``permute_k``: codes back in K order."""
    k = w_bits.shape[-1]
    g = w_bits.reshape(*w_bits.shape[:-1], k // K_PERM_GROUP, K_PERM_GROUP)
    return (
        g[..., torch.argsort(_K_PERM_SOURCE).to(w_bits.device)].reshape(w_bits.shape).contiguous()
    )


@triton.jit
def k_perm_tile(t, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[ROWS, BLOCK_K]`` in K order (BLOCK_K % 16 == 0, aligned to 16) -> the order of
    ``permute_k``, in registers: how a tile of x meets a K-permuted weight tile."""
    G: tl.constexpr = BLOCK_K // 16
    t = tl.reshape(t, (ROWS, G, 2, 4, 2))  # k = 16 group + 8h + 2t + e
    return tl.reshape(tl.permute(t, (0, 1, 3, 2, 4)), (ROWS, BLOCK_K))  # at 16 group + 4t + 2h + e


@triton.jit
def k_unperm_tile(t, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The inverse of ``k_perm_tile``: a K-permuted ``[ROWS, BLOCK_K]`` tile back in K order."""
    G: tl.constexpr = BLOCK_K // 16
    t = tl.reshape(t, (ROWS, G, 4, 2, 2))
    return tl.reshape(tl.permute(t, (0, 1, 3, 2, 4)), (ROWS, BLOCK_K))


@triton.jit
def _widen_codes(bits, s, SCALE_MODE: tl.constexpr, USE_PTX: tl.constexpr,
                 WIDEN_BF16: tl.constexpr, NAN: tl.constexpr, DTYPE: tl.constexpr,
                 FOLD: tl.constexpr = True):  # fmt: skip
    """The MMA operand of a tile of uint8 codes ``[rows, cols]``: with SCALE_MODE 1 the value
    times its row's block scale ``s [rows]`` (with FOLD, bf16 activations on NVIDIA: in one
    PTX pass, divided by FOLD_FIX; needs ``scales_foldable``), else the exact value (bf16)
    or value / 256 (fp16)."""
    if SCALE_MODE == 1:
        if FOLD and USE_PTX and WIDEN_BF16:
            w = e4m3_scaled_to_bf16(bits, s[:, None], NAN)
        else:
            w16 = e4m3_to_f16_x256(bits, USE_PTX, NAN)
            w = (w16.to(tl.float32) * (s * 256.0)[:, None]).to(DTYPE)
    elif WIDEN_BF16:
        w = e4m3_to_bf16(bits, USE_PTX, NAN)
    else:
        w = e4m3_to_f16_x256(bits, USE_PTX, NAN)
    return w


@triton.jit
def _widen_words(words, s, SCALE_MODE: tl.constexpr, USE_PTX: tl.constexpr,
                 WIDEN_BF16: tl.constexpr, NAN: tl.constexpr, DTYPE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """``_widen_codes`` of a K-permuted tile loaded as int32 words ``[BLOCK_N, BLOCK_K // 4]``,
    returned as the ``[BLOCK_N, BLOCK_K]`` operand in K order. The words' four codes land in
    the registers where the MMA operand wants them (join/permute/reshape, no data movement)."""
    if SCALE_MODE == 1 and USE_PTX and WIDEN_BF16:
        o0, o1, o2, o3 = e4m3_word_scaled_to_bf16(words, s, NAN)
    else:  # one byte plane at a time (code j of each word: bits 8j..8j+7)
        mode: tl.constexpr = SCALE_MODE
        o0 = _widen_codes((words & 0xFF).to(tl.uint8), s, mode, USE_PTX, WIDEN_BF16, NAN, DTYPE)
        o1 = _widen_codes(((words >> 8) & 0xFF).to(tl.uint8), s, mode, USE_PTX, WIDEN_BF16, NAN,
                          DTYPE)  # fmt: skip
        o2 = _widen_codes(((words >> 16) & 0xFF).to(tl.uint8), s, mode, USE_PTX, WIDEN_BF16, NAN,
                          DTYPE)  # fmt: skip
        o3 = _widen_codes(((words >> 24) & 0xFF).to(tl.uint8), s, mode, USE_PTX, WIDEN_BF16, NAN,
                          DTYPE)  # fmt: skip
    G: tl.constexpr = BLOCK_K // 16
    o0 = tl.reshape(o0, (BLOCK_N, G, 4))
    o1 = tl.reshape(o1, (BLOCK_N, G, 4))
    o2 = tl.reshape(o2, (BLOCK_N, G, 4))
    o3 = tl.reshape(o3, (BLOCK_N, G, 4))
    # [BLOCK_N, group, t, pair element e, half h] -> k = 16 * group + 8h + 2t + e
    t = tl.join(tl.join(o0, o1), tl.join(o2, o3))
    return tl.reshape(tl.permute(t, (0, 1, 4, 2, 3)), (BLOCK_N, BLOCK_K))


@triton.jit
def _tile_and_k_slice(
    M, N, K, k_tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """This program's output tile and K slice (grid: output tiles in grouped order x K
    slices): ``offs_m [BLOCK_M]``, ``offs_n [BLOCK_N]`` and its K tiles ``[kt_begin, kt_end)``."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    kt_begin = tl.program_id(1) * k_tiles_per_split
    kt_end = min(kt_begin + k_tiles_per_split, tl.cdiv(K, BLOCK_K))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, kt_begin, kt_end


@triton.jit
def _store_or_reduce(
    acc,  # fp32 tile, WITHOUT bias
    bias,  # fp32 tile broadcastable to acc (ignored unless HAS_BIAS)
    y_ptrs,  # pointers of the output tile
    ws_ptrs,  # pointers of this tile in split 0 of the fp32 workspace [split, M, N]
    out_mask,
    pid_k,
    n_split,
    ws_split_stride,  # M * N
    cnt_ptr,  # int32 counters, one per output tile, zero between launches
    tile_id,
    HAS_BIAS: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
):
    """Store the tile (no split), or its split-K partial; with FUSED_REDUCE the last
    program to finish a tile sums all partials (in split order: deterministic), adds
    the bias, writes y and re-arms the tile's counter. Ordering: every thread stores its
    partial, a barrier, then thread 0 takes an acq_rel ticket at GPU scope (its release
    publishes the program's stores, the pattern of CUTLASS's split-K semaphore), which
    Triton hands to the other threads through shared memory and a barrier; the last
    program's loads (``.cg``, from L2) follow its acquire. No separate fence: on sm_90 the
    acq_rel atomic is itself MEMBAR.GPU + ATOMG + CCTL.IVALL, and a fence.acq_rel.gpu in
    every thread before it cost 0.5-1.2 us a GEMM on an H200
    (benchmarks/results/splitk-tail-h200-2026-11-26.txt)."""
    if n_split == 1:
        if HAS_BIAS:
            acc += bias
        tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=out_mask)
    else:
        tl.store(ws_ptrs + pid_k * ws_split_stride, acc, mask=out_mask)
        if FUSED_REDUCE:
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")  # GPU scope
            if ticket == n_split - 1:
                total = tl.load(ws_ptrs, mask=out_mask, other=0.0, cache_modifier=".cg")
                for sp in range(1, n_split):
                    total += tl.load(
                        ws_ptrs + sp * ws_split_stride,
                        mask=out_mask,
                        other=0.0,
                        cache_modifier=".cg",
                    )
                if HAS_BIAS:
                    total += bias
                tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=out_mask)
                # the next launch starts after this one has completed: no ordering needed
                tl.atomic_xchg(cnt_ptr + tile_id, 0, sem="relaxed")


@triton.jit
def fp8_gemv_kernel(
    x_ptr,  # [M, K] bf16/fp16, K contiguous
    w_ptr,  # [N, K] uint8 e4m3 codes, K contiguous
    scale_ptr,  # block: [ceil(N/128), ceil(K/128)] fp32; channel: [N] fp32
    bias_ptr,  # [N] or a dummy
    y_ptr,  # [M, N]
    ws_ptr,  # [split, M, N] fp32 partials (split > 1) or a dummy
    cnt_ptr,  # int32 [num N tiles] counters (FUSED_REDUCE) or a dummy
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_sk,
    stride_ym,
    k_tiles_per_split,
    SCALE_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_PTX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PREFETCH: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    WIDEN_BF16: tl.constexpr = False,
    NAN: tl.constexpr = True,
    K_PERM: tl.constexpr = False,
):
    """Decode GEMV/skinny GEMM: each program streams a [BLOCK_N, 128] weight tile per
    step (16-byte loads along K), widens it in registers and multiplies by the x
    slice: fp32 FMA when BLOCK_M <= 4 (at BLOCK_M = 1 into per-thread partials summed
    across threads once after the loop, the block scale folded into x), a
    swap-AB ``tl.dot`` into a [BLOCK_N, BLOCK_M] tile when BLOCK_M >= 16 (the block
    scale multiplies the per-step partial). The widening's 2^-8 is undone once at
    the end. NAN=False: widening without the NaN fix, for weights with no NaN code.
    Bytes: N*K + 2*M*K*ceil(N/BLOCK_N) (L2) + partials."""
    BLOCK_K: tl.constexpr = 128
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_split = tl.num_programs(1)
    k_tiles = tl.cdiv(K, BLOCK_K)
    kt_begin = pid_k * k_tiles_per_split
    kt_end = min(kt_begin + k_tiles_per_split, k_tiles)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    rows_n = offs_n % N
    rows_m = offs_m % M
    k0 = kt_begin * BLOCK_K
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + (k0 + offs_k)[None, :]
    if BLOCK_M == 1:
        x_ptrs = x_ptr + k0 + offs_k
    else:
        x_ptrs = x_ptr + rows_m[None, :] * stride_xm + (k0 + offs_k)[:, None]  # [BK, BM]
    if SCALE_MODE != 2:
        s_ptrs = scale_ptr + (rows_n // 128) * stride_sn + kt_begin * stride_sk

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if BLOCK_M == 1:
        # Each thread sums the products of its own 16 K codes (one 16-byte load) into
        # one partial per row; the partials of a row are summed across threads once,
        # after the loop (a per-step cross-thread reduction costs more than the widening,
        # a full [BLOCK_N, 128] accumulator costs the registers that keep loads in flight).
        acc_k = tl.zeros((BLOCK_N, BLOCK_K // 16), dtype=tl.float32)
        # BLOCK_N <= 128 (aligned): the tile's rows share one scale row, so the
        # block scale is a scalar per step, folded into the 128 x values.
        s_row_ptr = scale_ptr + (pid_n * BLOCK_N // 128) * stride_sn + kt_begin * stride_sk
    if PREFETCH:  # register double buffer: tile kt+1 is in flight while tile kt is used
        # Every split owns >= 1 K tile (fp8_gemm sizes the split so), so the first
        # tile is in bounds; unmasked when EVEN_K so that the loads stay 16-byte wide.
        if EVEN_K:
            w_next = tl.load(w_ptrs)
        else:
            w_next = tl.load(w_ptrs, mask=(k0 + offs_k < K)[None, :], other=0)
    for kt in range(kt_begin, kt_end):
        if PREFETCH:
            w_bits = w_next
            # the last step re-reads its own tile (in bounds, unused) instead of masking:
            # a 0/1 times BLOCK_K offset keeps the pointer's 16-byte alignment provable
            nxt = (kt + 1 < kt_end).to(tl.int32) * BLOCK_K
            if EVEN_K:
                w_next = tl.load(w_ptrs + nxt)
            else:
                k_nx = kt * BLOCK_K + nxt + offs_k
                w_next = tl.load(w_ptrs + nxt, mask=(k_nx < K)[None, :], other=0)
        if EVEN_K:
            if not PREFETCH:
                w_bits = tl.load(w_ptrs)
            xt = tl.load(x_ptrs)
        else:
            k_ok = kt * BLOCK_K + offs_k < K
            if not PREFETCH:
                w_bits = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
            if BLOCK_M == 1:
                xt = tl.load(x_ptrs, mask=k_ok, other=0.0)
            else:
                xt = tl.load(x_ptrs, mask=k_ok[:, None], other=0.0)
        if K_PERM:  # x into the K-permuted weight's order (the sum does not care)
            if BLOCK_M == 1:
                xt = tl.reshape(k_perm_tile(tl.reshape(xt, (1, BLOCK_K)), 1, BLOCK_K), (BLOCK_K,))
            else:  # [BLOCK_K, BLOCK_M]
                xt = tl.trans(k_perm_tile(tl.trans(xt), BLOCK_M, BLOCK_K))
        if BLOCK_M == 1:
            w = e4m3_to_f16_x256(w_bits, USE_PTX, NAN).to(tl.float32)  # exact e4m3 / 256
            xf = xt.to(tl.float32)
            if SCALE_MODE == 2:
                prod = w * xf[None, :]
            elif BLOCK_N <= 128:
                prod = w * (xf * tl.load(s_row_ptr))[None, :]
                s_row_ptr += stride_sk
            else:
                prod = w * (xf[None, :] * tl.load(s_ptrs)[:, None])
                s_ptrs += stride_sk
            acc_k += tl.sum(tl.reshape(prod, (BLOCK_N, BLOCK_K // 16, 16)), axis=2)
        else:
            if BLOCK_M < 16:
                w16 = e4m3_to_f16_x256(w_bits, USE_PTX, NAN)
                prod = w16.to(tl.float32)[:, :, None] * xt.to(tl.float32)[None, :, :]
                part = tl.sum(prod, axis=1)
            elif WIDEN_BF16:  # exact bf16 values straight into the bf16 MMA (no fp16 -> bf16 F2F)
                wb = e4m3_to_bf16(w_bits, USE_PTX, NAN)
                part = _dot(wb, xt, tl.zeros((BLOCK_N, BLOCK_M), tl.float32), DOT_IN_FP32)
            else:
                w16 = e4m3_to_f16_x256(w_bits, USE_PTX, NAN)
                part = _dot(w16.to(xt.dtype), xt, tl.zeros((BLOCK_N, BLOCK_M), tl.float32),
                            DOT_IN_FP32)  # fmt: skip
            if SCALE_MODE != 2:
                acc += part * tl.load(s_ptrs)[:, None]
                s_ptrs += stride_sk
            else:
                acc += part
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if BLOCK_M == 1:
        acc += tl.sum(acc_k, axis=1)[:, None]

    FIX: tl.constexpr = 1.0 if (WIDEN_BF16 and BLOCK_M >= 16) else 256.0  # WIDEN_SCALE_FIX
    if SCALE_MODE == 2:
        acc = acc * (tl.load(scale_ptr + rows_n) * FIX)[:, None]
    else:
        acc = acc * FIX
    out_mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    ws_ptrs = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
    bias = acc
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows_n).to(tl.float32)[:, None]
    _store_or_reduce(acc, bias, y_ptrs, ws_ptrs, out_mask, pid_k, n_split, M * N, cnt_ptr, pid_n,
                     HAS_BIAS, FUSED_REDUCE)  # fmt: skip


@triton.jit
def fp8_mm_kernel(
    x_ptr,  # [M, K] bf16/fp16, K contiguous
    w_ptr,  # [N, K] uint8 e4m3 codes, K contiguous
    scale_ptr,  # block: [ceil(N/128), ceil(K/128)] fp32; channel: [N] fp32
    bias_ptr,  # [N] or a dummy
    y_ptr,  # [M, N]
    ws_ptr,  # [split, M, N] fp32 partials (split > 1) or a dummy
    cnt_ptr,  # int32 [num tiles] counters (FUSED_REDUCE) or a dummy
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_sk,
    stride_ym,
    k_tiles_per_split,
    SCALE_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_PTX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    WIDEN_BF16: tl.constexpr = False,
    NAN: tl.constexpr = True,
    K_PERM: tl.constexpr = False,
):
    """``acc[BLOCK_M, BLOCK_N] = x_tile @ widen(W_tile)^T``: the weight tile is widened
    once per K step (to bf16, pre-scaled by its block scale with SCALE_MODE 1) and
    used as the MMA's B operand for all BLOCK_M tokens of the tile."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_m, offs_n, kt_begin, kt_end = _tile_and_k_slice(
        M, N, K, k_tiles_per_split, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
    )
    offs_k = tl.arange(0, BLOCK_K)
    rows_m = offs_m % M
    rows_n = offs_n % N
    k0 = kt_begin * BLOCK_K
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + (k0 + offs_k)[None, :]
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + (k0 + offs_k)[None, :]
    s_ptrs = scale_ptr + (rows_n // 128) * stride_sn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt_begin, kt_end):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w_bits = tl.load(w_ptrs)
        else:
            k_ok = kt * BLOCK_K + offs_k < K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w_bits = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
        if K_PERM:  # x into the K-permuted weight's order (the sum does not care)
            x = k_perm_tile(x, BLOCK_M, BLOCK_K)
        if SCALE_MODE != 2:
            s = tl.load(s_ptrs + (kt * BLOCK_K // 128) * stride_sk)
        else:
            s = tl.zeros((BLOCK_N,), tl.float32)  # unused: channel scales apply at the end
        # SCALE_MODE 1: value * scale (no fold: the scale range is only checked for wide);
        # 0 and 2: exact values (bf16, FIX 1) or e4m3 / 256 (fp16, FIX 256)
        w = _widen_codes(w_bits, s, SCALE_MODE, USE_PTX, WIDEN_BF16, NAN, x.dtype, FOLD=False)
        if SCALE_MODE == 0:
            part = _dot(x, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_IN_FP32)
            acc += part * s[None, :]
        else:
            acc = _dot(x, tl.trans(w), acc, DOT_IN_FP32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    FIX: tl.constexpr = 1.0 if WIDEN_BF16 else 256.0  # WIDEN_SCALE_FIX
    if SCALE_MODE == 0:
        acc = acc * FIX
    elif SCALE_MODE == 2:
        acc = acc * (tl.load(scale_ptr + rows_n) * FIX)[None, :]
    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    bias = acc
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
    _store_or_reduce(acc, bias, y_ptrs, ws_ptrs, out_mask, pid_k, n_split, M * N, cnt_ptr, pid,
                     HAS_BIAS, FUSED_REDUCE)  # fmt: skip


@triton.jit
def fp8_wide_kernel(
    x_ptr,  # [M, K] bf16/fp16, K contiguous
    w_ptr,  # [N, K] uint8 e4m3 codes, K contiguous
    scale_ptr,  # block: [ceil(N/128), ceil(K/128)] fp32; channel: [N] fp32
    bias_ptr,  # [N] or a dummy
    y_ptr,  # [M, N]
    ws_ptr,  # [split, M, N] fp32 partials (split > 1) or a dummy
    cnt_ptr,  # int32 [num tiles] counters (FUSED_REDUCE) or a dummy
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_sk,
    stride_ym,
    k_tiles_per_split,
    SCALE_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_PTX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    WIDEN_BF16: tl.constexpr = False,
    NAN: tl.constexpr = True,
    K_PERM: tl.constexpr = False,
):
    """Batched decode (M in the tens to hundreds): ``acc[BLOCK_N, BLOCK_M] = widen(W_tile) @ x_tile^T``.

    The widened weight tile is the MMA's A operand, which wgmma (Hopper) and mma
    (Ampere) take from registers, so it never goes back to shared memory; x^T streams
    through the software pipeline as B. Triton loads the codes straight into the
    operand layout. Block scales: SCALE_MODE 0 multiplies each step's partial product
    (exact operands; waits for each step's MMA); 1 folds the scale into the widened
    tile (one bf16 rounding of e4m3 * scale; the MMAs of successive steps overlap),
    with bf16 activations on NVIDIA in the widening itself (``e4m3_scaled_to_bf16``);
    2 (channel) scales once at the end. WIDEN_BF16 (bf16 activations) widens straight
    to bf16, otherwise through fp16 (value / 256, fixed at the end).
    Bytes: N*K*ceil(M/BLOCK_M) (L2 beyond the first) + 2*M*K*ceil(N/BLOCK_N) + 2*M*N.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_m, offs_n, kt_begin, kt_end = _tile_and_k_slice(
        M, N, K, k_tiles_per_split, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
    )
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past the end re-read valid rows (no load masks along N/M); the store drops them.
    rows_n = offs_n % N
    rows_m = offs_m % M
    k0 = kt_begin * BLOCK_K
    if K_PERM:  # 4 codes per int32 word, already in operand order (``permute_k``)
        offs_w = tl.arange(0, BLOCK_K // 4)
        w_ptrs = (w_ptr.to(tl.pointer_type(tl.int32)) + rows_n[:, None] * (stride_wn // 4)
                  + (k0 // 4 + offs_w)[None, :])  # fmt: skip
    else:
        w_ptrs = w_ptr + rows_n[:, None] * stride_wn + (k0 + offs_k)[None, :]
    x_ptrs = x_ptr + rows_m[None, :] * stride_xm + (k0 + offs_k)[:, None]  # [BK, BM]
    s_ptrs = scale_ptr + (rows_n // 128) * stride_sn

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kt in range(kt_begin, kt_end):
        if EVEN_K:
            w_bits = tl.load(w_ptrs)
            xt = tl.load(x_ptrs)
        else:
            k_ok = kt * BLOCK_K + offs_k < K
            if K_PERM:  # K % 16 == 0: whole words are in or out
                w_bits = tl.load(w_ptrs, mask=(kt * BLOCK_K + 4 * offs_w < K)[None, :], other=0)
            else:
                w_bits = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
            xt = tl.load(x_ptrs, mask=k_ok[:, None], other=0.0)
        if SCALE_MODE != 2:
            s = tl.load(s_ptrs + (kt * BLOCK_K // 128) * stride_sk)
        else:
            s = tl.zeros((BLOCK_N,), tl.float32)  # unused: channel scales apply at the end
        # SCALE_MODE 1: the widening applies the scale (with USE_PTX and bf16: / FOLD_FIX);
        # 0 and 2: exact values (bf16, FIX 1) or e4m3 / 256 (fp16, FIX 256)
        if K_PERM:
            w = _widen_words(w_bits, s, SCALE_MODE, USE_PTX, WIDEN_BF16, NAN, xt.dtype,
                             BLOCK_N, BLOCK_K)  # fmt: skip
        else:
            w = _widen_codes(w_bits, s, SCALE_MODE, USE_PTX, WIDEN_BF16, NAN, xt.dtype)
        if SCALE_MODE == 0:
            part = _dot(w, xt, tl.zeros((BLOCK_N, BLOCK_M), tl.float32), DOT_IN_FP32)
            acc += part * s[:, None]
        else:
            acc = _dot(w, xt, acc, DOT_IN_FP32)
        w_ptrs += BLOCK_K // 4 if K_PERM else BLOCK_K
        x_ptrs += BLOCK_K

    if SCALE_MODE == 1:
        if USE_PTX and WIDEN_BF16:
            acc = acc * 4294967296.0  # FOLD_FIX = 2^32
    else:
        FIX: tl.constexpr = 1.0 if WIDEN_BF16 else 256.0  # WIDEN_SCALE_FIX
        if SCALE_MODE == 0:
            acc = acc * FIX
        else:
            acc = acc * (tl.load(scale_ptr + rows_n) * FIX)[:, None]
    out_mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    ws_ptrs = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
    bias = acc
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows_n).to(tl.float32)[:, None]
    _store_or_reduce(acc, bias, y_ptrs, ws_ptrs, out_mask, pid_k, n_split, M * N, cnt_ptr, pid,
                     HAS_BIAS, FUSED_REDUCE)  # fmt: skip


@triton.jit
def dequant_kernel(
    w_ptr,  # [N, K] uint8 e4m3 codes
    scale_ptr,  # block [ceil(N/128), ceil(K/128)] or channel [N] fp32
    out_ptr,  # [N, K] bf16/fp16
    N,
    K,
    stride_wn,
    stride_sn,
    stride_sk,
    CHANNEL: tl.constexpr,
    USE_PTX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NAN: tl.constexpr = True,
    K_PERM: tl.constexpr = False,
):
    """out = bf16(e4m3(w) * scale): the whole-weight widening of the ``dequant`` prefill
    path, in K order also for a K-permuted ``w`` (K_PERM). Bytes: N*K read, 2*N*K written."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # K fastest: streaming order
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    bits = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0)
    if CHANNEL:
        s = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)[:, None]
    else:
        # BLOCK_N divides 128: one scale row per program, one scale per 128 K
        s = tl.load(
            scale_ptr
            + (tl.program_id(1) * BLOCK_N // 128) * stride_sn
            + (offs_k // 128) * stride_sk,
            mask=offs_k < K,
            other=0.0,
        )[None, :]
    v = e4m3_to_f16_x256(bits, USE_PTX, NAN).to(tl.float32) * (s * 256.0)
    if K_PERM:
        v = k_unperm_tile(v, BLOCK_N, BLOCK_K)
    tl.store(
        out_ptr + offs_n[:, None] * K + offs_k[None, :], v.to(out_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def splitk_reduce_kernel(
    ws_ptr,  # [split_k, M, N] fp32 partials, contiguous
    bias_ptr,  # [N] or a dummy
    y_ptr,  # [M, N] contiguous
    num_elements,  # M * N
    N,
    split_k,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y = sum of the split_k partials (+ bias). Bytes: 4*split_k*M*N read, 2*M*N written."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_elements
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for s in range(1, split_k):
        acc += tl.load(ws_ptr + s * num_elements + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def pick_split_k(
    num_tiles: int,
    k_tiles: int,
    num_sms: int,
    max_split: int = 16,
    target_ctas_per_sm: float = 0.0,
) -> int:
    """The number of K slices (<= max_split, at least 2 K tiles per slice) for a grid of
    ``num_tiles`` output tiles on ``num_sms`` SMs.

    Memory-bound decode needs every SM streaming weight. By default: the split whose
    program count wastes the least of its last wave of one program per SM, programs
    fewer than 4 per SM discounted, fewer slices on ties (fewer fp32 partials). With
    ``target_ctas_per_sm``: the split whose program count is nearest that many per SM,
    fewer slices on ties.
    """
    target = target_ctas_per_sm * num_sms
    # the score to beat (higher is better) and by how much a later, larger split must beat it
    best_key, margin = (-math.inf, 0.0) if target else (0.0, 0.02)
    best = 1
    for split in range(1, max(1, max_split) + 1):
        per = triton.cdiv(k_tiles, split)
        if per < 2 and split > 1:
            break
        eff_split = triton.cdiv(k_tiles, per)
        ctas = num_tiles * eff_split
        if target:
            key = -abs(ctas - target)
        else:
            waves = triton.cdiv(ctas, num_sms)
            key = ctas / (waves * num_sms)
            if ctas < 4 * num_sms:  # too few CTAs in flight to hide memory latency
                key *= 0.5 + 0.5 * ctas / (4 * num_sms)
        if key > best_key + margin:
            best, best_key = eff_split, key
    return best


_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters for the fused split-K reduction, cached per device.

    Each launch leaves them at zero again (the last program of a tile re-arms its
    counter). One stream at a time: two fused split-K GEMMs running concurrently on
    different streams of one device would share counters.
    """
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def dequantize_to(
    w_bits: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    *,
    channel: bool,
    use_ptx: bool,
    nan_codes: bool = True,
    k_perm: bool = False,
) -> torch.Tensor:
    """``bf16(e4m3(w) * scale)`` of a whole [N, K] weight with the Triton widening, in K
    order (k_perm: ``w_bits`` is K-permuted, ``permute_k``). nan_codes=False only for codes
    known to hold no NaN (0x7F/0xFF)."""
    n, k = w_bits.shape
    out = torch.empty((n, k), dtype=dtype, device=w_bits.device)
    if n == 0 or k == 0:
        return out
    bn, bk = 16, 512
    stride_sn, stride_sk = (0, 0) if channel else (scale.stride(0), scale.stride(1))
    dequant_kernel[(triton.cdiv(k, bk), triton.cdiv(n, bn))](
        w_bits, scale, out, n, k, w_bits.stride(0), stride_sn, stride_sk,
        CHANNEL=channel, USE_PTX=use_ptx, BLOCK_N=bn, BLOCK_K=bk, NAN=nan_codes, K_PERM=k_perm,
        num_warps=4,
    )  # fmt: skip
    return out


def scales_foldable(scale: torch.Tensor) -> bool:
    """Whether every block scale can be folded into the widened weight by
    ``e4m3_scaled_to_bf16`` (the ``wide`` kernel with ``scale_on_acc=False``):
    ``FOLD_SCALE_MIN <= |s| < FOLD_SCALE_MAX`` or 0. One pass (a device sync): load time only.
    """
    a = scale.detach().abs()
    return bool(((a == 0) | ((a >= FOLD_SCALE_MIN) & (a < FOLD_SCALE_MAX))).all())


def _scale_mode(config: Fp8GemmConfig, channel: bool) -> int:
    """The SCALE_MODE constexpr of ``config`` (before ``fp8_gemm``'s fold fallback)."""
    if channel:
        return SCALE_CHANNEL
    return SCALE_BLOCK_ON_ACC if config.scale_on_acc else SCALE_BLOCK_ON_WEIGHT


def _kernel_and_tile(config: Fp8GemmConfig):
    """The Triton kernel of a gemv, mm or wide ``config`` and its tile constexprs."""
    if config.kind == "gemv":
        tile = dict(BLOCK_N=config.block_n, BLOCK_M=config.block_m, PREFETCH=config.prefetch)
        return fp8_gemv_kernel, tile
    if config.kind in ("mm", "wide"):
        tile = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                    GROUP_M=config.group_m)  # fmt: skip
        return (fp8_mm_kernel if config.kind == "mm" else fp8_wide_kernel), tile
    raise ValueError(f"no Triton GEMM kernel for kind {config.kind!r}")


_KERNEL_SIGNATURE = {
    "x_ptr": "*bf16", "w_ptr": "*u8", "scale_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16",
    "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
    "stride_wn": "i32", "stride_sn": "i32", "stride_sk": "i32", "stride_ym": "i32",
    "k_tiles_per_split": "i32",
}  # fmt: skip


def kernel_source(
    config: Fp8GemmConfig,
    *,
    channel: bool = False,
    half: str = "bf16",
    even_k: bool = True,
    use_ptx: bool = True,
    nan_codes: bool = True,
    fused_reduce: bool = True,
    k_perm: bool = False,
):
    """The Triton kernel that ``fp8_gemm`` launches for ``config`` (kinds gemv, mm, wide;
    for dequant its widening kernel), as a ``triton.compiler.ASTSource`` with the launch's
    constexprs: what ``triton.compile(src, target=GPUTarget(...))`` builds ahead of time
    for a GPU that is not here. half: "bf16" or "fp16" activations; fused_reduce: the
    split-K variant that sums partials in the kernel (NVIDIA); k_perm: for a K-permuted
    weight (``permute_k``)."""
    from triton.compiler import ASTSource

    if config.kind == "dequant":
        sig = {"w_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": f"*{half}", "N": "i32",
               "K": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_sk": "i32"}  # fmt: skip
        c = {"CHANNEL": channel, "USE_PTX": use_ptx, "BLOCK_N": 16, "BLOCK_K": 512,
             "NAN": nan_codes, "K_PERM": k_perm}  # fmt: skip
        return ASTSource(dequant_kernel, {**sig, **dict.fromkeys(c, "constexpr")}, c)
    kernel, tile = _kernel_and_tile(config)
    c = dict(SCALE_MODE=_scale_mode(config, channel), HAS_BIAS=True, FUSED_REDUCE=fused_reduce,
             EVEN_K=even_k, USE_PTX=use_ptx,
             DOT_IN_FP32=False, WIDEN_BF16=half == "bf16", NAN=nan_codes, K_PERM=k_perm,
             **tile)  # fmt: skip
    sig = {k: (f"*{half}" if v == "*bf16" else v) for k, v in _KERNEL_SIGNATURE.items()}
    return ASTSource(kernel, {**sig, **dict.fromkeys(c, "constexpr")}, c)


def fp8_gemm(
    x: torch.Tensor,
    w_bits: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    channel: bool,
    config: Fp8GemmConfig,
    num_sms: int,
    use_ptx: bool = False,
    nan_codes: bool = True,
    scales_fold: bool | None = None,
    k_perm: bool = False,
) -> torch.Tensor:
    """``y = x @ (e4m3(w_bits) * scale)^T + bias`` with the soft-FP8 kernel.

    x: [M, K] bf16 or fp16 (row stride free, K contiguous). w_bits: [N, K] uint8
    e4m3fn codes, K contiguous. scale: block ``[ceil(N/128), ceil(K/128)]`` fp32
    (``channel=False``) or ``[N]`` fp32 (``channel=True``). bias: [N] or None.
    Returns [M, N] in x.dtype. use_ptx: NVIDIA inline-PTX widening (CUDA only).
    nan_codes: whether w_bits may hold NaN codes (0x7F/0xFF); False (checked once
    at load, ``PackedWeight.has_nan_codes``) lets the kernels skip the NaN fix.
    scales_fold: ``scales_foldable(scale)`` (``PackedWeight.scales_fold``; None: checked
    here, a device sync). A ``wide`` config with ``scale_on_acc=False`` needs it with
    bf16 activations on NVIDIA, and multiplies the partial products by the scales when
    it is False. k_perm: ``w_bits`` is K-permuted (``permute_k``, ``PackedWeight.k_perm``):
    the ``wide`` kernel then loads 4 codes per 32-bit word straight into the MMA operand;
    the others read x in the weight's order.
    """
    if x.dim() != 2 or w_bits.dim() != 2 or x.shape[1] != w_bits.shape[1]:
        raise ValueError(
            f"fp8_gemm needs x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w_bits.shape)}"
        )
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fp8_gemm takes bf16/fp16 activations, got {x.dtype}")
    if w_bits.dtype != torch.uint8:
        w_bits = w_bits.view(torch.uint8)
    if x.stride(1) != 1 or w_bits.stride(1) != 1:
        raise ValueError("fp8_gemm needs x and w with a contiguous last dimension")
    m, k = x.shape
    n = w_bits.shape[0]
    if k_perm and k % K_PERM_GROUP:
        raise ValueError(f"a K-permuted weight needs K % {K_PERM_GROUP} == 0, got K = {k}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(m, n))
    cfg = config
    if cfg.kind == "dequant":
        w = dequantize_to(
            w_bits, scale, x.dtype, channel=channel, use_ptx=use_ptx, nan_codes=nan_codes,
            k_perm=k_perm,
        )  # fmt: skip
        return torch.nn.functional.linear(x, w, bias)
    block_k = 128 if cfg.kind == "gemv" else cfg.block_k
    if not channel and 128 % block_k:
        raise ValueError(f"block-128 scales need block_k dividing 128, got {block_k}")
    k_tiles = triton.cdiv(k, block_k)
    if cfg.kind == "gemv":
        num_tiles = triton.cdiv(n, cfg.block_n)
        if m > cfg.block_m:
            raise ValueError(f"gemv config covers M <= {cfg.block_m}, got M = {m}")
    else:
        num_tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    split = cfg.split_k or pick_split_k(
        num_tiles, k_tiles, num_sms, cfg.max_split_k, cfg.target_ctas_per_sm
    )
    per = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, per)
    mode = _scale_mode(cfg, channel)
    if channel:
        stride_sn, stride_sk = 0, 0
    else:
        stride_sn, stride_sk = scale.stride(0), scale.stride(1)
        folds = mode == SCALE_BLOCK_ON_WEIGHT and cfg.kind == "wide" and use_ptx
        if folds and x.dtype == torch.bfloat16:
            if scales_fold is None:
                scales_fold = scales_foldable(scale)
            if not scales_fold:
                mode = SCALE_BLOCK_ON_ACC
    has_bias = bias is not None
    bias_arg = bias if has_bias else scale
    # The fused reduction's ordering is checked on NVIDIA GPUs only (HIP takes the second
    # kernel); the interpreter runs programs one after another.
    fused = split > 1 and cfg.fused_reduce and (use_ptx or interpreting())
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else y
    cnt = _counters(x.device, num_tiles) if fused else ws
    common = dict(
        SCALE_MODE=mode, HAS_BIAS=has_bias, FUSED_REDUCE=fused,
        EVEN_K=k % block_k == 0, USE_PTX=use_ptx, DOT_IN_FP32=interpreting(),
        WIDEN_BF16=x.dtype == torch.bfloat16, NAN=nan_codes, K_PERM=k_perm,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    args = (x, w_bits, scale, bias_arg, y, ws, cnt, m, n, k,
            x.stride(0), w_bits.stride(0), stride_sn, stride_sk, y.stride(0), per)  # fmt: skip
    kernel, tile = _kernel_and_tile(cfg)
    kernel[(num_tiles, split)](*args, **tile, **common)
    if split > 1 and not fused:
        block = 1024
        splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            ws, bias_arg, y, m * n, n, split,
            HAS_BIAS=has_bias, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return y
