"""Prefill attention: the Triton paged kernel vs the generic torch op, torch SDPA and the roofline.

``bench_prefill_attention(device)`` returns one row per case (``bench_ops.py`` calls
it); run alone it prints them, and ``--sweep`` times a few configs per case:

    PYTHONPATH=. python benchmarks/prefill_bench.py [--sweep]

Cases: Llama-3-8B heads (Hq 32, Hkv 8, D 128) with 4 sequences of 1024 new tokens
and no prefix, then 4 x 512 new tokens after a 3584-token cached prefix; DeepSeek-V3
MLA (128 heads, R 512 + P 64) with one 2048-token sequence. bf16, block size 16,
blocks in a random order. Times are medians of CUDA-event timings after warm-up.
``roofline_us`` is the causal FLOPs over the dense bf16 peak (989 TFLOP/s, H100 and
H200 SXM); ``sdpa_us`` (no-prefix case) is torch SDPA's flash backend on contiguous
K/V, the speed to aim for; ``max_rel_err`` is ``max |out - ref| / max |ref|`` against
the generic op (fp32 softmax). MLA runs ``MLA_CONFIG_SM90`` on Hopper (it needs
221 KB of shared memory), the portable default elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import torch.nn.functional as F

from chitu_core.kernels.paged_prefill import (
    DEFAULT_CONFIG,
    DEFAULT_MLA_CONFIG,
    MLA_CONFIG_SM90,
    PrefillConfig,
    mla_prefill,
    paged_attention_prefill,
)
from chitu_core.ops import attention as generic

BF16_FLOPS_PER_S = 989e12  # H100/H200 SXM dense bf16 peak
BLOCK_SIZE = 16
LLAMA_HEADS, LLAMA_KV_HEADS, LLAMA_HEAD_DIM = 32, 8, 128
MLA_HEADS, MLA_RANK, MLA_ROPE = 128, 512, 64


def time_us(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median time of ``fn()`` in microseconds, from CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def paged_inputs(seqs, num_kv_heads, head_dim, value_dim, dtype, device, seed=0):
    """Random caches holding ``seqs`` = [(q_len, context_len)] in shuffled blocks.

    Returns (key_cache, value_cache or None, block_tables, cu_seqlens_q, context_lens).
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // BLOCK_SIZE) for _, ctx in seqs]
    num_blocks = sum(blocks_per_seq) + 1
    order = torch.randperm(num_blocks, generator=gen)
    key_cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
    value_cache = None
    if value_dim:
        value_cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, value_dim, generator=gen)
        value_cache = value_cache.to(device, dtype)
    tables = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = order[used : used + n].int()
        used += n
    q_lens = torch.tensor([0] + [q for q, _ in seqs])
    cu_seqlens = q_lens.cumsum(0).to(torch.int32)
    context_lens = torch.tensor([ctx for _, ctx in seqs], dtype=torch.int32)
    return (key_cache.to(device, dtype), value_cache, tables.to(device),
            cu_seqlens.to(device), context_lens.to(device))  # fmt: skip


