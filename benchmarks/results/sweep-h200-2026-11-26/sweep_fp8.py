# ruff: noqa: B023, F821 - closures run inside the loop iteration that made them
"""One-call GPU sweep of soft-FP8 GEMM configs (and native FP8 options) for the config tables.

    PYTHONPATH=.:plugins/nvidia python benchmarks/results/sweep-h200-2026-11-26/sweep_fp8.py --out DIR [--compile-only --shard i/n]

Times each candidate like bench_ops.py (CUDA-graph replays over rotated weight
copies), next to cuBLAS bf16 on the same data, checks each result against the fp32
reference, and appends JSON lines to DIR/sweep.jsonl. With --compile-only, runs
each candidate once (fills Triton's cache; shard the list over processes).

The ``"kind": "swap"`` rows of sweep.jsonl were timed with ``fp8_gemm_kernel``, a swap-AB
kernel since replaced by ``fp8_wide_kernel`` (same tile layout, bf16 widening, in-launch
split-K sum); run today, those candidates run the wide kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from bench_ops import bench_us, copies_for, make_weight  # noqa: E402

from chitu_core.kernels.fp8_gemm import Fp8GemmConfig as C  # noqa: E402
from chitu_core.kernels.fp8_gemm import fp8_gemm  # noqa: E402
from chitu_core.quant import dequantize_block_fp8  # noqa: E402


def candidates(m: int) -> list[C]:
    if m == 1:
        out = [
            C(kind="gemv", block_m=1, block_n=bn, num_warps=w, num_stages=st, split_k=sk)
            for bn, w, st, sk in [
                (32, 4, 1, 0),
                (64, 4, 1, 0),
                (128, 4, 1, 0),
                (64, 8, 1, 0),
                (128, 8, 1, 0),
                (64, 4, 1, 2),
                (64, 4, 1, 4),
                (64, 4, 1, 8),
                (32, 2, 1, 4),
                (16, 1, 1, 4),
                (64, 4, 3, 4),
            ]
        ]
        out += [
            C(
                kind="gemv",
                block_m=1,
                block_n=64,
                num_warps=4,
                num_stages=1,
                split_k=4,
                fused_reduce=False,
            )
        ]
        return out
    if m <= 16:
        return [
            C(kind="gemv", block_m=16, block_n=bn, num_warps=w, num_stages=st, split_k=sk)
            for bn, w, st, sk in [
                (64, 4, 3, 0),
                (64, 4, 4, 0),
                (128, 4, 3, 0),
                (128, 8, 3, 0),
                (64, 4, 2, 0),
                (64, 4, 3, 2),
                (64, 4, 3, 4),
                (128, 4, 3, 4),
                (32, 4, 3, 0),
            ]
        ] + [
            C(kind="gemv", block_m=4, block_n=32, num_warps=4, num_stages=1, split_k=0),
            C(kind="wide", block_n=32, block_m=16, num_warps=4, num_stages=4),
        ]
    if m <= 64:
        return [
            C(
                kind="mm",
                block_m=64,
                block_n=bn,
                block_k=bk,
                num_warps=w,
                num_stages=st,
                split_k=sk,
                scale_on_acc=acc,
            )
            for bn, bk, w, st, sk, acc in [
                (64, 128, 4, 3, 0, True),
                (128, 128, 4, 3, 0, True),
                (64, 128, 4, 3, 0, False),
                (128, 128, 4, 3, 0, False),
                (128, 64, 4, 4, 0, False),
                (64, 64, 4, 4, 0, False),
                (128, 128, 4, 3, 1, False),
                (64, 128, 4, 3, 1, True),
            ]
        ] + [
            C(
                kind="wide",
                block_n=bn,
                block_m=64,
                block_k=bk,
                num_warps=4,
                num_stages=st,
                split_k=0,
                scale_on_acc=acc,
            )
            for bn, bk, st, acc in [
                (64, 128, 3, True),
                (128, 128, 3, True),
                (128, 64, 4, False),
                (64, 128, 3, False),
            ]
        ]
    if m <= 256:
        return (
            [
                C(
                    kind="mm",
                    block_m=bm,
                    block_n=bn,
                    block_k=bk,
                    num_warps=w,
                    num_stages=st,
                    split_k=sk,
                    scale_on_acc=acc,
                )
                for bm, bn, bk, w, st, sk, acc in [
                    (128, 128, 64, 8, 3, 0, False),
                    (128, 128, 128, 8, 3, 0, False),
                    (128, 128, 64, 4, 4, 0, False),
                    (64, 128, 128, 4, 3, 0, False),
                    (128, 64, 128, 4, 3, 0, False),
                    (256, 128, 64, 8, 3, 0, False),
                    (128, 128, 128, 8, 3, 0, True),
                    (128, 256, 64, 8, 3, 0, False),
                ]
            ]
            + [
                C(
                    kind="wide",
                    block_n=bn,
                    block_m=bm,
                    block_k=bk,
                    num_warps=w,
                    num_stages=st,
                    split_k=0,
                    scale_on_acc=False,
                )
                for bn, bm, bk, w, st in [
                    (128, 128, 64, 8, 3),
                    (128, 256, 64, 8, 3),
                    (64, 128, 128, 4, 3),
                ]
            ]
            + [C(kind="dequant")]
        )
    return (
        [
            C(
                kind="mm",
                block_m=bm,
                block_n=bn,
                block_k=bk,
                num_warps=w,
                num_stages=st,
                split_k=1,
                scale_on_acc=False,
            )
            for bm, bn, bk, w, st in [
                (256, 128, 64, 8, 3),
                (128, 256, 64, 8, 3),
                (128, 128, 64, 8, 4),
                (256, 128, 64, 8, 4),
                (128, 128, 64, 4, 4),
            ]
        ]
        + [
            C(
                kind="wide",
                block_n=bn,
                block_m=bm,
                block_k=64,
                num_warps=8,
                num_stages=st,
                split_k=1,
                scale_on_acc=False,
            )
            for bn, bm, st in [(128, 256, 3), (128, 256, 4), (256, 128, 3), (128, 128, 4)]
        ]
        + [C(kind="dequant")]
    )


SHAPES = [(7168, 18432), (7168, 2112), (18432, 7168)]
MS = [1, 16, 64, 256, 4096]


def native_variants(x, wq, s):
    """torch._scaled_mm with DeepSeek block scales, several scale layouts; yields (name, fn)."""
    from chitu_nvidia.native_fp8 import act_quant

    w8 = wq.view(torch.float8_e4m3fn)

    def mk(a_colmajor, b_t):
        def fn():
            xq, xs = act_quant(x)
            sa = xs.t().contiguous().t() if a_colmajor else xs
            sb = s.t() if b_t else s
            return torch._scaled_mm(xq, w8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

        return fn

    for a_cm in (True, False):
        for b_t in (False, True):
            yield f"scaled_mm a_colmajor={a_cm} b_t={b_t}", mk(a_cm, b_t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--native", action="store_true")
    args = ap.parse_args()
    shard, nshards = map(int, args.shard.split("/"))
    props = torch.cuda.get_device_properties(0)
    num_sms = props.multi_processor_count
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = (
        SHAPES
        if args.shapes == "all"
        else [tuple(map(int, t.split("x"))) for t in args.shapes.split(",")]
    )
    ms = [int(v) for v in args.ms.split(",")]
    os.makedirs(args.out, exist_ok=True)
    log = open(
        os.path.join(args.out, "sweep.jsonl" if not args.compile_only else f"compile{shard}.log"),
        "a",
    )
    job = 0
    for k, n in shapes:
        torch.manual_seed(0)
        wq, s = make_weight(n, k)
        wq = wq.view(torch.uint8)
        w_f32 = dequantize_block_fp8(wq, s, torch.float32)
        w_bf16 = w_f32.bfloat16()
        copies = copies_for(wq.numel())
        wqs = [wq] + [wq.clone() for _ in range(copies - 1)] if not args.compile_only else [wq]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w_f32.T
            nref = ref.norm()
            if not args.compile_only:
                wbs = [w_bf16] + [w_bf16.clone() for _ in range(copies - 1)]
                cub = bench_us(lambda i: lambda: F.linear(x, wbs[i]), copies)
                del wbs
                rec = {"K": k, "N": n, "M": m, "kind": "cublas_bf16", "us": cub}
                print(json.dumps(rec), flush=True)
                log.write(json.dumps(rec) + "\n")
            for cfg in candidates(m):
                job += 1
                if job % nshards != shard:
                    continue
                rec = {"K": k, "N": n, "M": m, "cfg": dataclasses.asdict(cfg)}
                try:
                    y = fp8_gemm(
                        x, wq, s, None, channel=False, config=cfg, num_sms=num_sms, use_ptx=True
                    )
                    y2 = fp8_gemm(
                        x, wq, s, None, channel=False, config=cfg, num_sms=num_sms, use_ptx=True
                    )
                    torch.cuda.synchronize()
                    rec["err"] = ((y.float() - ref).norm() / nref).item()
                    rec["repeat_equal"] = bool(torch.equal(y, y2))
                    if not args.compile_only:
                        rec["us"] = bench_us(
                            lambda i: (
                                lambda: fp8_gemm(
                                    x,
                                    wqs[i],
                                    s,
                                    None,
                                    channel=False,
                                    config=cfg,
                                    num_sms=num_sms,
                                    use_ptx=True,
                                )
                            ),
                            copies,
                        )
                        rec["x_cublas"] = cub / rec["us"]
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(json.dumps(rec), flush=True)
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if args.native and m >= 256 and not args.compile_only:
                for name, fn in native_variants(x, wq, s):
                    rec = {"K": k, "N": n, "M": m, "kind": name}
                    try:
                        y = fn()
                        rec["err"] = ((y.float() - ref).norm() / nref).item()
                        if rec["err"] < 0.05:
                            rec["us"] = bench_us(lambda i: fn, 1)
                    except Exception as e:  # noqa: BLE001
                        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(json.dumps(rec), flush=True)
                    log.write(json.dumps(rec) + "\n")
        del wqs
        torch.cuda.empty_cache()


if __name__ == "__main__" and sys.argv[1:2] != ["--summarize"]:
    main()


def summarize(path: str) -> None:
    """Best soft-FP8 config per (K, N, M) next to cuBLAS, from a sweep.jsonl."""
    rows = [json.loads(line) for line in open(path)]
    keys = sorted({(r["K"], r["N"], r["M"]) for r in rows})
    for key in keys:
        rs = [r for r in rows if (r["K"], r["N"], r["M"]) == key]
        cub = next((r["us"] for r in rs if r.get("kind") == "cublas_bf16"), float("nan"))
        soft = sorted((r for r in rs if "cfg" in r and "us" in r), key=lambda r: r["us"])
        bad = [
            r
            for r in rs
            if "cfg" in r
            and (r.get("err", 0) > 5e-3 or "error" in r or not r.get("repeat_equal", True))
        ]
        line = f"{key} cublas {cub:8.1f}"
        for r in soft[:3]:
            c = r["cfg"]
            line += (
                f" | {r['us']:8.1f} x{cub / r['us']:.2f} {c['kind']} {c['block_m']}x{c['block_n']}x{c['block_k']}"
                f" w{c['num_warps']} s{c['num_stages']} sk{c['split_k']} acc{int(c['scale_on_acc'])} f{int(c['fused_reduce'])}"
            )
        print(line)
        for r in rs:
            if "kind" in r and r["kind"].startswith("scaled_mm"):
                print("   ", r["kind"], r.get("us"), r.get("err"), r.get("error", "")[:150])
        for r in bad[:4]:
            print(
                "   BAD",
                r["cfg"]["kind"],
                r["cfg"]["block_m"],
                r["cfg"]["block_n"],
                r.get("err"),
                r.get("error", "")[:150],
            )


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--summarize":
    summarize(sys.argv[2])
