# ruff: noqa: B023, F821, E402  (recorded experiment: its lambdas run within their loop iteration)
"""The shipped linear on K-order vs K-permuted FP8 weights (each with its own table) and
cuBLAS bf16, same run (``gemm-kperm-h200-2026-11-26.json``, H200; measured before the M 33..64
fallback row of the K-perm table moved from the GEMV to the wide kernel).

    PYTHONPATH=.:plugins/nvidia:benchmarks python benchmarks/results/gemm-kperm-h200-2026-11-26.py OUT.json [MS] [KxN,...]
"""

import json
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "plugins/nvidia")
from bench_ops import bench_us, copies_for, make_weight
from chitu_nvidia.linear import linear

from chitu_core.kernels.packed_weight import pack_weight
from chitu_core.quant import FORMAT_FP8_BLOCK128, dequantize_block_fp8

MS = (
    [int(v) for v in sys.argv[2].split(",")]
    if len(sys.argv) > 2
    else [1, 4, 16, 24, 32, 48, 64, 96, 128]
)
SHAPES = [
    (7168, 18432),
    (18432, 7168),
    (7168, 2112),
    (1536, 24576),
    (7168, 129280),
    (4096, 6144),
    (4096, 28672),
    (14336, 4096),
    (4096, 3072),
    (2048, 4096),
    (4096, 14336),
    (7168, 4096),
]
if len(sys.argv) > 3:
    SHAPES = [tuple(map(int, t.split("x"))) for t in sys.argv[3].split(",")]
rows = []
t0 = time.time()
for k, n in SHAPES:
    wq, s = make_weight(n, k)
    w32 = dequantize_block_fp8(wq, s, torch.float32)
    nc = copies_for(wq.numel())
    packs = {}
    for perm in (False, True):
        packs[perm] = [
            pack_weight(
                wq.view(torch.float8_e4m3fn) if i == 0 else wq.clone().view(torch.float8_e4m3fn),
                s,
                FORMAT_FP8_BLOCK128,
                k_perm=perm,
            )
            for i in range(nc)
        ]
    wb = w32.to(torch.bfloat16)
    wbs = [wb] + [wb.clone() for _ in range(copies_for(wb.numel() * 2) - 1)]
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w32.T
        r = {"K": k, "N": n, "M": m}
        r["cublas_bf16_us"] = bench_us(
            lambda i: lambda: torch.nn.functional.linear(x, wbs[i]), len(wbs)
        )
        for perm in (False, True):
            ps = packs[perm]
            y = linear(x, ps[0], None, native=False)
            r[f"{'kperm' if perm else 'korder'}_err"] = (
                (y.float() - ref).norm() / ref.norm()
            ).item()
            r[f"{'kperm' if perm else 'korder'}_us"] = bench_us(
                lambda i: lambda: linear(x, ps[i], None, native=False), len(ps)
            )
        rows.append(r)
        print(
            f"K={k:6d} N={n:6d} M={m:4d} cublas {r['cublas_bf16_us']:8.1f} korder {r['korder_us']:8.1f} kperm {r['kperm_us']:8.1f} "
            f"gain {r['korder_us'] / r['kperm_us']:.2f} x_cublas {r['cublas_bf16_us'] / r['kperm_us']:.2f} err {r['kperm_err']:.1e}/{r['korder_err']:.1e} [{time.time() - t0:.0f}s]",
            flush=True,
        )
    del packs, wbs
    torch.cuda.empty_cache()
props = torch.cuda.get_device_properties(0)
import triton

json.dump(
    {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__, "rows": rows},
    open(sys.argv[1], "w"),
    indent=1,
)
