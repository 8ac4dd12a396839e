"""Batched-decode (M 32 / 64) soft-FP8 config sweep on Llama-8B shapes, 1 GPU and TP=2
shards, plus the DeepSeek 7168x18432 case; cuBLAS bf16 on the same shapes. JSON lines
to argv[1]. "current" in its output was the then shipped M 17..32 config, the swap-AB
GEMV 32 x 32.

    PYTHONPATH=.:plugins/nvidia:benchmarks python benchmarks/results/sweep-m32-h200-2026-11-26.py OUT.jsonl
"""

import json
import sys
import time

import torch
from bench_ops import bench_us, copies_for, make_weight, time_config
from chitu_nvidia import configs

from chitu_core.kernels.fp8_gemm import Fp8GemmConfig as C
from chitu_core.quant import dequantize_block_fp8

out = open(sys.argv[1], "w")
num_sms = torch.cuda.get_device_properties(0).multi_processor_count
cap = torch.cuda.get_device_capability()
SHAPES = [
    (4096, 6144),
    (4096, 4096),
    (4096, 28672),
    (14336, 4096),  # Llama-8B, 1 GPU (K, N)
    (4096, 3072),
    (2048, 4096),
    (4096, 14336),
    (7168, 4096),  # TP=2 shards
    (7168, 18432),
]


def cands(m):
    bms = [32] if m == 32 else [32, 64]
    c = [configs.soft_fp8_config(cap, m)]
    for bm in bms:
        for bn in (64, 128, 256):
            for w in (4, 8):
                for st in (3, 4):
                    if bn == 256 and w == 4:
                        continue
                    c.append(
                        C(
                            kind="mm",
                            block_m=bm,
                            block_n=bn,
                            block_k=128,
                            num_warps=w,
                            num_stages=st,
                        )
                    )
    c.append(C(kind="mm", block_m=bms[-1], block_n=128, block_k=64, num_warps=4, num_stages=4))
    return c


t0 = time.time()
for m in (32, 64):
    cs = cands(m)
    totals = [0.0] * len(cs)
    for k, n in SHAPES:
        wq, s = make_weight(n, k)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = dequantize_block_fp8(wq, s).to(torch.bfloat16)
        wbs = [wb] + [wb.clone() for _ in range(copies_for(wb.numel() * 2) - 1)]
        cub = bench_us(
            lambda i, x=x, wbs=wbs: lambda: torch.nn.functional.linear(x, wbs[i]), len(wbs)
        )
        del wbs
        row = {
            "M": m,
            "K": k,
            "N": n,
            "cublas_us": cub,
            "roof_us": (n * k + 2 * m * k + 2 * m * n) / 4.25e12 * 1e6,
            "configs": [],
        }
        for i, cfg in enumerate(cs):
            us = time_config(x, wq, s, cfg, num_sms)
            totals[i] += us
            row["configs"].append(
                [
                    str(cfg.kind),
                    cfg.block_m,
                    cfg.block_n,
                    cfg.block_k,
                    cfg.num_warps,
                    cfg.num_stages,
                    us,
                ]
            )
        best = min(row["configs"], key=lambda r: r[-1])
        print(
            f"M={m} K={k} N={n}: cuBLAS {cub:.1f} current {row['configs'][0][-1]:.1f} best {best} ({time.time() - t0:.0f}s)",
            flush=True,
        )
        out.write(json.dumps(row) + "\n")
        out.flush()
    order = sorted(range(len(cs)), key=totals.__getitem__)
    for i in order[:5]:
        print(f"M={m} total {totals[i]:.1f} us: {cs[i]}", flush=True)
    print(f"M={m} current total {totals[0]:.1f}", flush=True)
