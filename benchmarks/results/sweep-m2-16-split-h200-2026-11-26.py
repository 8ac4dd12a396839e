"""M 2..16 (mm kernel, K-permuted weights): the table row's automatic split against fixed
splits and capped automatic picks, on one GPU.

    PYTHONPATH=.:plugins/nvidia:benchmarks python sweep-m2-16-split-h200-2026-11-26.py OUT.jsonl
"""

import dataclasses
import json
import sys
import time

import torch
from bench_ops import bench_us, packed_gemm, packed_weight_copies
from chitu_nvidia.configs import soft_fp8_config

SHAPES = [(4096, 3072), (2048, 4096), (4096, 14336), (4096, 6144), (4096, 4096), (4096, 28672),
          (1536, 24576), (7168, 4096), (14336, 4096), (7168, 18432), (18432, 7168), (7168, 2112)]  # fmt: skip


def sweep_shape(k, n, sms, out, t0):
    w32, packs = packed_weight_copies(n, k)
    nc = len(packs)
    for m in (2, 4, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w32.T
        base = soft_fp8_config((9, 0), m, k, n, True)
        cands = [("shipped", base)]
        cands += [(f"k{sp}", dataclasses.replace(base, split_k=sp)) for sp in (1, 2, 3, 4, 6, 8)]
        cands += [(f"max{mx}", dataclasses.replace(base, max_split_k=mx)) for mx in (2, 4, 8)]
        res = {}
        for name, c in cands:

            def run(p, c=c, x=x):
                return packed_gemm(x, p, c, sms)

            err = ((run(packs[0]).float() - ref).norm() / ref.norm()).item()
            us = bench_us(lambda i, run=run: lambda: run(packs[i]), nc)
            res[name] = (round(us, 2), err)
        row = {"K": k, "N": n, "M": m, "cfg": str(base), "us": {a: b[0] for a, b in res.items()},
               "max_err": max(b[1] for b in res.values())}  # fmt: skip
        out.write(json.dumps(row) + "\n")
        out.flush()
        best = min(res.items(), key=lambda t: t[1][0])
        others = " ".join(f"{a}:{b[0]:.1f}" for a, b in res.items() if a != "shipped")
        print(f"K={k:6d} N={n:6d} M={m:3d} shipped {res['shipped'][0]:6.1f} best {best[0]} "
              f"{best[1][0]:6.1f} gain {res['shipped'][0] / best[1][0]:.2f} | {others} "
              f"[{time.time() - t0:.0f}s]", flush=True)  # fmt: skip


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    t0 = time.time()
    with open(sys.argv[1], "w") as out:
        for k, n in SHAPES:
            sweep_shape(k, n, sms, out, t0)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
