# ruff: noqa: B023  (recorded experiment: its lambdas run within their loop iteration)
"""Wide tiles that fit two programs a SM (fewer stages, or 4 warps) at M 128/256 on
K-permuted weights, against the K-perm table's pick, dequant + cuBLAS and cuBLAS bf16, same
run (sweep-kperm-wide-h200-2026-11-26.py with other candidates). JSON lines to argv[1].

    PYTHONPATH=.:plugins/nvidia:benchmarks python sweep-occupancy-m128-256-h200-2026-11-26.py OUT.jsonl 128,256
"""

import json
import sys
import time

import torch
from bench_ops import bench_us, copies_for, make_weight
from chitu_nvidia import configs

from chitu_core.kernels.fp8_gemm import Fp8GemmConfig as C
from chitu_core.kernels.fp8_gemm import fp8_gemm, permute_k
from chitu_core.quant import dequantize_block_fp8

out = open(sys.argv[1], "w")
MS = [int(v) for v in sys.argv[2].split(",")] if len(sys.argv) > 2 else [96, 128, 192, 256]
SHAPES = [(7168, 18432), (18432, 7168), (4096, 6144), (4096, 28672), (14336, 4096),
          (1536, 24576), (4096, 14336), (7168, 2112)]  # fmt: skip
if len(sys.argv) > 3:
    SHAPES = [tuple(map(int, t.split("x"))) for t in sys.argv[3].split(",")]
num_sms = torch.cuda.get_device_properties(0).multi_processor_count
cap = torch.cuda.get_device_capability()


def W(bn, bm, bk, w, st, split):
    return C(kind="wide", block_n=bn, block_m=bm, block_k=bk, num_warps=w, num_stages=st,
             split_k=split, scale_on_acc=False)  # fmt: skip


def cands(m):
    # two programs a SM: fewer stages (shared memory) or 4 warps (registers)
    if m <= 128:
        tiles = [
            (64, 128, 128, 4, 2),
            (64, 128, 64, 4, 4),
            (64, 128, 64, 4, 3),
            (32, 128, 128, 4, 2),
            (64, 128, 128, 8, 2),
            (64, 64, 128, 4, 3),
            (64, 64, 128, 4, 4),
        ]
    else:
        tiles = [
            (128, 128, 128, 8, 2),
            (64, 128, 128, 4, 2),
            (64, 128, 128, 4, 3),
            (64, 256, 64, 4, 3),
            (64, 256, 64, 4, 2),
            (128, 256, 64, 8, 2),
            (64, 128, 64, 4, 4),
        ]
    return [W(*t, split) for t in tiles for split in (1, 2)]


t0 = time.time()
for k, n in SHAPES:
    wq, s = make_weight(n, k)
    w32 = dequantize_block_fp8(wq, s, torch.float32)
    wb = w32.to(torch.bfloat16)
    wbs = [wb] + [wb.clone() for _ in range(copies_for(wb.numel() * 2) - 1)]
    wp = permute_k(wq.view(torch.uint8))
    wps = [wp] + [wp.clone() for _ in range(copies_for(wp.numel()) - 1)]
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w32.T
        row = {"K": k, "N": n, "M": m, "configs": []}
        row["cublas_us"] = bench_us(
            lambda i: lambda: torch.nn.functional.linear(x, wbs[i]), len(wbs)
        )

        def run(cfg, i=0):
            return fp8_gemm(x, wps[i], s, None, channel=False, config=cfg, num_sms=num_sms,
                            use_ptx=True, nan_codes=False, scales_fold=True, k_perm=True)  # fmt: skip

        table = configs.soft_fp8_config(cap, m, k, n, k_perm=True)
        for i, cfg in enumerate([table, C(kind="dequant")] + cands(m)):
            try:
                err = ((run(cfg).float() - ref).norm() / ref.norm()).item()
                us = bench_us(lambda j: lambda: run(cfg, j), len(wps))
            except Exception as e:  # noqa: BLE001 - out of shared memory etc.
                print("skip", cfg, type(e).__name__, flush=True)
                continue
            row["configs"].append({"cfg": cfg.__dict__, "us": us, "err": err, "table": i == 0})
        out.write(json.dumps(row) + "\n")
        out.flush()
        tab, deq = row["configs"][0], row["configs"][1]
        best = min(row["configs"][2:], key=lambda r: r["us"])  # best wide or mm candidate
        c = best["cfg"]
        print(f"K={k:6d} N={n:6d} M={m:4d} cublas {row['cublas_us']:7.1f} table {tab['cfg']['kind']:7s} "
              f"{tab['us']:7.1f} dequant {deq['us']:7.1f} | best {c['kind']} {best['us']:7.1f} "
              f"({c['block_n']}x{c['block_m']}x{c['block_k']} w{c['num_warps']} s{c['num_stages']} "
              f"k{c['split_k']}) err {best['err']:.1e} x_cublas {row['cublas_us'] / best['us']:.2f} "
              f"[{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
    wbs = wps = None  # free before the next shape
    torch.cuda.empty_cache()
