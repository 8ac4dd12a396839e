"""Soft-FP8 GEMM vs native FP8, cuBLAS bf16, naive dequant+matmul and the FP8 roofline.

Usage (on an NVIDIA GPU; the plugin need not be installed):

    PYTHONPATH=.:plugins/nvidia python benchmarks/bench_ops.py --out results.json [--tune tune.json]

For every (K, N) of BENCHMARKS.md and M in {1, 4, 16, 64, 256, 1024, 4096}
times each path from CUDA-graph replays (no CPU launch overhead; each call
reads its own weight copy, together over 3x L2, so weights come from HBM), checks each result
against an fp32 reference of the exact dequantized weight, prints a table and
writes JSON rows ``{K, N, M, soft_fp8_us, native_fp8_us, native_cublas_us, auto_us,
auto_path, cublas_bf16_us, naive_us, roofline_us, read_stream_us, max_rel_err, ...}``
under a header (GPU, torch, triton, the command). ``auto``: the plugin's ``linear`` on a
weight prepared under ``--fp8-compute auto`` (the path ``fp8_dispatch`` picks for that
shape and M); ``native``: the native W8A8 path as the plugin runs it (Triton kernel below
``SCALED_MM_MIN_M``, cuBLAS block-scaled from there); ``native_cublas``: cuBLAS
block-scaled ``_scaled_mm`` at every M (where the crossover could move). ``read_stream_us``: the time a kernel that only reads the weight (the decode
GEMV's access pattern, no math) takes in the same harness: the practical ceiling of a
weight-streaming kernel, next to the copy-bandwidth roofline.
``--tune`` first sweeps a few soft-FP8 configs per M regime and uses the winners.

``--sections gemm,moe,attention,prefill`` adds the fused-MoE, paged/MLA decode
attention and prefill attention benchmarks (``moe_bench.py``, ``attn_bench.py``,
``prefill_bench.py``: kernel vs the generic torch op vs the roofline, numerics vs
an fp32 reference), written as rows ``{op, shape, kernel_us, generic_us,
roofline_us, max_rel_err, ...}`` to ``--moe-attn-out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

from chitu_core.kernels.fp8_gemm import Fp8GemmConfig, fp8_gemm
from chitu_core.kernels.packed_weight import PackedWeight, pack_weight
from chitu_core.quant import FORMAT_FP8_BLOCK128, dequantize_block_fp8, quantize_block_fp8

SHAPES = [  # (K, N): DeepSeek-V3, then Llama-8B
    (7168, 18432), (18432, 7168), (7168, 2112), (1536, 24576), (7168, 129280),
    (4096, 6144), (4096, 28672), (14336, 4096),
]  # fmt: skip
MS = [1, 4, 16, 64, 256, 1024, 4096]
HBM_BYTES_PER_S = 3.02e12  # H100 copy bandwidth (BENCHMARKS.md); re-measured at start
BF16_FLOPS_PER_S = 989e12  # H100/H200 SXM dense bf16 peak
# The soft path reads weights in the layout the plugin packs them in (K-permuted; K order
# with --k-order, for A/B runs) with that layout's config table.
K_PERM = True

C = Fp8GemmConfig
G = dict(kind="gemv")
MM = dict(kind="mm")
TUNE_SPACE = {  # max_m -> candidates (kinds: see Fp8GemmConfig)
    1: [C(**G, block_m=1, block_n=bn, num_warps=w, num_stages=1, prefetch=pf)
        for bn, w, pf in [(64, 8, False), (64, 4, False), (128, 8, False), (128, 4, False),
                          (64, 4, True), (32, 2, False)]]
       + [C(**MM, block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=3)],
    4: [C(**MM, block_m=16, block_n=bn, block_k=128, num_warps=w, num_stages=st)
        for bn, w, st in [(64, 2, 4), (64, 4, 3), (128, 4, 3), (128, 8, 3), (128, 4, 4)]]
       + [C(**G, block_m=4, block_n=bn, num_warps=w, num_stages=1) for bn, w in [(64, 4), (128, 8)]],
    16: [C(**MM, block_m=16, block_n=bn, block_k=128, num_warps=w, num_stages=st)
         for bn, w, st in [(64, 4, 3), (64, 2, 4), (128, 4, 3), (128, 8, 3), (128, 4, 4)]],
    32: [C(**G, block_m=32, block_n=bn, num_warps=w, num_stages=3) for bn, w in [(32, 4), (64, 8)]]
        + [C(**MM, block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)],
    # the swap-AB GEMV is occupancy-bound at BLOCK_M = 64 (162 registers with 4 warps):
    # 8 warps or a 32-row weight tile hold fewer per thread
    64: [C(**G, block_m=64, block_n=bn, num_warps=w, num_stages=3) for bn, w in [(64, 4), (64, 8), (32, 4)]]
        + [C(**MM, block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=4)],
    256: [C(kind="dequant")]
         + [C(**MM, block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st, scale_on_acc=acc)
            for bm, bn, bk, w, st, acc in [(64, 128, 128, 4, 3, True), (64, 128, 128, 8, 3, True),
                                           (128, 128, 64, 8, 3, False), (128, 128, 128, 8, 3, True),
                                           (128, 64, 128, 4, 3, True), (128, 256, 64, 8, 3, False)]],
    1 << 62: [C(kind="dequant")],
}  # fmt: skip
TUNE_CASES = {1: [(7168, 18432, 1), (18432, 7168, 1), (7168, 2112, 1), (4096, 6144, 1)],
              4: [(7168, 18432, 4), (4096, 14336, 4)],
              16: [(7168, 18432, 16), (18432, 7168, 16)],
              32: [(7168, 18432, 32), (4096, 28672, 24), (14336, 4096, 32)],
              64: [(7168, 18432, 64), (4096, 28672, 48), (14336, 4096, 64)],
              256: [(7168, 18432, 256), (18432, 7168, 128), (4096, 28672, 192)],
              1 << 62: [(7168, 18432, 4096)]}  # fmt: skip


def bench_us(make_call, num_copies: int = 1) -> float:
    """Median GPU time in us of one call, from CUDA-graph replays (no CPU launch overhead).

    make_call(i) returns a callable on the i-th copy of the weights; one graph runs
    the call over every copy in turn, so with enough copies (together > L2) every
    call reads its weight from HBM. Time per call = replay time / num_copies.
    """
    calls = [make_call(i) for i in range(num_copies)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return do_bench(graph.replay, warmup=10, rep=60, return_mode="median") * 1e3 / num_copies


@triton.jit
def _read_tiles_kernel(w_ptr, out_ptr, k_words, tiles_per_split, BLOCK_N: tl.constexpr):
    """XOR of this program's [BLOCK_N, 128-byte] weight tiles: the GEMV's loads alone."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * tiles_per_split * 32 + tl.arange(0, 32)
    ptrs = w_ptr + rows[:, None] * k_words + cols[None, :]
    acc = tl.zeros((BLOCK_N, 32), tl.int32)
    for _ in range(tiles_per_split):
        acc ^= tl.load(ptrs)
        ptrs += 32
    tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(acc))


