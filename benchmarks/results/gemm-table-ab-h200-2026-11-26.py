"""The K-permuted soft-FP8 table against a previous copy of configs.py, same run, one GPU
(gemm-table-ab-h200-2026-11-26.txt, gemm-m32-table-ab-h100-2026-11-26.txt).

    PREV=old_configs.py PYTHONPATH=.:plugins/nvidia:benchmarks \\
        python gemm-table-ab-h200-2026-11-26.py OUT.json [M,M,...]
"""

import importlib.util
import json
import os
import sys
import time

import torch
import triton
from bench_ops import bench_us, packed_gemm, packed_weight_copies
from chitu_nvidia.configs import soft_fp8_config as new_cfg

SHAPES = [(4096, 3072), (2048, 4096), (4096, 14336), (7168, 4096), (4096, 6144), (4096, 4096),
          (4096, 28672), (14336, 4096), (1536, 24576), (7168, 18432), (18432, 7168), (7168, 2112),
          (7168, 129280), (7168, 36864), (4096, 128256)]  # fmt: skip


def load_prev(path):
    spec = importlib.util.spec_from_file_location("configs_prev", path)
    prev = importlib.util.module_from_spec(spec)
    sys.modules["configs_prev"] = prev  # dataclasses look their module up
    spec.loader.exec_module(prev)
    return prev


def ab_shape(k, n, ms, prev, sms, rows, t0):
    w32, packs = packed_weight_copies(n, k)
    nc = len(packs)
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w32.T
        cn = new_cfg((9, 0), m, k, n, True)
        co = prev.soft_fp8_config((9, 0), m, k, n, True)
        r = {"K": k, "N": n, "M": m, "new": str(cn), "old": str(co), "same": cn == co}
        for tag, c in (("new", cn), ("old", co)):

            def run(p, c=c, x=x):
                return packed_gemm(x, p, c, sms)

            r[f"err_{tag}"] = ((run(packs[0]).float() - ref).norm() / ref.norm()).item()
            if tag == "old" and r["same"]:
                r["old_us"] = r["new_us"]
            else:
                r[f"{tag}_us"] = bench_us(lambda i, run=run: lambda: run(packs[i]), nc)
        rows.append(r)
        print(f"K={k:6d} N={n:6d} M={m:3d} {'same' if r['same'] else 'CHANGED'} "
              f"{r['old_us']:7.1f} -> {r['new_us']:7.1f} us gain {r['old_us'] / r['new_us']:.2f} "
              f"err {r['err_new']:.1e} [{time.time() - t0:.0f}s]", flush=True)  # fmt: skip


def main():
    prev = load_prev(os.environ["PREV"])
    ms = [int(v) for v in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 24, 32, 48, 64]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows, t0 = [], time.time()
    for k, n in SHAPES:
        ab_shape(k, n, ms, prev, sms, rows, t0)
        torch.cuda.empty_cache()
    ch = [r for r in rows if not r["same"]]
    print(f"changed cases {len(ch)}: {sum(r['old_us'] for r in ch):.1f} -> "
          f"{sum(r['new_us'] for r in ch):.1f} us; all {len(rows)}: "
          f"{sum(r['old_us'] for r in rows):.1f} -> {sum(r['new_us'] for r in rows):.1f}")  # fmt: skip
    head = {"gpu": torch.cuda.get_device_properties(0).name, "torch": torch.__version__,
            "triton": triton.__version__}  # fmt: skip
    with open(sys.argv[1], "w") as f:
        json.dump({**head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
