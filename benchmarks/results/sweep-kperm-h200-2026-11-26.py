# ruff: noqa: B023, F821, E402  (recorded experiment: its lambdas run within their loop iteration)
"""Sweep behind the K-permuted weight layout (H200, Triton 3.6, ``sweep-kperm-h200-2026-11-26.jsonl``):
the prototype wide kernel on K-permuted weights (``sweep-kperm-h200-2026-11-26-kernel.py``,
weights loaded by cp.async or, ``cfg[6]``, a TMA descriptor) against the shipped table of
that day ("shipped"), the K-order wide kernel on the same tiles ("old") and cuBLAS bf16.
The prototype became ``fp8_wide_kernel`` with ``K_PERM``; cfgs (64, 32, 256, ...) are
invalid there (a 256-wide K step spans two scale blocks: their errors are the "BAD" ones).

    PYTHONPATH=.:plugins/nvidia:benchmarks python benchmarks/results/sweep-kperm-h200-2026-11-26.py OUT.jsonl 32,64,128
"""

import json
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "plugins/nvidia")
sys.path.insert(0, "benchmarks/results")
from bench_ops import bench_us, copies_for, make_weight, time_config
from chitu_nvidia import configs

from chitu_core.kernels.fp8_gemm import Fp8GemmConfig as C
from chitu_core.quant import dequantize_block_fp8

kernel = __import__("sweep-kperm-h200-2026-11-26-kernel")
wide_perm, permute_k = kernel.wide_perm, kernel.permute_k

out = open(sys.argv[1], "w")
MS = [int(v) for v in sys.argv[2].split(",")]
SHAPES = [
    (7168, 18432),
    (18432, 7168),
    (4096, 6144),
    (4096, 28672),
    (14336, 4096),
    (4096, 3072),
    (2048, 4096),
    (4096, 14336),
    (7168, 2112),
    (1536, 24576),
]
if len(sys.argv) > 3:
    SHAPES = [tuple(map(int, t.split("x"))) for t in sys.argv[3].split(",")]
num_sms = torch.cuda.get_device_properties(0).multi_processor_count
cap = torch.cuda.get_device_capability()


def tiles(m):
    if m <= 32:
        return [(64, 32, 128, 4, 4), (128, 32, 128, 4, 4), (64, 32, 256, 4, 3)]
    if m <= 64:
        return [(64, 64, 128, 4, 3), (128, 64, 128, 4, 3), (64, 64, 64, 4, 4)]
    if m <= 128:
        return [(64, 128, 64, 4, 4), (128, 128, 64, 4, 3), (64, 128, 128, 4, 3)]
    return [(64, 256, 64, 4, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 3)]


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
        cub = bench_us(lambda i, x=x: lambda: torch.nn.functional.linear(x, wbs[i]), len(wbs))
        ship_cfg = configs.soft_fp8_config(cap, m, k, n)
        ship = time_config(x, wq, s, ship_cfg, num_sms)
        row = {
            "K": k,
            "N": n,
            "M": m,
            "cublas_us": cub,
            "shipped_us": ship,
            "shipped": ship_cfg.__dict__,
            "old": [],
            "perm": [],
        }
        for bn, bm, bk, nw, ns in tiles(m):
            for split in (0, 1, 2):
                cfg = C(
                    kind="wide",
                    block_n=bn,
                    block_m=bm,
                    block_k=bk,
                    num_warps=nw,
                    num_stages=ns,
                    split_k=split,
                    scale_on_acc=False,
                )
                row["old"].append(
                    {"cfg": [bn, bm, bk, nw, ns, split], "us": time_config(x, wq, s, cfg, num_sms)}
                )
                for tma in (False, True):
                    c = [bn, bm, bk, nw, ns, split, tma]
                    try:
                        y = wide_perm(x, wp, s, bn, bm, bk, nw, ns, split, num_sms, tma)
                        err = ((y.float() - ref).norm() / ref.norm()).item()
                        us = bench_us(
                            lambda i, x=x: (
                                lambda: wide_perm(
                                    x, wps[i], s, bn, bm, bk, nw, ns, split, num_sms, tma
                                )
                            ),
                            len(wps),
                        )
                    except Exception as e:  # noqa
                        row["perm"].append({"cfg": c, "error": repr(e)[:200]})
                        print("ERR", c, repr(e)[:200], flush=True)
                        continue
                    row["perm"].append({"cfg": c, "us": us, "err": err})
        out.write(json.dumps(row) + "\n")
        out.flush()
        ok = [r for r in row["perm"] if "us" in r and r["err"] < 1e-2]
        bad = [r for r in row["perm"] if "us" in r and r["err"] >= 1e-2]
        best = min(ok, key=lambda r: r["us"]) if ok else {"us": float("nan"), "cfg": None, "err": 0}
        bo = min(row["old"], key=lambda r: r["us"])
        print(
            f"K={k:6d} N={n:6d} M={m:4d} cublas {cub:7.1f} shipped {ship_cfg.kind:5s} {ship:7.1f} old-best {bo['us']:7.1f} {bo['cfg']} | "
            f"perm {best['us']:7.1f} {best['cfg']} err {best['err']:.1e} x_cublas {cub / best['us']:.2f} x_ship {ship / best['us']:.2f}"
            f"{' BAD ' + str(len(bad)) if bad else ''} [{time.time() - t0:.0f}s]",
            flush=True,
        )
    del wbs, wps
    torch.cuda.empty_cache()
