"""Paged decode attention: the Triton kernels vs the generic torch ops and the HBM roofline.

``bench_decode_attention(device)`` returns one row per shape::

    {"op", "shape", "kernel_us", "generic_us", "roofline_us", "max_rel_err",
     "pct_roofline", "mma_bound_us"}

``roofline_us`` is the KV (MLA: latent) bytes every step must read divided by the
HBM bandwidth (H200 4.8e12 B/s, H100 3.35e12 B/s, from the device name unless
given). ``mma_bound_us`` is the time the step's FLOPs take at the dense bf16 peak
(989 TFLOP/s): MLA with 128 heads does about 240 FLOP per latent byte, above the
H200's ridge point, so there it is the tighter bound. Times are medians of CUDA-event timings after warm-up, each run preceded
by an L2 flush so small caches are read from HBM too. ``max_rel_err`` is
``max|out - ref| / max|ref|`` against the generic op on fp32 copies of the inputs.

Standalone: ``PYTHONPATH=. python benchmarks/attn_bench.py [--sweep]`` prints the
rows (and with ``--sweep`` the time of each config of ``SWEEP`` on the batch-64
shapes, for the plugins' per-arch tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Callable

import torch

from chitu_core.kernels.attn_reduce import DecodeAttnConfig
from chitu_core.kernels.mla_decode import MLA_DECODE_CONFIG, mla_decode
from chitu_core.kernels.paged_decode import GQA_DECODE_CONFIG, paged_attention_decode
from chitu_core.ops import attention as generic

BLOCK_SIZE = 16
BF16_FLOPS_PER_S = 989e12  # H100/H200 SXM dense bf16 peak
SHAPES = [(64, 4096), (1, 4096), (32, 1024)]  # (batch, context)
GQA = dict(num_heads=32, num_kv_heads=8, head_dim=128)  # Llama-3-8B
MLA = dict(num_heads=128, rank=512, rope_dim=64)  # DeepSeek-V3, no TP

_C = DecodeAttnConfig
SWEEP = {
    "gqa": [_C(block_h=16, block_n=bn, num_warps=w, num_stages=s, target_ctas_per_sm=t)
            for bn, w, s, t in [(64, 4, 3, 16), (64, 4, 4, 16), (64, 4, 3, 4), (64, 4, 4, 4),
                                (64, 4, 4, 8), (128, 4, 3, 4), (128, 8, 3, 8), (32, 4, 4, 8)]],
    "mla": [_C(block_h=bh, block_n=bn, num_warps=w, num_stages=s, target_ctas_per_sm=t,
               max_splits=32)
            for bh, bn, w, s, t in [(64, 32, 8, 3, 1), (64, 64, 8, 2, 1), (64, 64, 16, 2, 1),
                                    (64, 32, 16, 3, 1), (64, 64, 8, 2, 2), (32, 64, 4, 2, 2),
                                    (64, 128, 16, 1, 1), (64, 64, 4, 2, 1)]],
}  # fmt: skip


def device_hbm_bytes_per_s(device: torch.device) -> float:
    """Spec HBM bandwidth from the device name (H200 4.8 TB/s, else H100's 3.35 TB/s)."""
    name = torch.cuda.get_device_name(device)
    return 4.8e12 if "H200" in name else 3.35e12


def time_us(fn: Callable[[], object], flush: torch.Tensor, runs: int = 15) -> float:
    """Median of ``runs`` CUDA-event timings of ``fn`` replayed from a CUDA graph (no
    host launch overhead, as in the engine's decode step), L2 flushed before each."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(runs):
        flush.zero_()  # the GPU is busy with this while the replay is queued
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    del graph
    return statistics.median(times)


def _tables(batch: int, ctx: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Shuffled block tables (a fragmented cache) and uniform context lengths."""
    blocks_per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    tables = torch.randperm(num_blocks, device=device).int().view(batch, blocks_per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return tables, lens, num_blocks


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def _gqa_problem(batch, ctx, device):
    tables, lens, num_blocks = _tables(batch, ctx, device)
    h, hkv, d = GQA["num_heads"], GQA["num_kv_heads"], GQA["head_dim"]
    k = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, h, d, device=device, dtype=torch.bfloat16)
    return q, k, v, tables, lens


def _mla_problem(batch, ctx, device):
    tables, lens, num_blocks = _tables(batch, ctx, device)
    h, r, p = MLA["num_heads"], MLA["rank"], MLA["rope_dim"]
    cache = torch.randn(num_blocks, BLOCK_SIZE, 1, r + p, device=device, dtype=torch.bfloat16)
    q_latent = torch.randn(batch, h, r, device=device, dtype=torch.bfloat16) * 0.1
    q_rope = torch.randn(batch, h, p, device=device, dtype=torch.bfloat16)
    return q_latent, q_rope, cache, tables, lens


def _gqa_row(batch, ctx, device, cfg, bw, flush, with_generic=True) -> dict:
    q, k, v, tables, lens = _gqa_problem(batch, ctx, device)
    scale = GQA["head_dim"] ** -0.5
    out = paged_attention_decode(q, k, v, tables, lens, scale, config=cfg)
    ref = generic.paged_attention_decode(q.float(), k.float(), v.float(), tables, lens, scale)
    kv_bytes = batch * ctx * GQA["num_kv_heads"] * GQA["head_dim"] * 2 * k.element_size()
    row = {
        "op": "paged_attention_decode",
        "shape": f"B={batch} ctx={ctx} Hq={GQA['num_heads']} Hkv={GQA['num_kv_heads']} "
        f"D={GQA['head_dim']} bf16 block_size={BLOCK_SIZE}",
        "kernel_us": time_us(
            lambda: paged_attention_decode(q, k, v, tables, lens, scale, config=cfg), flush
        ),
        "generic_us": time_us(
            lambda: generic.paged_attention_decode(q, k, v, tables, lens, scale), flush, 5
        )
        if with_generic
        else None,
        "roofline_us": kv_bytes / bw * 1e6,
        "mma_bound_us": 2
        * batch
        * ctx
        * GQA["num_heads"]
        * 2
        * GQA["head_dim"]
        / BF16_FLOPS_PER_S
        * 1e6,
        "max_rel_err": _rel_err(out, ref),
    }
    del ref
    return row


def _mla_row(batch, ctx, device, cfg, bw, flush, with_generic=True) -> dict:
    ql, qr, cache, tables, lens = _mla_problem(batch, ctx, device)
    scale = 192**-0.5
    out = mla_decode(ql, qr, cache, tables, lens, scale, config=cfg)
    ref = generic.mla_decode(ql.float(), qr.float(), cache.float(), tables, lens, scale)
    latent_bytes = batch * ctx * (MLA["rank"] + MLA["rope_dim"]) * cache.element_size()
    row = {
        "op": "mla_decode",
        "shape": f"B={batch} ctx={ctx} H={MLA['num_heads']} R={MLA['rank']} P={MLA['rope_dim']} "
        f"bf16 block_size={BLOCK_SIZE}",
        "kernel_us": time_us(
            lambda: mla_decode(ql, qr, cache, tables, lens, scale, config=cfg), flush
        ),
        "generic_us": time_us(
            lambda: generic.mla_decode(ql, qr, cache, tables, lens, scale), flush, 5
        )
        if with_generic
        else None,  # fmt: skip
        "roofline_us": latent_bytes / bw * 1e6,
        "mma_bound_us": 2
        * batch
        * ctx
        * MLA["num_heads"]
        * (2 * MLA["rank"] + MLA["rope_dim"])
        / BF16_FLOPS_PER_S
        * 1e6,
        "max_rel_err": _rel_err(out, ref),
    }
    del ref
    return row


def bench_decode_attention(
    device: torch.device | str = "cuda",
    hbm_bytes_per_s: float | None = None,
    gqa_config: DecodeAttnConfig = GQA_DECODE_CONFIG,
    mla_config: DecodeAttnConfig = MLA_DECODE_CONFIG,
) -> list[dict]:
    """Rows for GQA (32/8 heads, d 128) and MLA (128 heads, 512 + 64) decode at
    (batch, ctx) in ``SHAPES``, bf16, block size 16. See the module docstring."""
    device = torch.device(device)
    bw = hbm_bytes_per_s or device_hbm_bytes_per_s(device)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)  # > L2
    rows = []
    for batch, ctx in SHAPES:
        rows.append(_gqa_row(batch, ctx, device, gqa_config, bw, flush))
        torch.cuda.empty_cache()
    for batch, ctx in SHAPES:
        rows.append(_mla_row(batch, ctx, device, mla_config, bw, flush))
        torch.cuda.empty_cache()
    for row in rows:
        row["pct_roofline"] = 100 * row["roofline_us"] / row["kernel_us"]
    return rows


def sweep(device: torch.device | str = "cuda") -> list[dict]:
    """Time every ``SWEEP`` config on the batch-64 and batch-32 shapes (no generic op)."""
    device = torch.device(device)
    bw = device_hbm_bytes_per_s(device)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    out = []
    for op, cfgs in SWEEP.items():
        make = _gqa_row if op == "gqa" else _mla_row
        for cfg in cfgs:
            for batch, ctx in SHAPES:
                try:
                    row = make(batch, ctx, device, cfg, bw, flush, with_generic=False)
                    us, err = row["kernel_us"], row["max_rel_err"]
                    pct = 100 * row["roofline_us"] / us
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    us, err, pct = float("inf"), None, 0.0
                    print(f"  {op} {cfg}: {type(e).__name__}: {str(e)[:120]}")
                rec = {"op": op, "batch": batch, "ctx": ctx, "us": us, "pct_roofline": pct,
                       "err": err, "config": dataclasses.asdict(cfg)}  # fmt: skip
                print(json.dumps(rec), flush=True)
                out.append(rec)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    for r in bench_decode_attention():
        print(json.dumps(r), flush=True)
    if args.sweep:
        sweep()
