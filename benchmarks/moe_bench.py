"""Fused MoE (``chitu_core/kernels/fused_moe.py``) vs the generic op and the weight-bytes roofline.

Called by ``bench_ops.py``; alone, on an NVIDIA GPU:

    PYTHONPATH=. python benchmarks/moe_bench.py [--out moe.json]

Rows ``{"op", "shape", "kernel_us", "generic_us", "roofline_us", "max_rel_err", ...}``
for a DeepSeek-V3 layer (FP8 block-128, E=256, top-8, H=7168, I=2048) at T = 1, 8, 64
(decode) and 4096 (prefill, with ``baseline_us``: a loop of per-expert cuBLAS bf16
GEMMs over pre-dequantized weights, same routing), Mixtral-like (E=8, top-2,
H=4096, I=14336, bf16 and FP8) and Qwen-MoE-like (E=64, top-8, H=3584, I=2560, FP8).

roofline_us: bytes of the distinct selected experts (in their stored format,
scales included) / HBM bandwidth (4.8 TB/s H200, 3.35 TB/s H100). flops_us: the
FLOPs at the dense bf16 peak (what bounds prefill). Every layer's experts
together exceed the L2 and a step reads each selected expert once, so timings
are of HBM reads. The kernel is timed from CUDA-graph replays (no CPU launch
gaps: what a decode step sees); the generic op, which reads its routing on the
host, from CUDA events around eager calls.
"""

from __future__ import annotations

import argparse
import json

import torch
from attn_bench import device_hbm_bytes_per_s  # beside this script
from triton.testing import do_bench

from chitu_core.kernels.fused_moe import default_config, fused_moe
from chitu_core.kernels.packed_weight import as_packed
from chitu_core.ops.moe import fused_moe as generic_fused_moe
from chitu_core.ops.moe import moe_route
from chitu_core.quant import QuantizedWeight, dequantize_block_fp8, quantize_fp8

BF16_FLOPS_PER_S = 989e12  # H100/H200 SXM dense bf16
GRAPH_CALLS = 10  # kernel calls per graph replay