def causal_flops(seqs, num_heads: int, qk_dim: int, v_dim: int) -> float:
    """2 * Hq * (qk_dim + v_dim) multiply-adds per visible (query, key) pair."""
    pairs = sum(q * ctx - q * (q - 1) // 2 for q, ctx in seqs)  # query i sees ctx - q + i + 1
    return 2.0 * num_heads * (qk_dim + v_dim) * pairs


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _row(op, shape, kernel_fn, generic_fn, flops, config, time_generic=True) -> dict:
    out, ref = kernel_fn(), generic_fn()
    return {
        "op": op,
        "shape": shape,
        "kernel_us": time_us(kernel_fn),
        "generic_us": time_us(generic_fn, warmup=1, reps=3) if time_generic else None,
        "roofline_us": flops / BF16_FLOPS_PER_S * 1e6,
        "max_rel_err": rel_err(out, ref),
        "sdpa_us": None,
        "config": dataclasses.asdict(config),
    }


def sdpa_us(seqs, device, dtype=torch.bfloat16) -> float:
    """torch SDPA (flash backend, causal) on contiguous [B, H, S, D] q/k/v, equal lengths."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, seq_len = len(seqs), seqs[0][0]
    q = torch.randn(batch, LLAMA_HEADS, seq_len, LLAMA_HEAD_DIM, device=device, dtype=dtype)
    k = torch.randn(batch, LLAMA_KV_HEADS, seq_len, LLAMA_HEAD_DIM, device=device, dtype=dtype)
    v = torch.randn_like(k)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            return time_us(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            )
        except RuntimeError:  # a flash build without GQA: same FLOPs with repeated K/V
            group = LLAMA_HEADS // LLAMA_KV_HEADS
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            return time_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))


def bench_gqa(device, seqs, label, config=DEFAULT_CONFIG, time_generic=True) -> dict:
    dtype = torch.bfloat16
    kc, vc, tables, cu, ctx = paged_inputs(seqs, LLAMA_KV_HEADS, LLAMA_HEAD_DIM,
                                           LLAMA_HEAD_DIM, dtype, device)  # fmt: skip
    num_tokens = sum(q for q, _ in seqs)
    q = torch.randn(num_tokens, LLAMA_HEADS, LLAMA_HEAD_DIM, device=device, dtype=dtype)
    scale = LLAMA_HEAD_DIM**-0.5
    max_q_len = max(q for q, _ in seqs)
    return _row(
        "paged_attention_prefill",
        f"llama8b Hq{LLAMA_HEADS}/Hkv{LLAMA_KV_HEADS} d{LLAMA_HEAD_DIM} {label}",
        lambda: paged_attention_prefill(q, kc, vc, tables, cu, ctx, scale, max_q_len, config),
        lambda: generic.paged_attention_prefill(q, kc, vc, tables, cu, ctx, scale),
        causal_flops(seqs, LLAMA_HEADS, LLAMA_HEAD_DIM, LLAMA_HEAD_DIM),
        config,
        time_generic,
    )


def bench_mla(device, seqs, label, config=DEFAULT_MLA_CONFIG, time_generic=True) -> dict:
    dtype = torch.bfloat16
    cache, _, tables, cu, ctx = paged_inputs(seqs, 1, MLA_RANK + MLA_ROPE, 0, dtype, device)
    num_tokens = sum(q for q, _ in seqs)
    q_latent = torch.randn(num_tokens, MLA_HEADS, MLA_RANK, device=device, dtype=dtype)
    q_rope = torch.randn(num_tokens, MLA_HEADS, MLA_ROPE, device=device, dtype=dtype)
    scale = 192**-0.5  # DeepSeek-V3: (qk_nope + qk_rope) ** -0.5
    return _row(
        "mla_prefill",
        f"deepseek-v3 MLA Hq{MLA_HEADS} {MLA_RANK}+{MLA_ROPE} {label}",
        lambda: mla_prefill(q_latent, q_rope, cache, tables, cu, ctx, scale, None, config),
        lambda: generic.mla_prefill(q_latent, q_rope, cache, tables, cu, ctx, scale),
        causal_flops(seqs, MLA_HEADS, MLA_RANK + MLA_ROPE, MLA_RANK),
        config,
        time_generic,
    )


NO_PREFIX = [(1024, 1024)] * 4
WITH_PREFIX = [(512, 4096)] * 4
MLA_SEQS = [(2048, 2048)]


def bench_prefill_attention(device) -> list[dict]:
    """Rows {op, shape, kernel_us, generic_us, roofline_us, max_rel_err, sdpa_us, config}."""
    device = torch.device(device)
    is_hopper = torch.cuda.get_device_capability(device) >= (9, 0)
    mla_config = MLA_CONFIG_SM90 if is_hopper else DEFAULT_MLA_CONFIG
    rows = [bench_gqa(device, NO_PREFIX, "4x1024 new"),
            bench_gqa(device, WITH_PREFIX, "4x512 new after 3584 cached"),
            bench_mla(device, MLA_SEQS, "1x2048 new", mla_config)]  # fmt: skip
    rows[0]["sdpa_us"] = sdpa_us(NO_PREFIX, device)
    return rows


SWEEP_GQA = [PrefillConfig(block_m=bm, block_n=bn, pack_heads=ph, num_warps=w, num_stages=st)
             for bm, bn, ph, w, st in [(64, 64, 1, 4, 3), (64, 128, 1, 4, 3), (64, 32, 1, 4, 4),
                                       (128, 128, 1, 8, 3), (128, 64, 1, 4, 3), (64, 64, 2, 4, 4),
                                       (32, 64, 1, 4, 3)]]  # fmt: skip
SWEEP_MLA = [PrefillConfig(block_m=bm, block_n=bn, pack_heads=ph, num_warps=w, num_stages=st)
             for bm, bn, ph, w, st in [(64, 64, 16, 8, 2), (64, 64, 64, 8, 2), (64, 64, 8, 8, 2),
                                       (64, 64, 16, 8, 3), (64, 64, 16, 4, 2), (64, 128, 16, 8, 2),
                                       (128, 64, 16, 8, 2), (64, 64, 32, 8, 1), (32, 128, 16, 4, 2),
                                       (64, 32, 16, 4, 2)]]  # fmt: skip


def sweep(device) -> None:
    """Time each candidate config per case (prints; used to pick the defaults)."""
    for seqs, label in ((NO_PREFIX, "no prefix"), (WITH_PREFIX, "prefix")):
        for cfg in SWEEP_GQA:
            try:
                row = bench_gqa(device, seqs, label, cfg, time_generic=False)
                print(f"gqa {label}: {row['kernel_us']:.0f} us err {row['max_rel_err']:.1e} {cfg}")
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                print(f"gqa {label}: {type(e).__name__} {cfg}")
    for cfg in SWEEP_MLA:
        try:
            row = bench_mla(device, MLA_SEQS, "", cfg, time_generic=False)
            print(f"mla: {row['kernel_us']:.0f} us err {row['max_rel_err']:.1e} {cfg}")
        except Exception as e:  # noqa: BLE001
            print(f"mla: {type(e).__name__} {cfg}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    if args.sweep:
        sweep("cuda")
    for row in bench_prefill_attention("cuda"):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
