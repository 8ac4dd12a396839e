"""Batched-decode and prefill (M >= 64) sweep of the ``wide`` soft-FP8 kernel against the
shipped config and cuBLAS bf16, on the DeepSeek-V3 and Llama-8B shapes. JSON lines to
argv[1]; a summary (best wide config per shape and M) on stdout. ``err``: relative
error (Frobenius) against the fp32 product of the exact operands.

``sweep-wide-m32-64-h200-2026-11-26.jsonl``: MS 32,48,64 on those six shapes plus
4096x4096, 1536x24576 and Llama-8B's TP=2 shards (4096x3072, 2048x4096, 4096x14336,
7168x4096); "shipped" there is the table before the K <= 4096 wide row.

``sweep-wide-h200-2026-11-26.jsonl`` (H200, Triton 3.6, MS 128,256,64,1024,4096) also holds rows of
``kind="dequant"`` with a ``chunk_bytes`` field: a variant of the dequant path, since
dropped, that widened 8-32 MB of the weight at a time into one reused buffer and
multiplied each chunk while it was still in L2. It lost to the whole-weight path at every
M (sums over the six shapes, best chunk size: M = 256 897 us against 739; M = 1024 1837
against 1761; M = 4096 6021 against 5962).

    PYTHONPATH=.:plugins/nvidia:benchmarks python benchmarks/results/sweep-wide-h200-2026-11-26.py OUT.jsonl [MS [KxN,...]]
"""

import json
import sys
import time

import torch
from bench_ops import bench_us, copies_for, make_weight, time_config
from chitu_nvidia import configs

from chitu_core.kernels.fp8_gemm import Fp8GemmConfig as C
from chitu_core.kernels.fp8_gemm import fp8_gemm, scales_foldable
from chitu_core.quant import dequantize_block_fp8

out = open(sys.argv[1], "w")
MS = [int(v) for v in sys.argv[2].split(",")] if len(sys.argv) > 2 else [64, 128, 256, 1024, 4096]
num_sms = torch.cuda.get_device_properties(0).multi_processor_count
print("L2 bytes", getattr(torch.cuda.get_device_properties(0), "L2_cache_size", None), flush=True)
cap = torch.cuda.get_device_capability()
SHAPES = [(7168, 18432), (18432, 7168), (7168, 2112), (4096, 6144), (4096, 28672), (14336, 4096)]
if len(sys.argv) > 3:  # "KxN,KxN,..."
    SHAPES = [tuple(map(int, t.split("x"))) for t in sys.argv[3].split(",")]


def W(bn, bm, bk, w, st, split=1, acc=False):
    return C(kind="wide", block_n=bn, block_m=bm, block_k=bk, num_warps=w, num_stages=st,
             split_k=split, scale_on_acc=acc)  # fmt: skip


def cands(m, k, n):
    if m <= 32:
        c = [W(64, 32, 128, 4, 3, 2), W(64, 32, 128, 4, 3, 0), W(128, 32, 128, 4, 3),
             W(64, 32, 64, 4, 4, 2)]  # fmt: skip
    elif m <= 64:
        c = [W(64, 64, 128, 4, 3, 2), W(64, 64, 64, 4, 2, 2), W(128, 64, 128, 4, 3),
             W(64, 64, 128, 4, 2, 2), W(64, 64, 128, 8, 3, 2), W(64, 64, 64, 4, 3, 0)]  # fmt: skip
    elif m <= 128:
        c = [W(64, 128, 64, 4, 4, 2), W(64, 128, 64, 4, 2, 2), W(64, 128, 128, 4, 2, 2),
             W(128, 128, 64, 8, 3, 2), W(128, 128, 64, 8, 2), W(64, 128, 64, 8, 3, 2),
             W(64, 128, 64, 4, 4), W(64, 128, 64, 4, 4, 0), W(128, 128, 64, 4, 3),
             W(128, 128, 128, 8, 3, 1, True)]  # fmt: skip
    elif m <= 256:
        c = [W(64, 128, 64, 4, 4), W(64, 256, 64, 4, 3), W(128, 256, 64, 8, 3), W(64, 128, 64, 4, 2),
             W(128, 128, 64, 8, 3)]  # fmt: skip
    else:
        c = [W(128, 256, 64, 8, 3), W(128, 256, 64, 8, 4), W(256, 128, 64, 8, 3), W(128, 128, 64, 8, 4),
             W(256, 128, 64, 8, 4)]  # fmt: skip
    return [configs.soft_fp8_config(cap, m, k, n)] + c


t0 = time.time()
for k, n in SHAPES:
    wq, s = make_weight(n, k)
    w32 = dequantize_block_fp8(wq, s, torch.float32)
    wb = w32.to(torch.bfloat16)
    wbs = [wb] + [wb.clone() for _ in range(copies_for(wb.numel() * 2) - 1)]
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w32.T
        cub = bench_us(
            lambda i, x=x, ws=wbs: lambda: torch.nn.functional.linear(x, ws[i]), len(wbs)
        )
        row = {"K": k, "N": n, "M": m, "cublas_us": cub, "configs": []}
        for i, cfg in enumerate(cands(m, k, n)):
            us = time_config(x, wq, s, cfg, num_sms)
            y = fp8_gemm(x, wq, s, None, channel=False, config=cfg, num_sms=num_sms, use_ptx=True,
                         nan_codes=False, scales_fold=scales_foldable(s))  # fmt: skip
            err = ((y.float() - ref).norm() / ref.norm()).item()
            row["configs"].append({"cfg": cfg.__dict__, "us": us, "err": err, "shipped": i == 0})
        out.write(json.dumps(row) + "\n")
        out.flush()
        ship = row["configs"][0]
        best = min(
            (r for r in row["configs"][1:] if r["cfg"]["kind"] == "wide"), key=lambda r: r["us"]
        )
        c = best["cfg"]
        print(f"K={k:6d} N={n:6d} M={m:5d} cublas {cub:8.1f} shipped {ship['cfg']['kind']:7s} "
              f"{ship['us']:8.1f} | best wide {best['us']:8.1f} ({c['block_n']}x{c['block_m']}x{c['block_k']} "
              f"w{c['num_warps']} s{c['num_stages']} k{c['split_k']} acc={c['scale_on_acc']}) err {best['err']:.1e} "
              f"x_cublas {cub / best['us']:.2f}  [{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
    del wbs
    torch.cuda.empty_cache()