def read_stream_us(wqs: list) -> float:
    """Time to merely read one [N, K] weight (K % 512 == 0, N % 64 == 0) with the decode
    GEMV's access pattern: the fastest of a few splits. A ceiling for any kernel that
    streams the weight once, measured the same way as the kernels (unlike the copy
    bandwidth, which also counts the bytes written)."""
    n, k = wqs[0].shape
    words = [w.view(torch.uint8).view(torch.int32) for w in wqs]
    best = float("inf")
    for split in (2, 4, 8):
        per = k // 128 // split
        if per * split * 128 != k:
            continue
        out = torch.empty((n // 64) * split, dtype=torch.int32, device=wqs[0].device)

        def call(i, per=per, split=split, out=out):
            return lambda: _read_tiles_kernel[(n // 64, split)](
                words[i], out, k // 4, per, BLOCK_N=64, num_warps=8
            )

        best = min(best, bench_us(call, len(words)))
    return best


def copies_for(weight_bytes: int) -> int:
    """Weight copies so that one replay streams at least 3x the L2 size."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(16, -(-3 * l2 // weight_bytes)))


def roofline_us(m: int, n: int, k: int) -> float:
    bytes_moved = n * k + 2 * m * k + 2 * m * n
    return max(bytes_moved / HBM_BYTES_PER_S, 2 * m * n * k / BF16_FLOPS_PER_S) * 1e6


def make_weight(n, k):
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    wq, s = quantize_block_fp8(w)
    return wq, s


def pack_copies(wqs: list, s: torch.Tensor, k_perm: bool) -> list[PackedWeight]:
    """Copies of one block-FP8 weight (uint8 codes ``[N, K]``, scales ``s``) packed as the
    NVIDIA plugin's ``prepare_weight`` packs them (K-permuted with ``k_perm``)."""
    return [
        pack_weight(w.view(torch.float8_e4m3fn), s, FORMAT_FP8_BLOCK128, k_perm=k_perm) for w in wqs
    ]


def packed_weight_copies(n: int, k: int, k_perm: bool = True):
    """A random block-FP8 ``[n, k]`` weight packed as the NVIDIA plugin packs it, in enough
    copies that one CUDA-graph replay over them streams > 3x the L2 size: ``(its exact value
    [n, k] fp32, [PackedWeight, ...])``."""
    wq, s = make_weight(n, k)
    wqs = [wq] + [wq.clone() for _ in range(copies_for(wq.numel()) - 1)]
    return dequantize_block_fp8(wq, s, torch.float32), pack_copies(wqs, s, k_perm)


def packed_gemm(x: torch.Tensor, w: PackedWeight, cfg: Fp8GemmConfig, num_sms: int) -> torch.Tensor:
    """``fp8_gemm`` of x [M, K] bf16 with a block-FP8 PackedWeight under ``cfg``, with the
    arguments the plugin's linear passes."""
    return fp8_gemm(
        x, w.weight, w.scale, None, channel=False, config=cfg, num_sms=num_sms, use_ptx=True,
        nan_codes=w.has_nan_codes, scales_fold=w.scales_fold, k_perm=w.k_perm,
    )  # fmt: skip


def time_config(x, wq, s, cfg, num_sms) -> float:
    """Median us of one soft-FP8 config; inf if it does not build (e.g. out of shared memory)."""
    try:
        wqs = [wq] + [wq.clone() for _ in range(copies_for(wq.numel()) - 1)]
        packs = pack_copies(wqs, s, K_PERM)
        return bench_us(lambda i: lambda: packed_gemm(x, packs[i], cfg, num_sms), len(packs))
    except Exception as e:  # noqa: BLE001
        print(f"  skip {cfg}: {type(e).__name__}")
        return float("inf")


def tune(num_sms, budget_s):
    """Sum of times over each regime's cases per config; the smallest sum wins."""
    t0 = time.time()
    best = {}
    for max_m, cfgs in TUNE_SPACE.items():
        if len(cfgs) == 1:
            best[max_m] = cfgs[0]
            continue
        totals = [0.0] * len(cfgs)
        for k, n, m in TUNE_CASES[max_m]:
            wq, s = make_weight(n, k)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for i, cfg in enumerate(cfgs):
                over = time.time() - t0 > budget_s
                us = (
                    float("inf")
                    if over or totals[i] == float("inf")
                    else time_config(x, wq, s, cfg, num_sms)
                )
                print(f"  tune M<={max_m} K={k} N={n} M={m} {cfg}: {us:.1f} us", flush=True)
                totals[i] += us
        i_best = min(range(len(cfgs)), key=totals.__getitem__)
        best[max_m] = cfgs[i_best]
        print(f"best M<={max_m}: {cfgs[i_best]}", flush=True)
    return best


def measure(k, n, m, wq, s, w_bf16, w_f32, cap, num_sms, configs) -> dict:
    """One table row: every path on the same data, errors vs the fp32 exact reference."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w_f32.T
    cfg = configs.soft_fp8_config(cap, m, k, n, K_PERM)

    def err(y):
        return ((y.float() - ref).norm() / ref.norm()).item()

    copies = copies_for(wq.numel())
    wqs = [wq] + [wq.clone() for _ in range(copies - 1)]
    wbs = [w_bf16] + [w_bf16.clone() for _ in range(copies - 1)]

    packs = pack_copies(wqs, s, K_PERM)  # K order (wqs) stays for native and naive

    def soft(i):
        return lambda: packed_gemm(x, packs[i], cfg, num_sms)

    row = {"K": k, "N": n, "M": m, "soft_config": dataclasses.asdict(cfg), "weight_copies": copies,
           "nan_codes": packs[0].has_nan_codes, "k_perm": K_PERM}  # fmt: skip
    row["soft_fp8_us"] = bench_us(soft, copies)
    row["max_rel_err"] = err(soft(0)())
    row["native_fp8_us"] = row["native_cublas_us"] = None
    if cap >= (8, 9):
        from chitu_nvidia.native_fp8 import native_config, native_fp8_gemm

        def native(i, use_scaled_mm=None):
            p = packs[i]  # as the plugin runs it: x permuted to the weight's K order
            return lambda: native_fp8_gemm(
                x, p.stored_fp8(), s, None, native_config(m), use_scaled_mm, k_perm=p.k_perm
            )

        row["native_fp8_us"] = bench_us(native, copies)
        row["native_rel_err"] = err(native(0)())
        row["native_cublas_us"] = bench_us(lambda i: native(i, True), copies)
        row["native_cublas_rel_err"] = err(native(0, True)())
    from chitu_nvidia import fp8_dispatch, linear

    from_m = fp8_dispatch.native_from_m("auto", cap, FORMAT_FP8_BLOCK128, n, k)
    autos = [dataclasses.replace(p, native_from_m=from_m) for p in packs]
    row["auto_path"] = "native" if m >= from_m else "soft"
    row["auto_us"] = bench_us(lambda i: lambda: linear.linear(x, autos[i], None), copies)
    row["auto_rel_err"] = err(linear.linear(x, autos[0], None))
    row["cublas_bf16_us"] = bench_us(lambda i: lambda: F.linear(x, wbs[i]), copies)
    row["cublas_rel_err"] = err(F.linear(x, w_bf16))
    row["naive_us"] = bench_us(
        lambda i: lambda: F.linear(x, dequantize_block_fp8(wqs[i], s, torch.bfloat16)), copies
    )
    row["roofline_us"] = roofline_us(m, n, k)
    row["pct_roofline"] = 100 * row["roofline_us"] / row["soft_fp8_us"]
    if k % 512 == 0 and n % 64 == 0:
        row["read_stream_us"] = read_stream_us(wqs)
        row["pct_read_stream"] = 100 * row["read_stream_us"] / row["soft_fp8_us"]
    row["speedup_vs_cublas"] = row["cublas_bf16_us"] / row["soft_fp8_us"]
    row["auto_speedup_vs_cublas"] = row["cublas_bf16_us"] / row["auto_us"]
    return row


def copy_bytes_per_s() -> float:
    """Bytes/s (read + written) of a 1 GiB device-to-device copy: the roofline's bandwidth."""
    buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(buf)
    copy_s = do_bench(lambda: dst.copy_(buf), warmup=10, rep=100, return_mode="median") * 1e-3
    return 2 * buf.numel() / copy_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gemm.json")
    ap.add_argument("--tune", default=None, help="sweep configs first, write the winners here")
    ap.add_argument("--tune-budget-s", type=float, default=180)
    ap.add_argument("--shapes", default="all", help="'all' or comma list of KxN")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--sections", default="gemm", help="any of gemm,moe,attention,prefill")
    ap.add_argument("--moe-attn-out", default="moe-attn.json")
    ap.add_argument(
        "--k-order", action="store_true", help="soft path on K-order weights (A/B of K-permuting)"
    )
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if sections - {"gemm", "moe", "attention", "prefill"}:
        ap.error(f"unknown section in {args.sections!r}")

    from chitu_nvidia import configs, linear

    global HBM_BYTES_PER_S, K_PERM
    K_PERM = not args.k_order
    HBM_BYTES_PER_S = copy_bytes_per_s()
    print(f"copy bandwidth {HBM_BYTES_PER_S / 1e12:.2f} TB/s", flush=True)
    props = torch.cuda.get_device_properties(0)
    if sections - {"gemm"}:
        run_kernel_sections(sections, args.moe_attn_out, props)
    if "gemm" not in sections:
        return
    cap = (props.major, props.minor)
    num_sms = props.multi_processor_count
    if args.tune:
        best = tune(num_sms, args.tune_budget_s)
        table = tuple(configs.ConfigRow(mm, cfg) for mm, cfg in sorted(best.items()))
        (configs.SOFT_FP8_TABLES_K_PERM if K_PERM else configs.SOFT_FP8_TABLES)[cap] = table
        with open(args.tune, "w") as f:
            json.dump({str(mm): dataclasses.asdict(c) for mm, c in best.items()}, f, indent=1)
    shapes = (
        SHAPES
        if args.shapes == "all"
        else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    )
    ms = [int(m) for m in args.ms.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []

    def dump(rows_so_far):  # after every row, so a run cut short still leaves its rows
        write_json(args.out, rows_so_far, props, configs, cap, num_sms)

    header = f"{'K':>6} {'N':>6} {'M':>5} | {'soft':>8} {'native':>8} {'nat-cub':>8} {'auto':>8} {'cublas':>8} {'naive':>8} {'roof':>8} {'read':>8} | {'%roof':>5} {'%read':>5} {'xcublas':>7} {'auto-x':>7} {'err':>8}"  # noqa: E501
    print(header, flush=True)
    for k, n in shapes:
        wq, s = make_weight(n, k)
        w_bf16 = dequantize_block_fp8(wq, s, torch.bfloat16)
        w_f32 = dequantize_block_fp8(wq, s, torch.float32)
        for m in ms:
            row = measure(k, n, m, wq, s, w_bf16, w_f32, cap, num_sms, configs)
            rows.append(row)
            nat_us = row["native_fp8_us"] or float("nan")
            cub_us = row["native_cublas_us"] or float("nan")
            read_us = row.get("read_stream_us", float("nan"))
            print(f"{k:>6} {n:>6} {m:>5} | {row['soft_fp8_us']:8.1f} {nat_us:8.1f} {cub_us:8.1f} "
                  f"{row['auto_us']:8.1f} {row['cublas_bf16_us']:8.1f} "
                  f"{row['naive_us']:8.1f} {row['roofline_us']:8.1f} {read_us:8.1f} | {row['pct_roofline']:5.1f} "
                  f"{row.get('pct_read_stream', float('nan')):5.1f} "
                  f"{row['speedup_vs_cublas']:7.2f} {row['auto_speedup_vs_cublas']:7.2f} "
                  f"{row['max_rel_err']:8.1e}", flush=True)  # fmt: skip
            dump(rows)
        torch.cuda.empty_cache()
    dump(rows)
    linear.device_props.cache_clear()


def run_kernel_sections(sections: set[str], path: str, props) -> None:
    """The MoE / decode attention / prefill attention rows, printed and written to ``path``."""
    rows: list[dict] = []

    def dump() -> None:
        header = {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__,
                  "date": time.strftime("%Y-%m-%d"), "hbm_bytes_per_s": HBM_BYTES_PER_S}  # fmt: skip
        with open(path, "w") as f:
            json.dump({**header, "rows": rows}, f, indent=1)

    def add(new_rows: list[dict]) -> None:
        for row in new_rows:
            kernel, roof = row.get("kernel_us") or float("nan"), row.get("roofline_us") or 0.0
            generic = row.get("generic_us") or float("nan")
            err = row.get("max_rel_err")
            print(f"{row['op']:<24} {str(row['shape']):<44} kernel {kernel:9.1f} us  "
                  f"generic {generic:9.1f} us  roofline {roof:8.1f} us "
                  f"({100 * roof / kernel:5.1f}%)  err {err if err is not None else float('nan'):.1e}",
                  flush=True)  # fmt: skip
        rows.extend(new_rows)
        dump()

    if "moe" in sections:
        from moe_bench import bench_fused_moe

        add(bench_fused_moe("cuda"))
    if "attention" in sections:
        from attn_bench import bench_decode_attention

        add(bench_decode_attention("cuda", hbm_bytes_per_s=HBM_BYTES_PER_S))
    if "prefill" in sections:
        from prefill_bench import bench_prefill_attention

        add(bench_prefill_attention("cuda"))
    torch.cuda.empty_cache()


def write_json(path, rows, props, configs, cap, num_sms) -> None:
    from chitu_nvidia import fp8_dispatch

    out = {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "num_sms": num_sms,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "timing": "CUDA-graph replays over rotated weight copies (> 3x L2), do_bench median per call",
        "hbm_bytes_per_s": HBM_BYTES_PER_S,
        "roofline": f"max(bytes / {HBM_BYTES_PER_S:.3g} B/s, 2MNK / {BF16_FLOPS_PER_S:.3g} FLOP/s)",
        "soft_fp8_table": {
            str(r.max_m)
            + (f" (K <= {r.max_k})" if r.max_k else "")
            + (f" (N >= {r.min_n})" if r.min_n else ""): dataclasses.asdict(r.config)
            for r in (configs.SOFT_FP8_TABLES_K_PERM if K_PERM else configs.SOFT_FP8_TABLES).get(
                cap, ()
            )
        },
        "soft_fp8_weight_layout": "K-permuted (permute_k)" if K_PERM else "K order",
        "auto_native_from_m": {
            str(arch): [dataclasses.asdict(r) for r in rows_]
            for arch, rows_ in fp8_dispatch.NATIVE_FROM_M.items()
        },
        "rows": rows,
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
