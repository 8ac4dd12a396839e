"""Soft-FP8 GEMMs at M = 1/32 with the weight in L2 (one copy, replayed) against streamed from
HBM (rotated copies > 3x L2), Llama-8B TP=2 and 1-GPU shapes.

    PYTHONPATH=.:plugins/nvidia:benchmarks python decode-gemm-l2-hot-cold-h200-2026-11-26.py OUT.txt
"""

import sys

import torch
from bench_ops import bench_us, copies_for, make_weight, pack_copies, packed_gemm, read_stream_us
from chitu_nvidia.configs import soft_fp8_config

out = open(sys.argv[1], "w")


def say(s):
    print(s, flush=True)
    out.write(s + "\n")
    out.flush()


sms = torch.cuda.get_device_properties(0).multi_processor_count
say(torch.cuda.get_device_name(0) + ": us per call, in a graph of repeated calls")
for k, n in [(4096, 3072), (2048, 4096), (7168, 4096), (4096, 6144), (4096, 4096), (14336, 4096)]:
    wq, s = make_weight(n, k)
    nc = copies_for(wq.numel())
    packs = pack_copies([wq] + [wq.clone() for _ in range(nc - 1)], s, True)
    line = f"K={k:6d} N={n:6d} ({wq.numel() / 2**20:.0f} MB): "
    for m in (1, 32):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cfg = soft_fp8_config((9, 0), m, k, n, True)
        cold = bench_us(
            lambda i, x=x, cfg=cfg, packs=packs: lambda: packed_gemm(x, packs[i], cfg, sms), nc
        )
        hot = bench_us(
            lambda i, x=x, cfg=cfg, packs=packs: lambda: packed_gemm(x, packs[0], cfg, sms), nc
        )
        line += f"M={m} HBM {cold:.1f} L2 {hot:.1f} | "
    rc = read_stream_us([p.weight for p in packs])
    rh = read_stream_us([packs[0].weight] * nc)
    say(line + f"read-only HBM {rc:.1f} L2 {rh:.1f}")
