"""One soft-FP8 GEMM with the plugin's config and packing, launched three times, for ncu:

    PYTHONPATH=.:plugins/nvidia:benchmarks ncu --clock-control none --metrics ... \\
        -k regex:fp8_ -s 2 -c 1 python ncu-soft-fp8-h100-2026-11-26.py K N M

(the sections and metrics are listed in ncu-soft-fp8-h100-2026-11-26.txt)."""

import sys

import torch
from bench_ops import make_weight, pack_copies, packed_gemm
from chitu_nvidia.configs import soft_fp8_config

k, n, m = map(int, sys.argv[1:4])
wq, s = make_weight(n, k)
w = pack_copies([wq], s, True)[0]
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
cfg = soft_fp8_config((9, 0), m, k, n, True)
print("CONFIG", k, n, m, cfg, flush=True)
for _ in range(3):
    packed_gemm(x, w, cfg, torch.cuda.get_device_properties(0).multi_processor_count)
torch.cuda.synchronize()
