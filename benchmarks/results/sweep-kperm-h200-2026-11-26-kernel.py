"""Prototype: wide kernel on a K-permuted weight (within each 16-wide K group the codes of
one MMA-operand thread, k = 2t, 2t+1, 2t+8, 2t+9, sit in one 32-bit word), loaded as int32
and widened 4 codes at a time straight into the wgmma A-operand order (join/permute/reshape)."""

import torch
import triton
import triton.language as tl

from chitu_core.kernels.e4m3_widen import e4m3_to_bf16
from chitu_core.kernels.fp8_gemm import _counters, _store_or_reduce, grouped_tile, pick_split_k

PERM16 = [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]


def permute_k(w: torch.Tensor) -> torch.Tensor:
    """[N, K] codes (K % 16 == 0) -> the same codes, each 16-group in PERM16 order."""
    n, k = w.shape
    idx = torch.tensor(PERM16, device=w.device)
    return w.view(n, k // 16, 16)[:, :, idx].reshape(n, k).contiguous()


# 4 codes (one int32) -> bf16(e4m3 * s) / 2^32 for each, as 4 16-bit outputs; s as bf16 pair hi/lo.
_ASM = tl.constexpr("""{
    .reg .b32 h<2>, g<2>, t<2>, r<2>, mzero;
    mov.b32 mzero, 0x80008000;
    prmt.b32 h0, $4, 0, 0x9180;
    prmt.b32 h1, $4, 0, 0xB3A2;
    shl.b32 g0, h0, 4;
    shl.b32 g1, h1, 4;
    and.b32 g0, g0, 0x87F087F0;
    and.b32 g1, g1, 0x87F087F0;
    fma.rn.bf16x2 t0, g0, $6, mzero;
    fma.rn.bf16x2 t1, g1, $6, mzero;
    fma.rn.bf16x2 r0, g0, $5, t0;
    fma.rn.bf16x2 r1, g1, $5, t1;
    mov.b32 {$0, $1}, r0;
    mov.b32 {$2, $3}, r1;
}""")


@triton.jit
def wide_perm_kernel(
    x_ptr,
    w_ptr,
    w_desc,
    scale_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_sk,
    stride_ym,
    k_tiles_per_split,
    FUSED_REDUCE: tl.constexpr,
    FENCE_PTX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    USE_PTX: tl.constexpr,
    W_TMA: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_split = tl.num_programs(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    kt_begin = pid_k * k_tiles_per_split
    kt_end = min(kt_begin + k_tiles_per_split, tl.cdiv(K, BLOCK_K))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 4)
    rows_n = offs_n % N
    rows_m = offs_m % M
    G: tl.constexpr = BLOCK_K // 16
    w_ptrs = (
        w_ptr + rows_n[:, None] * (stride_wn // 4) + (kt_begin * (BLOCK_K // 4) + offs_w)[None, :]
    )
    x_ptrs = x_ptr + rows_m[None, :] * stride_xm + (kt_begin * BLOCK_K + offs_k)[:, None]
    s_ptrs = scale_ptr + (rows_n // 128) * stride_sn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kt in tl.range(kt_begin, kt_end, num_stages=NUM_STAGES):
        if W_TMA:
            words = w_desc.load([pid_n * BLOCK_N, kt * (BLOCK_K // 4)])
        else:
            words = tl.load(w_ptrs)
        xt = tl.load(x_ptrs)
        s = tl.load(s_ptrs + (kt * BLOCK_K // 128) * stride_sk)
        if USE_PTX:
            sf = s * 309485009821345068724781056.0
            s_hi = sf.to(tl.bfloat16)
            s_lo = (sf - s_hi.to(tl.float32)).to(tl.bfloat16)
            b_hi = s_hi.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            b_lo = s_lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            s_hi32 = tl.broadcast_to((b_hi | (b_hi << 16))[:, None], (BLOCK_N, BLOCK_K // 4))
            s_lo32 = tl.broadcast_to((b_lo | (b_lo << 16))[:, None], (BLOCK_N, BLOCK_K // 4))
            o0, o1, o2, o3 = tl.inline_asm_elementwise(
                asm=_ASM,
                constraints="=h,=h,=h,=h,r,r,r",
                args=[words, s_hi32, s_lo32],
                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                is_pure=True,
                pack=1,
            )
        else:
            sc = (s / 4294967296.0)[:, None]
            o0 = (e4m3_to_bf16((words & 0xFF).to(tl.uint8), False, False).to(tl.float32) * sc).to(
                tl.bfloat16
            )
            o1 = (
                e4m3_to_bf16(((words >> 8) & 0xFF).to(tl.uint8), False, False).to(tl.float32) * sc
            ).to(tl.bfloat16)
            o2 = (
                e4m3_to_bf16(((words >> 16) & 0xFF).to(tl.uint8), False, False).to(tl.float32) * sc
            ).to(tl.bfloat16)
            o3 = (
                e4m3_to_bf16(((words >> 24) & 0xFF).to(tl.uint8), False, False).to(tl.float32) * sc
            ).to(tl.bfloat16)
        o0 = tl.reshape(o0, (BLOCK_N, G, 4))
        o1 = tl.reshape(o1, (BLOCK_N, G, 4))
        o2 = tl.reshape(o2, (BLOCK_N, G, 4))
        o3 = tl.reshape(o3, (BLOCK_N, G, 4))
        t = tl.join(tl.join(o0, o1), tl.join(o2, o3))  # [BN, G, 4(t), 2(e), 2(h)]
        w = tl.reshape(tl.permute(t, (0, 1, 4, 2, 3)), (BLOCK_N, BLOCK_K))
        if USE_PTX:
            acc = tl.dot(w, xt, acc)
        else:
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
        w_ptrs += BLOCK_K // 4
        x_ptrs += BLOCK_K
    acc = acc * 4294967296.0
    out_mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    ws_ptrs = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
    _store_or_reduce(
        acc,
        acc,
        y_ptrs,
        ws_ptrs,
        out_mask,
        pid_k,
        n_split,
        M * N,
        cnt_ptr,
        pid,
        False,
        FUSED_REDUCE,
        FENCE_PTX,
    )


_descs = {}


def wide_perm(x, wp, s, bn, bm, bk, nw, ns, split, num_sms, w_tma=False, use_ptx=True):
    m, k = x.shape
    n = wp.shape[0]
    k_tiles = triton.cdiv(k, bk)
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    split = split or pick_split_k(tiles, k_tiles, num_sms, 16)
    per = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, per)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else y
    cnt = _counters(x.device, tiles) if split > 1 else ws
    w32 = wp.view(torch.int32)
    wd = w32
    if w_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        key = (w32.data_ptr(), bn, bk)
        wd = _descs.get(key)
        if wd is None:
            wd = _descs[key] = TensorDescriptor.from_tensor(w32, [bn, bk // 4])
    wide_perm_kernel[(tiles, split)](
        x,
        w32,
        wd,
        s,
        y,
        ws,
        cnt,
        m,
        n,
        k,
        x.stride(0),
        wp.stride(0),
        s.stride(0),
        s.stride(1),
        y.stride(0),
        per,
        FUSED_REDUCE=split > 1,
        FENCE_PTX=split > 1 and use_ptx,
        BLOCK_M=bm,
        USE_PTX=use_ptx,
        W_TMA=w_tma,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=8,
        NUM_STAGES=ns,
        num_warps=nw,
        num_stages=ns,
    )
    return y