def random_fp8_experts(num_experts: int, rows: int, cols: int, device, seed: int):
    """Block-128 FP8 experts made on the device without an fp32 copy: random codes with
    exponent field 3..10 (|values| 2^-4..15, no NaN) and scales ~ cols^-0.5 / 4."""
    g = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 256, (num_experts, rows, cols), generator=g, device=device,
                          dtype=torch.uint8)  # fmt: skip
    codes = (codes & 0x87) | ((3 + (codes >> 3) % 8) << 3).to(torch.uint8)
    scale = torch.rand(num_experts, -(-rows // 128), -(-cols // 128), generator=g, device=device)
    return QuantizedWeight(codes, (scale + 0.5) * cols**-0.5 / 4, "fp8_block128")


def dense_experts(num_experts: int, rows: int, cols: int, fmt: str, device, seed: int):
    """bf16 random experts, or quantized to ``fmt`` one expert at a time."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(num_experts, rows, cols, generator=g, device=device, dtype=torch.bfloat16)
    w *= cols**-0.5
    if fmt == "unquantized":
        return QuantizedWeight(w, None, fmt)
    qs = [quantize_fp8(w[e], fmt) for e in range(num_experts)]
    return QuantizedWeight(
        torch.stack([q.weight for q in qs]), torch.stack([q.scale for q in qs]), fmt
    )


def expert_bytes(w13: QuantizedWeight, w2: QuantizedWeight) -> int:
    """Bytes of one expert (weights and scales) as stored."""
    total = 0
    for w in (w13, w2):
        total += w.weight[0].numel() * w.weight.element_size()
        if w.scale is not None:
            total += w.scale[0].numel() * w.scale.element_size()
    return total


def kernel_us(call) -> float:
    """Median us of one call, from replays of a graph of GRAPH_CALLS calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            call()
    return do_bench(graph.replay, warmup=10, rep=100, return_mode="median") * 1e3 / GRAPH_CALLS


def eager_us(call, rep: int = 30) -> float:
    return do_bench(call, warmup=3, rep=rep, return_mode="median") * 1e3


def per_expert_cublas(x, w13_dense, w2_dense, weights, ids):
    """A loop of per-expert bf16 GEMMs (routing read on the host beforehand, untimed)."""
    num_tokens, top_k = ids.shape
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13_dense.shape[0]).tolist()
    plan, start = [], 0
    for e, c in enumerate(counts):
        if c:
            pairs = order[start : start + c]
            plan.append((e, pairs, pairs // top_k, weights.flatten()[pairs, None]))
        start += c
    inter = w13_dense.shape[1] // 2
    pair_out = torch.empty(num_tokens * top_k, x.shape[1], dtype=x.dtype, device=x.device)

    def call():
        for e, pairs, tokens, w in plan:
            gu = x[tokens] @ w13_dense[e].T
            act = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
            pair_out[pairs] = ((act @ w2_dense[e].T) * w).to(pair_out.dtype)
        return pair_out.view(num_tokens, top_k, -1).sum(1)

    return call


def _row(op, shape, x, w13, w2, weights, ids, device, baseline: bool = False) -> dict:
    # as the NVIDIA plugin calls it: the NaN fix only for weights holding a NaN code
    nan_codes = as_packed(w13).has_nan_codes or as_packed(w2).has_nan_codes
    call = lambda: fused_moe(x, w13.weight, w13.scale, w2.weight, w2.scale, w13.fmt, weights, ids,  # noqa: E731
                             nan_codes=nan_codes)  # fmt: skip
    out = call().float()
    ref = generic_fused_moe(x, w13, w2, weights, ids).float()
    num_pairs = ids.numel()
    hidden, inter = x.shape[1], w2.weight.shape[2]
    distinct = int(torch.unique(ids).numel())
    row = {
        "op": op,
        "shape": shape,
        "kernel_us": kernel_us(call),
        "generic_us": eager_us(lambda: generic_fused_moe(x, w13, w2, weights, ids), rep=10),
        "roofline_us": distinct * expert_bytes(w13, w2) / device_hbm_bytes_per_s(device) * 1e6,
        "flops_us": 2 * num_pairs * 3 * inter * hidden / BF16_FLOPS_PER_S * 1e6,
        "max_rel_err": ((out - ref).abs().max() / ref.abs().max()).item(),
        "distinct_experts": distinct,
    }
    if baseline:
        w13_dense = torch.stack([dequantize_block_fp8(w13.weight[e], w13.scale[e], x.dtype)
                                 for e in range(w13.weight.shape[0])])  # fmt: skip
        w2_dense = torch.stack([dequantize_block_fp8(w2.weight[e], w2.scale[e], x.dtype)
                                for e in range(w2.weight.shape[0])])  # fmt: skip
        row["baseline_us"] = eager_us(per_expert_cublas(x, w13_dense, w2_dense, weights, ids))
        del w13_dense, w2_dense
    row["pct_of_roofline"] = 100 * row["roofline_us"] / row["kernel_us"]
    return row


def bench_fused_moe(device) -> list[dict]:
    """All rows on ``device`` (a CUDA device); see the module docstring."""
    device = torch.device(device)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)

    # DeepSeek-V3: sigmoid scores, 8 groups / top-4 groups, correction bias, scale 2.5
    e, k, h, i = 256, 8, 7168, 2048
    w13 = random_fp8_experts(e, 2 * i, h, device, 1)
    w2 = random_fp8_experts(e, h, i, device, 2)
    bias = torch.randn(e, generator=gen, device=device) * 0.05
    for t in (1, 8, 64, 4096):
        logits = torch.randn(t, e, generator=gen, device=device)
        weights, ids = moe_route(logits, k, "sigmoid", True, 8, 4, bias, 2.5)
        x = torch.randn(t, h, generator=gen, device=device, dtype=torch.bfloat16)
        shape = f"E={e} top{k} H={h} I={i} T={t} fp8_block128"
        rows.append(_row("moe_deepseek_v3", shape, x, w13, w2, weights, ids, device, t == 4096))
        print(rows[-1], flush=True)
    del w13, w2

    # Mixtral-like (softmax top-2, renormalized) and Qwen2-MoE-like (softmax top-8, not)
    for op, (e, k, h, i), fmts, renorm in (
        ("moe_mixtral", (8, 2, 4096, 14336), ("unquantized", "fp8_block128"), True),
        ("moe_qwen2", (64, 8, 3584, 2560), ("fp8_block128",), False),
    ):
        for fmt in fmts:
            w13 = dense_experts(e, 2 * i, h, fmt, device, 3)
            w2 = dense_experts(e, h, i, fmt, device, 4)
            for t in (1, 8, 64, 4096):
                logits = torch.randn(t, e, generator=gen, device=device)
                weights, ids = moe_route(logits, k, "softmax", renorm, 1, 1, None, 1.0)
                x = torch.randn(t, h, generator=gen, device=device, dtype=torch.bfloat16)
                shape = f"E={e} top{k} H={h} I={i} T={t} {fmt}"
                rows.append(_row(op, shape, x, w13, w2, weights, ids, device))
                print(rows[-1], flush=True)
            del w13, w2
    return rows


def tune_fused_moe(device, token_counts=(1, 8, 64), budget_s: float = 400.0) -> dict:
    """Sweep each kernel's tile/warps/stages with the other kernel at its default, on the
    DeepSeek-V3 layer; prints every time and returns {T: best FusedMoeConfig}."""
    import dataclasses
    import time

    device = torch.device(device)
    t0 = time.time()
    e, k, h, i = 256, 8, 7168, 2048
    w13 = random_fp8_experts(e, 2 * i, h, device, 1)
    w2 = random_fp8_experts(e, h, i, device, 2)
    gen = torch.Generator(device=device).manual_seed(0)
    best = {}
    for t in token_counts:
        logits = torch.randn(t, e, generator=gen, device=device)
        weights, ids = moe_route(logits, k, "sigmoid", True, 8, 4, None, 2.5)
        x = torch.randn(t, h, generator=gen, device=device, dtype=torch.bfloat16)
        cfg = default_config(t, k, e)
        roof = (
            int(torch.unique(ids).numel())
            * expert_bytes(w13, w2)
            / device_hbm_bytes_per_s(device)
            * 1e6
        )

        def time_cfg(c, x=x, weights=weights, ids=ids):
            if time.time() - t0 > budget_s:
                return float("inf")
            try:
                return kernel_us(lambda: fused_moe(x, w13.weight, w13.scale, w2.weight, w2.scale,
                                                   w13.fmt, weights, ids, config=c))  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                print(f"  skip {c}: {type(exc).__name__}")
                return float("inf")

        base = time_cfg(cfg)
        print(f"T={t} default {base:.1f} us (roofline {roof:.1f})", flush=True)
        for prefix in ("", "down_"):
            trials = {}
            for bn in (16, 32, 64):
                for warps in (2, 4, 8):
                    for stages in (1, 3, 5):
                        c = dataclasses.replace(cfg, **{f"{prefix}block_n": bn,
                                                        f"{prefix}num_warps": warps,
                                                        f"{prefix}num_stages": stages})  # fmt: skip
                        trials[(bn, warps, stages)] = us = time_cfg(c)
                        print(
                            f"T={t} {prefix or 'gate_up_'}bn={bn} w={warps} st={stages}: {us:.1f}",
                            flush=True,
                        )
            bn, warps, stages = min(trials, key=trials.get)
            cfg = dataclasses.replace(cfg, **{f"{prefix}block_n": bn, f"{prefix}num_warps": warps,
                                              f"{prefix}num_stages": stages})  # fmt: skip
        best[t] = cfg
        print(f"T={t} best {cfg}: {time_cfg(cfg):.1f} us (roofline {roof:.1f})", flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--tune", action="store_true", help="sweep the decode configs instead")
    args = parser.parse_args()
    if args.tune:
        tune_fused_moe(torch.device("cuda"))
        return
    rows = bench_fused_moe(torch.device("cuda"))
    print(
        f"{'op':16} {'shape':46} {'kernel':>9} {'generic':>9} {'roof':>8} {'%roof':>6} {'err':>8}"
    )
    for r in rows:
        print(f"{r['op']:16} {r['shape']:46} {r['kernel_us']:9.1f} {r['generic_us']:9.1f} "
              f"{r['roofline_us']:8.1f} {r['pct_of_roofline']:6.1f} {r['max_rel_err']:8.2e}"
              + (f" baseline {r['baseline_us']:.1f}" if "baseline_us" in r else ""))  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
