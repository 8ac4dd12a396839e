"""Decode-size (M = 32, or argv[2]) soft-FP8 configs on Llama-8B's linears, whole (1 GPU)
and as TP=2 shards, where the shards' small weights (8-59 MB) leave the shipped tiles
latency-bound. cuBLAS bf16 on the same shapes. JSON lines to argv[1], per-group sums on
stdout. At M != 32 the candidates are the shipped config with split-K fixed.

    PYTHONPATH=.:plugins/nvidia:benchmarks python benchmarks/results/sweep-m32-small-h200-2026-11-26.py OUT.jsonl [M]
"""

import collections
import dataclasses
import json
import sys

import torch
from bench_ops import bench_us, copies_for, make_weight, time_config
from chitu_nvidia import configs

from chitu_core.kernels.fp8_gemm import Fp8GemmConfig as C
from chitu_core.kernels.fp8_gemm import fp8_gemm, scales_foldable
from chitu_core.quant import dequantize_block_fp8

M = int(sys.argv[2]) if len(sys.argv) > 2 else 32
GROUPS = {
    "tp2": [(4096, 3072), (2048, 4096), (4096, 14336), (7168, 4096)],  # (K, N) shards
    "1gpu": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
}
CANDS = [
    C(kind="mm", block_m=32, block_n=bn, block_k=bk, num_warps=w, num_stages=st, split_k=sk)
    for bn, bk, w, st, sk in [(64, 128, 4, 3, 2), (64, 128, 4, 3, 4), (32, 128, 4, 3, 0),
                              (32, 128, 2, 3, 0), (16, 128, 2, 4, 0), (32, 64, 4, 4, 0),
                              (64, 64, 4, 4, 0), (32, 128, 4, 3, 4), (32, 128, 4, 3, 8),
                              (64, 128, 4, 4, 0), (64, 128, 8, 3, 0)]
] + [
    C(kind="gemv", block_m=32, block_n=32, num_warps=4, num_stages=3),
    C(kind="gemv", block_m=32, block_n=16, num_warps=2, num_stages=3),
    C(kind="gemv", block_m=32, block_n=32, num_warps=4, num_stages=3, split_k=4),
    C(kind="wide", block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=2,
      scale_on_acc=False),
    C(kind="wide", block_m=32, block_n=32, block_k=128, num_warps=4, num_stages=3, split_k=2,
      scale_on_acc=False),
    C(kind="wide", block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=4,
      scale_on_acc=False),
]  # fmt: skip

out = open(sys.argv[1], "w")
num_sms = torch.cuda.get_device_properties(0).multi_processor_count
cap = torch.cuda.get_device_capability()
if M != 32:
    shipped = configs.soft_fp8_config(cap, M, 4096)
    CANDS = [dataclasses.replace(shipped, split_k=sk) for sk in (1, 2, 3, 4, 6, 8)]
sums = collections.defaultdict(lambda: collections.defaultdict(float))
for group, shapes in GROUPS.items():
    for k, n in shapes:
        wq, s = make_weight(n, k)
        w32 = dequantize_block_fp8(wq, s, torch.float32)
        wb = w32.to(torch.bfloat16)
        wbs = [wb] + [wb.clone() for _ in range(copies_for(wb.numel() * 2) - 1)]
        x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w32.T
        cub = bench_us(
            lambda i, ws=wbs, xx=x: lambda: torch.nn.functional.linear(xx, ws[i]), len(wbs)
        )
        del wbs
        row = {"group": group, "K": k, "N": n, "M": M, "cublas_us": cub, "configs": []}
        sums[group]["cublas"] += cub
        for i, cfg in enumerate([configs.soft_fp8_config(cap, M, k, n)] + CANDS):
            us = time_config(x, wq, s, cfg, num_sms)
            y = fp8_gemm(x, wq, s, None, channel=False, config=cfg, num_sms=num_sms, use_ptx=True,
                         nan_codes=False, scales_fold=scales_foldable(s))  # fmt: skip
            err = ((y.float() - ref).norm() / ref.norm()).item()
            row["configs"].append({"cfg": cfg.__dict__, "us": us, "err": err, "shipped": i == 0})
            sums[group]["shipped" if i == 0 else str(i)] += us
        out.write(json.dumps(row) + "\n")
        out.flush()
        best = min(row["configs"], key=lambda r: r["us"])
        print(f"{group} K={k} N={n}: cublas {cub:.1f} shipped {row['configs'][0]['us']:.1f} "
              f"best {best['us']:.1f} {best['cfg']} err {best['err']:.1e}", flush=True)  # fmt: skip
for group, d in sums.items():
    ranked = sorted((v, key) for key, v in d.items())
    print(group, [(round(v, 1), key if key in ("cublas", "shipped") else CANDS[int(key) - 1])
                  for v, key in ranked[:5]], flush=True)  # fmt: skip
