# ruff: noqa: B023, B008  (recorded experiment: its lambdas run within their loop iteration)
"""Cost of the split-K reduction tail of the small decode GEMMs: the table config against the
same launch with no reduction at all (partials stored, no ticket, no reduce kernel: a lower
bound, wrong output), the two-kernel reduction and split 1.

    PYTHONPATH=.:plugins/nvidia:benchmarks python splitk-tail-h200-2026-11-26.py OUT.txt
"""

import dataclasses
import sys

import torch
from bench_ops import bench_us, copies_for, make_weight, pack_copies, packed_gemm
from chitu_nvidia.configs import soft_fp8_config

from chitu_core.kernels import fp8_gemm as F

out = open(sys.argv[1], "w")


def say(s):
    print(s, flush=True)
    out.write(s + "\n")
    out.flush()


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


real_reduce = F.splitk_reduce_kernel
sms = torch.cuda.get_device_properties(0).multi_processor_count
say(torch.cuda.get_device_name(0) + ": us per call (graph, rotated weights)")
for k, n in [(4096, 3072), (2048, 4096), (7168, 4096), (4096, 14336), (4096, 6144), (14336, 4096)]:
    wq, s = make_weight(n, k)
    nc = copies_for(wq.numel())
    packs = pack_copies([wq] + [wq.clone() for _ in range(nc - 1)], s, True)
    line = f"K={k:6d} N={n:6d}: "
    for m in (1, 32):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cfg = soft_fp8_config((9, 0), m, k, n, True)
        base = bench_us(lambda i, x=x, c=cfg: lambda: packed_gemm(x, packs[i], c, sms), nc)
        F.splitk_reduce_kernel = _NoLaunch()
        nored = bench_us(
            lambda i, x=x, c=dataclasses.replace(cfg, fused_reduce=False): (
                lambda: packed_gemm(x, packs[i], c, sms)
            ),
            nc,
        )
        F.splitk_reduce_kernel = real_reduce
        unfused = bench_us(
            lambda i, x=x, c=dataclasses.replace(cfg, fused_reduce=False): (
                lambda: packed_gemm(x, packs[i], c, sms)
            ),
            nc,
        )
        one = bench_us(
            lambda i, x=x, c=dataclasses.replace(cfg, split_k=1): (
                lambda: packed_gemm(x, packs[i], c, sms)
            ),
            nc,
        )
        line += f"M={m} [{cfg.kind} {cfg.block_n}x{cfg.block_m}] table {base:.1f} no-reduce {nored:.1f} 2-kernel {unfused:.1f} split1 {one:.1f} | "
    say(line)
