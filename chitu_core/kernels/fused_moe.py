"""Fused MoE for SwiGLU experts: one Triton kernel for gate+up, one for down.

``out[t] = sum_j w[t, j] * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t]))``, ``e = ids[t, j]``
(``chitu_core.hookspecs.chitu_fused_moe``), for FP8 block-128, FP8 per-channel and
unquantized (bf16/fp16/fp32) experts. FP8 codes stay 1 byte in memory and are
widened in registers by integer ops (``e4m3_widen.py``): no FP8 hardware, so it
compiles for sm_80/86/90 and HIP.

Layout: the ``P = T * top_k`` (token, expert) pairs are sorted by expert and padded
to tiles of ``block_m`` rows of one expert (``moe_align.py``), on the device. The
launch grid covers ``max_blocks`` tiles, an upper bound known on the host;
programs of unused tiles exit at once, so nothing is read back (no host sync).
A single token (decode of one sequence) skips the alignment: each pair is its own
tile (its top-k experts are distinct, so no weight is read twice).

1. ``moe_gate_up_kernel``: a program gathers the x rows of its tile's pairs and
   multiplies them by ``block_n`` gate rows AND the matching ``block_n`` up rows of
   ``W13[e]`` (the widened weight tile is the MMA's B operand; with one-row tiles,
   ``block_m`` 1, fp32 FMAs instead), so the epilogue computes ``silu(gate) * up``
   in fp32 and writes it, rounded to x.dtype, to ``act[P, I]`` at the pair's row.
2. ``moe_down_kernel``: ``act rows @ W2[e]^T``, times the pair's top-k weight (fp32),
   written to ``pair_out[P, H]`` (x.dtype) at the pair's row.
3. ``moe_sum_kernel``: ``out[t] = sum_j pair_out[t * top_k + j]`` in fp32, in j order:
   deterministic (no atomics).

Block scales: with ``scale_on_acc`` each 128-wide K step's partial product is
multiplied by its scale in fp32 (exact e4m3 operands: decode is exact up to fp32
accumulation); otherwise the scale is folded into the widened tile (one bf16
rounding of ``e4m3 * scale``, as the generic op's dequantization; cheaper at large M).

Bytes: the selected experts' weights (1 byte/element FP8) + 2*T*H (x, from L2 per
tile) + 2*P*I*2 (act) + 2*P*H*2 (pair_out) + 2*T*H (out). FLOPs: 2*P*3*I*H.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from chitu_core.kernels import interpreting
from chitu_core.kernels.e4m3_widen import e4m3_to_bf16, e4m3_to_f16_x256
from chitu_core.kernels.fp8_gemm import _dot, grouped_tile
from chitu_core.kernels.moe_align import UNUSED_BLOCK, moe_align
from chitu_core.quant import (
    FORMAT_FP8_BLOCK128,
    FORMAT_FP8_CHANNEL,
    FORMAT_UNQUANTIZED,
    WEIGHT_FORMATS,
)

# FMT constexpr values of the kernels
FMT_BLOCK = 0
FMT_CHANNEL = 1
FMT_DENSE = 2
_FMT_CODES = {FORMAT_FP8_BLOCK128: FMT_BLOCK, FORMAT_FP8_CHANNEL: FMT_CHANNEL,
              FORMAT_UNQUANTIZED: FMT_DENSE}  # fmt: skip


@dataclass(frozen=True)
class FusedMoeConfig:
    """Tiles and launch parameters of the two expert kernels (per-arch tables pick these).

    block_m: rows (pairs) per tile, the alignment unit, shared by both kernels: 1
        (no tensor cores: fp32 FMA and a K reduction, for one token) or a power of
        two >= 16 (the MMA minimum).
    block_n, block_k, num_warps, num_stages: the gate/up kernel: ``block_n``
        activation columns per program (it reads ``block_n`` gate rows plus
        ``block_n`` up rows of W13), K step, Triton launch options.
    down_block_n, down_block_k, down_num_warps, down_num_stages: the same for the
        down kernel (``down_block_n`` columns of H per program).
    group_m: tiles of M sharing a weight tile in launch order (L2 reuse in prefill).
    scale_on_acc: FP8 block scales applied to the fp32 accumulator per K step
        (exact operands) rather than folded into the widened weight tile.

    K steps must divide 128 for block-128 scales (checked at launch).
    """

    block_m: int = 16
    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    down_block_n: int = 32
    down_block_k: int = 128
    down_num_warps: int = 4
    down_num_stages: int = 4
    group_m: int = 8
    scale_on_acc: bool = True

    def __post_init__(self) -> None:
        if self.block_m != 1 and (self.block_m < 16 or self.block_m & (self.block_m - 1)):
            raise ValueError(f"block_m must be 1 or a power of two >= 16, got {self.block_m}")
        for name in ("block_n", "block_k", "down_block_n", "down_block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        for name in ("num_warps", "num_stages", "down_num_warps", "down_num_stages", "group_m"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# Presets from a sweep on an H200 (DeepSeek-V3 layer, FP8 block-128; see
# benchmarks/moe_bench.py --tune). One token: each selected expert's weight
# streamed by many narrow FMA programs (no MMA padding to 16 rows). Decode: a
# handful of rows per expert, memory-bound, small programs. Prefill (not yet
# tuned): compute-bound, larger tiles, scales folded into the weight tile.
TOKEN_CONFIG = FusedMoeConfig(
    block_m=1, block_n=16, num_warps=2, num_stages=3,
    down_block_n=32, down_num_warps=2, down_num_stages=3,
)  # fmt: skip
DECODE_CONFIG = FusedMoeConfig(
    block_m=16, block_n=32, num_warps=2, num_stages=3,
    down_block_n=64, down_num_warps=2, down_num_stages=3,
)  # fmt: skip
BATCH_CONFIG = FusedMoeConfig(
    block_m=32, block_n=64, num_stages=3, down_block_n=64, down_num_stages=3
)
PREFILL_CONFIG = FusedMoeConfig(
    block_m=64, block_n=64, block_k=64, num_stages=3,
    down_block_n=64, down_block_k=64, down_num_stages=3, scale_on_acc=False,
)  # fmt: skip


def default_config(num_tokens: int, top_k: int, num_experts: int) -> FusedMoeConfig:
    """Preset by the mean rows per expert, ``T * top_k / E`` (routing spreads them)."""
    if num_tokens == 1:
        return TOKEN_CONFIG
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    if rows_per_expert <= 8:
        return DECODE_CONFIG
    if rows_per_expert <= 48:
        return BATCH_CONFIG
    return PREFILL_CONFIG


@triton.jit
def _tile_rows(sorted_ptr, block_expert_ptr, topk_ids_ptr, pid_m, num_pairs,
               BLOCK_M: tl.constexpr, PAIR_PER_BLOCK: tl.constexpr):  # fmt: skip
    """(expert, pair ids [BLOCK_M]) of tile pid_m; padding rows hold num_pairs."""
    offs_r = tl.arange(0, BLOCK_M)
    if PAIR_PER_BLOCK:  # tile b = pair b alone (one token: no alignment pass)
        expert = tl.load(topk_ids_ptr + pid_m)
        pair = tl.where(offs_r == 0, pid_m, num_pairs)
    else:
        expert = tl.load(block_expert_ptr + pid_m)
        pair = tl.load(sorted_ptr + pid_m * BLOCK_M + offs_r)
    return expert, pair


@triton.jit
def _load_weight(ptrs, k_ok, EVEN_K: tl.constexpr, FMT: tl.constexpr, USE_PTX: tl.constexpr,
                 WIDEN_BF16: tl.constexpr, CDT: tl.constexpr, NAN: tl.constexpr):  # fmt: skip
    """[BLOCK_N, BLOCK_K] weight tile in the compute dtype CDT: dense weights cast,
    e4m3 codes widened (exact value for bf16, value / 256 for fp16: see _FIX);
    NAN=False: without the NaN fix (weights checked to hold no NaN code)."""
    if EVEN_K:
        raw = tl.load(ptrs)
    else:
        raw = tl.load(ptrs, mask=k_ok[None, :], other=0)
    if FMT == 2:
        return raw.to(CDT)
    elif WIDEN_BF16:
        return e4m3_to_bf16(raw, USE_PTX, NAN)
    else:
        return e4m3_to_f16_x256(raw, USE_PTX, NAN).to(CDT)


@triton.jit
def _mma(acc, a, w, s_ptrs, kt, stride_sk, FMT: tl.constexpr, SCALE_ON_ACC: tl.constexpr,
         FIX: tl.constexpr, BLOCK_K: tl.constexpr, DOT_IN_FP32: tl.constexpr):  # fmt: skip
    """acc[BLOCK_M, BLOCK_N] + a[BLOCK_M, BLOCK_K] @ w[BLOCK_N, BLOCK_K]^T (block scales
    of K step kt applied per step; channel scales and _FIX are applied by _finish)."""
    if FMT == 0:
        s = tl.load(s_ptrs + (kt * BLOCK_K // 128) * stride_sk)  # [BLOCK_N] fp32
        if SCALE_ON_ACC:
            zero = tl.zeros(acc.shape, tl.float32)
            return acc + _product(a, w, zero, DOT_IN_FP32) * s[None, :]
        else:
            ws = (w.to(tl.float32) * (s * FIX)[:, None]).to(a.dtype)
            return _product(a, ws, acc, DOT_IN_FP32)
    else:
        return _product(a, w, acc, DOT_IN_FP32)


@triton.jit
def _product(a, w, acc, DOT_IN_FP32: tl.constexpr):
    """acc + a @ w^T in fp32: the MMA for tiles of >= 16 rows; for one row (BLOCK_M 1)
    fp32 FMAs and a K reduction (no layout shuffle of the widened tile for the MMA)."""
    if a.shape[0] == 1:
        return acc + tl.sum(w.to(tl.float32) * a.to(tl.float32), axis=1)[None, :]
    else:
        return _dot(a, tl.trans(w), acc, DOT_IN_FP32)


@triton.jit
def _finish(acc, s_ptrs, FMT: tl.constexpr, SCALE_ON_ACC: tl.constexpr, FIX: tl.constexpr):
    """Undo the fp16 widening's 2^-8 and apply per-channel scales (s_ptrs: [BLOCK_N])."""
    if FMT == 1:
        return acc * (tl.load(s_ptrs) * FIX)[None, :]
    elif FMT == 0 and SCALE_ON_ACC and FIX != 1.0:
        return acc * FIX
    else:
        return acc


