# ruff: noqa: B023, F821, E402  (recorded experiment: its lambdas run within their loop iteration)
"""Dropped prototype (``sweep-tma-h200-2026-11-26.jsonl``, H200, Triton 3.6): the wide soft-FP8 kernel with the weight (and optionally x) loaded by TMA
descriptors, so that deep pipelines cost no thread instructions. It won 0-15% only where a
wider tile or another split also won, and deeper pipelines (6 stages) never won: the wide
kernel is bound by instructions, not loads in flight (what the K-permuted layout fixed). Sweep vs the shipped
table and cuBLAS. Usage: python tma_proto.py OUT.jsonl MS [KxN,...]"""

import json
import sys
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from chitu_core.kernels.e4m3_widen import e4m3_scaled_to_bf16, e4m3_to_bf16
from chitu_core.kernels.fp8_gemm import (
    _counters,
    _store_or_reduce,
    grouped_tile,
    pick_split_k,
)


@triton.jit
def wide_tma_kernel(
    x_ptr,
    x_desc,
    w_desc,
    scale_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_sn,
    stride_sk,
    stride_ym,
    k_tiles_per_split,
    FUSED_REDUCE: tl.constexpr,
    FENCE_PTX: tl.constexpr,
    USE_PTX: tl.constexpr,
    X_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_split = tl.num_programs(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    kt_begin = pid_k * k_tiles_per_split
    kt_end = min(kt_begin + k_tiles_per_split, tl.cdiv(K, BLOCK_K))
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_n = offs_n % N
    rows_m = offs_m % M
    x_ptrs = x_ptr + rows_m[None, :] * stride_xm + (kt_begin * BLOCK_K + offs_k)[:, None]
    s_ptrs = scale_ptr + (rows_n // 128) * stride_sn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kt in tl.range(kt_begin, kt_end, num_stages=NUM_STAGES):
        w_bits = w_desc.load([n0, kt * BLOCK_K])
        if X_TMA:
            xt = tl.trans(x_desc.load([m0, kt * BLOCK_K]))
        else:
            xt = tl.load(x_ptrs + (kt - kt_begin) * BLOCK_K)
        s = tl.load(s_ptrs + (kt * BLOCK_K // 128) * stride_sk)
        if USE_PTX:
            w = e4m3_scaled_to_bf16(w_bits.to(tl.uint8, bitcast=True), s[:, None], False)
        else:
            w = (
                e4m3_to_bf16(w_bits.to(tl.uint8, bitcast=True), False, False).to(tl.float32)
                * (s / 4294967296.0)[:, None]
            ).to(tl.bfloat16)
        if USE_PTX:
            acc = tl.dot(w, xt, acc)
        else:  # the interpreter's bf16 dot is wrong; fp32 there
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
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


_desc_cache = {}


def wide_tma(x, w, s, bn, bm, bk, nw, ns, split, num_sms, x_tma=False, use_ptx=True):
    m, k = x.shape
    n = w.shape[0]
    key = (w.data_ptr(), bn, bk)
    wd = _desc_cache.get(key)
    if wd is None:
        wd = _desc_cache[key] = TensorDescriptor.from_tensor(w.view(torch.int8), [bn, bk])
    xd = TensorDescriptor.from_tensor(x, [bm, bk]) if x_tma else wd
    k_tiles = triton.cdiv(k, bk)
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    split = split or pick_split_k(tiles, k_tiles, num_sms, 16)
    per = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, per)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else y
    cnt = _counters(x.device, tiles) if split > 1 else ws
    wide_tma_kernel[(tiles, split)](
        x,
        xd,
        wd,
        s,
        y,
        ws,
        cnt,
        m,
        n,
        k,
        x.stride(0),
        s.stride(0),
        s.stride(1),
        y.stride(0),
        per,
        FUSED_REDUCE=split > 1,
        FENCE_PTX=split > 1 and use_ptx,
        USE_PTX=use_ptx,
        X_TMA=x_tma,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=8,
        NUM_STAGES=ns,
        num_warps=nw,
        num_stages=ns,
    )
    return y


if __name__ == "__main__":
    sys.path.insert(0, "benchmarks")
    sys.path.insert(0, "plugins/nvidia")
    from bench_ops import bench_us, copies_for, make_weight, time_config
    from chitu_nvidia import configs

    from chitu_core.quant import dequantize_block_fp8

    triton.set_allocator(
        lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda")
    )
    out = open(sys.argv[1], "w")
    MS = [int(v) for v in sys.argv[2].split(",")]
    SHAPES = [
        (7168, 18432),
        (18432, 7168),
        (4096, 6144),
        (4096, 28672),
        (14336, 4096),
        (4096, 3072),
        (2048, 4096),
        (4096, 14336),
    ]
    if len(sys.argv) > 3:
        SHAPES = [tuple(map(int, t.split("x"))) for t in sys.argv[3].split(",")]
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    cap = torch.cuda.get_device_capability()

    def cands(m):
        if m <= 32:
            base = [(64, 32, 128), (128, 32, 128), (64, 32, 64)]
        elif m <= 64:
            base = [(64, 64, 128), (128, 64, 128), (64, 64, 64)]
        else:
            base = [(64, 128, 64), (128, 128, 64), (64, 128, 128)]
        out = []
        for bn, bm, bk in base:
            for ns in (3, 4, 6):
                for split in (0, 2, 1):
                    out.append((bn, bm, bk, 4, ns, split, False))
        out += [(64, m if m <= 128 else 128, 128, 4, 4, 0, True)]
        return out

    t0 = time.time()
    for k, n in SHAPES:
        wq, s = make_weight(n, k)
        w32 = dequantize_block_fp8(wq, s, torch.float32)
        wb = w32.to(torch.bfloat16)
        ncop = copies_for(wb.numel() * 2)
        wbs = [wb] + [wb.clone() for _ in range(ncop - 1)]
        ncp8 = copies_for(wq.numel())
        wqs = [wq] + [wq.clone() for _ in range(ncp8 - 1)]
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w32.T
            cub = bench_us(
                lambda i, x=x, ws=wbs: lambda: torch.nn.functional.linear(x, ws[i]), len(wbs)
            )
            ship_cfg = configs.soft_fp8_config(cap, m, k, n)
            ship = time_config(x, wq, s, ship_cfg, num_sms)
            row = {
                "K": k,
                "N": n,
                "M": m,
                "cublas_us": cub,
                "shipped_us": ship,
                "shipped": ship_cfg.__dict__,
                "tma": [],
            }
            for c in cands(m):
                bn, bm, bk, nw, ns, split, xt = c
                try:
                    y = wide_tma(x, wq, s, bn, bm, bk, nw, ns, split, num_sms, xt)
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    us = bench_us(
                        lambda i, x=x: (
                            lambda: wide_tma(x, wqs[i], s, bn, bm, bk, nw, ns, split, num_sms, xt)
                        ),
                        len(wqs),
                    )
                except Exception as e:  # noqa
                    row["tma"].append({"cfg": c, "error": repr(e)[:300]})
                    print("ERR", c, repr(e)[:300], flush=True)
                    continue
                row["tma"].append({"cfg": c, "us": us, "err": err})
            out.write(json.dumps(row) + "\n")
            out.flush()
            ok = [r for r in row["tma"] if "us" in r and r["err"] < 2e-2]
            best = min(ok, key=lambda r: r["us"]) if ok else None
            print(
                f"K={k:6d} N={n:6d} M={m:4d} cublas {cub:7.1f} shipped {ship_cfg.kind:5s} {ship:7.1f} | "
                f"tma best {best['us'] if best else float('nan'):7.1f} {best['cfg'] if best else None} err {best['err'] if best else 0:.1e} "
                f"x_cublas {cub / best['us'] if best else 0:.2f} x_ship {ship / best['us'] if best else 0:.2f} [{time.time() - t0:.0f}s]",
                flush=True,
            )
        del wbs, wqs
        torch.cuda.empty_cache()
