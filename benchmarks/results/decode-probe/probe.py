# ruff: noqa: B023, F821 - closures run inside the loop iteration that made them
"""Decode (M <= 16) probe: current vs candidate soft-FP8 configs, cuBLAS bf16, native FP8.

PYTHONPATH=.:plugins/nvidia:benchmarks python benchmarks/results/decode-probe/probe.py [--ncu-one NAME M]
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from bench_ops import bench_us, copies_for, make_weight

from chitu_core.kernels.fp8_gemm import Fp8GemmConfig as C
from chitu_core.kernels.fp8_gemm import fp8_gemm
from chitu_core.quant import dequantize_block_fp8

CANDS = {
    "cur_m1": C(kind="gemv", block_m=1, block_n=64, num_warps=8, num_stages=1),
    "cur_m16": C(kind="gemv", block_m=16, block_n=64, num_warps=4, num_stages=3),
    "gdot_bf_64": C(kind="gemv", block_m=16, block_n=64, num_warps=4, num_stages=3),
    "mm_64_4_3": C(kind="mm", block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3),
    "mm_128_4_3": C(kind="mm", block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=3),
    "mm_128_4_4": C(kind="mm", block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4),
    "mm_128_8_3": C(kind="mm", block_m=16, block_n=128, block_k=128, num_warps=8, num_stages=3),
    "mm_256_8_3": C(kind="mm", block_m=16, block_n=256, block_k=128, num_warps=8, num_stages=3),
    "mm_64_2_4": C(kind="mm", block_m=16, block_n=64, block_k=128, num_warps=2, num_stages=4),
    "mm_64_4_6": C(kind="mm", block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=6),
}
SHAPES = [(7168, 18432), (18432, 7168), (4096, 14336), (7168, 129280)]


def run_one(x, wq, s, cfg, sms):
    return fp8_gemm(x, wq, s, None, channel=False, config=cfg, num_sms=sms, use_ptx=True)


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if sys.argv[1:2] == ["--ncu-one"]:
        name, m = sys.argv[2], int(sys.argv[3])
        wq, s = make_weight(18432, 7168)
        x = torch.randn(m, 7168, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            run_one(x, wq, s, CANDS[name], sms)
        torch.cuda.synchronize()
        return
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CANDS)
    out = []
    for k, n in SHAPES:
        torch.manual_seed(0)
        wq, s = make_weight(n, k)
        w32 = dequantize_block_fp8(wq, s, torch.float32)
        copies = copies_for(wq.numel())
        wqs = [wq] + [wq.clone() for _ in range(copies - 1)]
        wb = w32.bfloat16()
        wbs = [wb] + [wb.clone() for _ in range(copies - 1)]
        del w32
        rf = (n * k) / 4.25e12 * 1e6
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = (x.float() @ wbs[0].float().T) if n * k < 4e8 else None
            cub = bench_us(lambda i: lambda: F.linear(x, wbs[i]), copies)
            from chitu_nvidia.native_fp8 import native_config, native_fp8_gemm

            nat = bench_us(
                lambda i: (
                    lambda: native_fp8_gemm(
                        x, wqs[i].view(torch.float8_e4m3fn), s, None, native_config(m)
                    )
                ),
                copies,
            )
            rec = {"K": k, "N": n, "M": m, "cublas": cub, "native": nat}
            for nm in names:
                cfg = CANDS[nm]
                if m == 1 and nm == "cur_m16" or m > 1 and nm == "cur_m1":
                    continue
                try:
                    us = bench_us(lambda i: lambda: run_one(x, wqs[i], s, cfg, sms), copies)
                    err = None
                    if ref is not None:
                        y = run_one(x, wq, s, cfg, sms).float()
                        err = ((y - ref).norm() / ref.norm()).item()
                    rec[nm] = (round(us, 2), err)
                except Exception as e:  # noqa: BLE001
                    rec[nm] = str(e)[:120]
            out.append(rec)
            best = min((v[0], kk) for kk, v in rec.items() if isinstance(v, tuple))
            print(
                f"K={k} N={n} M={m} roof {rf:.1f} cublas {cub:.1f} native {nat:.1f} best {best} "
                + " ".join(
                    f"{kk}={v[0] if isinstance(v, tuple) else 'ERR'}"
                    for kk, v in rec.items()
                    if kk not in ("K", "N", "M", "cublas", "native")
                ),
                flush=True,
            )
        del wqs, wbs
        torch.cuda.empty_cache()
    json.dump(out, open(sys.argv[2] if len(sys.argv) > 2 else "/tmp/probe.json", "w"), indent=1)


if __name__ == "__main__":
    main()
