"""M 2..16: the shipped table (K split nearest 4 programs per SM) against the previous
whole-wave pick, same run, one GPU.

    PYTHONPATH=.:plugins/nvidia:benchmarks python gemm-m2-16-split-ab-h200-2026-11-26.py OUT.json
"""

import dataclasses
import json
import sys
import time

import torch
import triton
from bench_ops import bench_us, packed_gemm, packed_weight_copies
from chitu_nvidia.configs import soft_fp8_config
from chitu_nvidia.linear import linear

from chitu_core.kernels.fp8_gemm import pick_split_k

SHAPES = [(4096, 3072), (2048, 4096), (4096, 14336), (4096, 6144), (4096, 4096), (4096, 28672),
          (1536, 24576), (7168, 4096), (14336, 4096), (7168, 18432), (18432, 7168), (7168, 2112),
          (7168, 129280)]  # fmt: skip


def ab_shape(k, n, sms, rows, t0):
    w32, packs = packed_weight_copies(n, k)
    nc = len(packs)
    for m in (2, 4, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w32.T
        new = soft_fp8_config((9, 0), m, k, n, True)
        old = dataclasses.replace(new, target_ctas_per_sm=0.0, max_split_k=16)
        tiles = triton.cdiv(n, new.block_n) * triton.cdiv(m, new.block_m)
        kt = triton.cdiv(k, new.block_k)
        r = {"K": k, "N": n, "M": m,
             "split_new": pick_split_k(tiles, kt, sms, new.max_split_k, new.target_ctas_per_sm),
             "split_old": pick_split_k(tiles, kt, sms, 16)}  # fmt: skip

        def run_old(p, x=x, old=old):
            return packed_gemm(x, p, old, sms)

        def run_new(p, x=x):
            return linear(x, p, None, native=False)

        r["err_new"] = ((run_new(packs[0]).float() - ref).norm() / ref.norm()).item()
        r["err_old"] = ((run_old(packs[0]).float() - ref).norm() / ref.norm()).item()
        r["new_us"] = bench_us(lambda i, f=run_new: lambda: f(packs[i]), nc)
        r["old_us"] = bench_us(lambda i, f=run_old: lambda: f(packs[i]), nc)
        rows.append(r)
        print(f"K={k:6d} N={n:6d} M={m:3d} split {r['split_old']:2d} -> {r['split_new']:2d}  "
              f"{r['old_us']:7.1f} -> {r['new_us']:7.1f} us  gain {r['old_us'] / r['new_us']:.2f}  "
              f"err {r['err_new']:.1e} [{time.time() - t0:.0f}s]", flush=True)  # fmt: skip


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows, t0 = [], time.time()
    for k, n in SHAPES:
        ab_shape(k, n, sms, rows, t0)
        torch.cuda.empty_cache()
    tn = sum(r["new_us"] for r in rows)
    to = sum(r["old_us"] for r in rows)
    print(f"total over {len(rows)} cases: {to:.1f} -> {tn:.1f} us ({to / tn:.3f}x)")
    props = torch.cuda.get_device_properties(0)
    head = {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__}
    with open(sys.argv[1], "w") as f:
        json.dump({**head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