@triton.jit
def moe_gate_up_kernel(
    x_ptr,  # [T, H] bf16/fp16, H contiguous
    w_ptr,  # [E, 2I, H] uint8 e4m3 codes or dense, H contiguous
    scale_ptr,  # block [E, ceil(2I/128), ceil(H/128)] / channel [E, 2I] fp32 / dummy
    act_ptr,  # [P, I] out, x.dtype
    sorted_ptr,  # [max_blocks * BLOCK_M] int32 pair ids (moe_align)
    block_expert_ptr,  # [max_blocks] int32
    topk_ids_ptr,  # [P] int32 (PAIR_PER_BLOCK only)
    num_pairs,
    top_k,
    K,  # H
    inter,  # I
    num_rows,  # max_blocks * BLOCK_M
    stride_xm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_sk,
    stride_am,
    FMT: tl.constexpr,
    SCALE_ON_ACC: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_PTX: tl.constexpr,
    WIDEN_BF16: tl.constexpr,
    PAIR_PER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    NAN: tl.constexpr = True,
):
    """act[pair, n] = silu(x[token] . W1[e, n]) * (x[token] . W3[e, n]) for a tile's pairs
    and BLOCK_N columns n: gate rows n and up rows I + n of W13 in the same program."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_rows, inter, BLOCK_M, BLOCK_N, GROUP_M)
    expert, pair = _tile_rows(sorted_ptr, block_expert_ptr, topk_ids_ptr, pid_m, num_pairs,
                              BLOCK_M, PAIR_PER_BLOCK)  # fmt: skip
    if expert < 0:  # past the used tiles
        return
    FIX: tl.constexpr = 1.0 if (WIDEN_BF16 or FMT == 2) else 256.0  # WIDEN_SCALE_FIX
    CDT: tl.constexpr = x_ptr.dtype.element_ty
    valid = pair < num_pairs
    token = tl.where(valid, pair // top_k, 0)  # padding rows re-read token 0, never stored
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_g = offs_n % inter  # columns past I re-read valid rows; the store drops them
    rows_u = inter + rows_g
    x_ptrs = x_ptr + token.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_we + offs_k[None, :]
    g_ptrs = w_base + rows_g[:, None] * stride_wn
    u_ptrs = w_base + rows_u[:, None] * stride_wn
    s_base = scale_ptr + expert.to(tl.int64) * stride_se
    if FMT == 0:
        sg_ptrs = s_base + (rows_g // 128) * stride_sn
        su_ptrs = s_base + (rows_u // 128) * stride_sn
    else:
        sg_ptrs = s_base + rows_g * stride_sn
        su_ptrs = s_base + rows_u * stride_sn

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = kt * BLOCK_K + offs_k < K
        if EVEN_K:
            a = tl.load(x_ptrs)
        else:
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        wg = _load_weight(g_ptrs, k_ok, EVEN_K, FMT, USE_PTX, WIDEN_BF16, CDT, NAN)
        wu = _load_weight(u_ptrs, k_ok, EVEN_K, FMT, USE_PTX, WIDEN_BF16, CDT, NAN)
        acc_g = _mma(acc_g, a, wg, sg_ptrs, kt, stride_sk, FMT, SCALE_ON_ACC, FIX, BLOCK_K,
                     DOT_IN_FP32)  # fmt: skip
        acc_u = _mma(acc_u, a, wu, su_ptrs, kt, stride_sk, FMT, SCALE_ON_ACC, FIX, BLOCK_K,
                     DOT_IN_FP32)  # fmt: skip
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    gate = _finish(acc_g, sg_ptrs, FMT, SCALE_ON_ACC, FIX)
    up = _finish(acc_u, su_ptrs, FMT, SCALE_ON_ACC, FIX)
    act = gate * tl.sigmoid(gate) * up  # silu(gate) * up in fp32, one rounding below
    out_ptrs = act_ptr + pair.to(tl.int64)[:, None] * stride_am + offs_n[None, :]
    tl.store(out_ptrs, act.to(CDT), mask=valid[:, None] & (offs_n < inter)[None, :])


@triton.jit
def moe_down_kernel(
    act_ptr,  # [P, I] x.dtype
    w_ptr,  # [E, H, I] uint8 e4m3 codes or dense, I contiguous
    scale_ptr,  # block [E, ceil(H/128), ceil(I/128)] / channel [E, H] fp32 / dummy
    topk_weights_ptr,  # [P] fp32
    out_ptr,  # [P, H] out, x.dtype: weighted per-pair rows
    sorted_ptr,
    block_expert_ptr,
    topk_ids_ptr,
    num_pairs,
    N,  # H
    K,  # I
    num_rows,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_sk,
    stride_om,
    FMT: tl.constexpr,
    SCALE_ON_ACC: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_PTX: tl.constexpr,
    WIDEN_BF16: tl.constexpr,
    PAIR_PER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    NAN: tl.constexpr = True,
):
    """out[pair, n] = topk_weight[pair] * (act[pair] . W2[e, n]) for a tile's pairs."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_rows, N, BLOCK_M, BLOCK_N, GROUP_M)
    expert, pair = _tile_rows(sorted_ptr, block_expert_ptr, topk_ids_ptr, pid_m, num_pairs,
                              BLOCK_M, PAIR_PER_BLOCK)  # fmt: skip
    if expert < 0:
        return
    FIX: tl.constexpr = 1.0 if (WIDEN_BF16 or FMT == 2) else 256.0
    CDT: tl.constexpr = act_ptr.dtype.element_ty
    valid = pair < num_pairs
    row = tl.where(valid, pair, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_n = offs_n % N
    a_ptrs = act_ptr + row[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + rows_n[:, None] * stride_wn + offs_k[None, :]
    s_base = scale_ptr + expert.to(tl.int64) * stride_se
    if FMT == 0:
        s_ptrs = s_base + (rows_n // 128) * stride_sn
    else:
        s_ptrs = s_base + rows_n * stride_sn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = kt * BLOCK_K + offs_k < K
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        w = _load_weight(w_ptrs, k_ok, EVEN_K, FMT, USE_PTX, WIDEN_BF16, CDT, NAN)
        acc = _mma(acc, a, w, s_ptrs, kt, stride_sk, FMT, SCALE_ON_ACC, FIX, BLOCK_K, DOT_IN_FP32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = _finish(acc, s_ptrs, FMT, SCALE_ON_ACC, FIX)
    acc = acc * tl.load(topk_weights_ptr + row)[:, None]
    out_ptrs = out_ptr + row[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(CDT), mask=valid[:, None] & (offs_n < N)[None, :])


@triton.jit
def moe_sum_kernel(pair_out_ptr, out_ptr, N, top_k, BLOCK_N: tl.constexpr):
    """out[t] = sum_j pair_out[t * top_k + j] (fp32, j order). Bytes: 2*P*H + 2*T*H."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, top_k):
        acc += tl.load(pair_out_ptr + (t * top_k + j) * N + offs, mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(out_ptr + t * N + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check_weight(name: str, w: torch.Tensor, scale, fmt: str, shape: tuple) -> tuple:
    """(weight as uint8 codes or dense, scale or dummy, (stride_se, stride_sn, stride_sk))."""
    if tuple(w.shape) != shape:
        raise ValueError(f"{name} must be {list(shape)}, got {list(w.shape)}")
    if w.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dimension")
    if fmt == FORMAT_UNQUANTIZED:
        if not w.is_floating_point() or w.element_size() == 1:
            raise ValueError(f"{name}: an unquantized weight must be bf16/fp16/fp32, got {w.dtype}")
        if scale is not None:
            raise ValueError(f"{name}: an unquantized weight takes no scale, got one")
        return w, w, (0, 0, 0)
    if scale is None or scale.dtype != torch.float32:
        raise ValueError(f"{name}: format {fmt!r} needs an fp32 scale")
    if w.dtype != torch.uint8:
        w = w.view(torch.uint8)  # float8_e4m3fn -> its codes
    e, n, k = shape
    if fmt == FORMAT_FP8_BLOCK128:
        want = (e, triton.cdiv(n, 128), triton.cdiv(k, 128))
        strides = (scale.stride(0), scale.stride(1), scale.stride(2)) if scale.dim() == 3 else ()
    else:
        want = (e, n)
        strides = (scale.stride(0), scale.stride(1), 0) if scale.dim() == 2 else ()
    if tuple(scale.shape) != want:
        raise ValueError(f"{name}_scale for {fmt!r} must be {list(want)}, got {list(scale.shape)}")
    return w, scale, strides


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2: torch.Tensor,
    w2_scale: torch.Tensor | None,
    fmt: str,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: FusedMoeConfig | None = None,
    use_ptx: bool | None = None,
    nan_codes: bool = True,
) -> torch.Tensor:
    """SwiGLU experts mixed by the router, with the Triton kernels (no host sync).

    Args:
        x: ``[T, H]`` bf16 or fp16, H contiguous.
        w13: ``[E, 2I, H]``: rows ``[0, I)`` gate (w1), ``[I, 2I)`` up (w3). uint8 /
            float8_e4m3fn codes for the FP8 formats, bf16/fp16/fp32 when unquantized.
        w13_scale: ``"fp8_block128"``: ``[E, ceil(2I/128), ceil(H/128)]`` fp32;
            ``"fp8_channel"``: ``[E, 2I]`` fp32; ``None`` when unquantized.
        w2: ``[E, H, I]``, same format; w2_scale: ``[E, ceil(H/128), ceil(I/128)]``
            / ``[E, H]`` / ``None``.
        fmt: one of ``chitu_core.quant.WEIGHT_FORMATS``.
        topk_weights: ``[T, top_k]`` fp32. topk_ids: ``[T, top_k]`` int32 in ``[0, E)``.
        config: tiles; None picks ``default_config(T, top_k, E)``.
        use_ptx: NVIDIA inline-PTX widening; None: on for CUDA (not HIP, not the
            interpreter).
        nan_codes: whether the FP8 codes may hold NaN (0x7F/0xFF); False (checked at
            load, ``PackedWeight.has_nan_codes``) widens without the NaN fix.

    Returns ``[T, H]`` in x.dtype (the intermediate rounded to x.dtype before the
    down projection; top-k sum in fp32).
    """
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {WEIGHT_FORMATS}")
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16) or x.stride(1) != 1:
        raise ValueError(f"x must be [T, H] bf16/fp16, H contiguous; got {x.dtype} {list(x.shape)}")
    if w13.dim() != 3:
        raise ValueError(f"w13 must be [E, 2I, H], got {list(w13.shape)}")
    num_tokens, hidden = x.shape
    num_experts, two_inter = w13.shape[0], w13.shape[1]
    inter = two_inter // 2
    w13, s13, s13_strides = _check_weight(
        "w13", w13, w13_scale, fmt, (num_experts, 2 * inter, hidden)
    )
    w2, s2, s2_strides = _check_weight("w2", w2, w2_scale, fmt, (num_experts, hidden, inter))
    if (
        topk_ids.dim() != 2
        or topk_ids.shape[0] != num_tokens
        or topk_weights.shape != topk_ids.shape
    ):
        raise ValueError(
            f"topk_ids and topk_weights must both be [T={num_tokens}, top_k], got "
            f"{list(topk_ids.shape)} and {list(topk_weights.shape)}"
        )
    top_k = topk_ids.shape[1]
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    if num_tokens == 0 or hidden == 0 or top_k == 0:
        return out.zero_()
    cfg = config or default_config(num_tokens, top_k, num_experts)
    if fmt == FORMAT_FP8_BLOCK128 and (128 % cfg.block_k or 128 % cfg.down_block_k):
        raise ValueError(
            f"block-128 scales need K steps dividing 128, got {cfg.block_k}, {cfg.down_block_k}"
        )
    if use_ptx is None:
        use_ptx = x.is_cuda and torch.version.hip is None and not interpreting()

    num_pairs = num_tokens * top_k
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    pair_per_block = num_tokens == 1
    if pair_per_block:  # one token: its top_k distinct experts, one tile each
        sorted_ids, block_expert, max_blocks = ids, ids, num_pairs  # ids: unread dummies
    else:
        align = moe_align(ids.view(num_tokens, top_k), num_experts, cfg.block_m)
        sorted_ids, block_expert, max_blocks = (
            align.sorted_pair_ids,
            align.block_expert,
            align.max_blocks,
        )
    act = torch.empty((num_pairs, inter), dtype=x.dtype, device=x.device)
    pair_out = torch.empty((num_pairs, hidden), dtype=x.dtype, device=x.device)
    common = dict(
        FMT=_FMT_CODES[fmt], SCALE_ON_ACC=cfg.scale_on_acc, USE_PTX=use_ptx,
        WIDEN_BF16=x.dtype == torch.bfloat16, PAIR_PER_BLOCK=pair_per_block,
        BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, DOT_IN_FP32=interpreting(), NAN=nan_codes,
    )  # fmt: skip
    num_rows = max_blocks * cfg.block_m
    if inter > 0:
        moe_gate_up_kernel[(max_blocks * triton.cdiv(inter, cfg.block_n),)](
            x, w13, s13, act, sorted_ids, block_expert, ids,
            num_pairs, top_k, hidden, inter, num_rows,
            x.stride(0), w13.stride(0), w13.stride(1), *s13_strides, act.stride(0),
            EVEN_K=hidden % cfg.block_k == 0, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
        )  # fmt: skip
    else:  # no intermediate: every expert outputs zero
        act.zero_()
    moe_down_kernel[(max_blocks * triton.cdiv(hidden, cfg.down_block_n),)](
        act, w2, s2, weights, pair_out, sorted_ids, block_expert, ids,
        num_pairs, hidden, inter, num_rows,
        act.stride(0), w2.stride(0), w2.stride(1), *s2_strides, pair_out.stride(0),
        EVEN_K=inter % cfg.down_block_k == 0, BLOCK_N=cfg.down_block_n,
        BLOCK_K=cfg.down_block_k, num_warps=cfg.down_num_warps,
        num_stages=cfg.down_num_stages, **common,
    )  # fmt: skip
    block_sum = min(1024, triton.next_power_of_2(hidden))
    moe_sum_kernel[(num_tokens, triton.cdiv(hidden, block_sum))](
        pair_out, out, hidden, top_k, BLOCK_N=block_sum, num_warps=4
    )
    return out


__all__ = [
    "BATCH_CONFIG",
    "DECODE_CONFIG",
    "PREFILL_CONFIG",
    "TOKEN_CONFIG",
    "UNUSED_BLOCK",
    "FusedMoeConfig",
    "default_config",
    "fused_moe",
]
