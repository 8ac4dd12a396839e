"""Decode attention in a CUDA graph, us per call, with whatever chitu is on sys.path.

Ran as .gpu_debug/attn_ab.py LABEL on an H200 (decode-attn-split-range-h200-2026-11-26.txt).
"""

import sys

import torch
from chitu_nvidia.attention import mla_decode, paged_attention_decode

LABEL = sys.argv[1]
torch.manual_seed(0)
dev = "cuda"
WIDTH = 8192 // 16  # table width of a graph captured for max_model_len 8192, block 16


def graph_us(fn, n=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / (10 * n)


def tables(b, ctx):
    need = -(-ctx // 16)
    t = torch.zeros(b, WIDTH, dtype=torch.int32, device=dev)
    t[:, :need] = torch.arange(b * need, device=dev, dtype=torch.int32).view(b, need)
    return t, torch.full((b,), ctx, dtype=torch.int32, device=dev), b * need + 1


for b, hkv, ctx in [
    (1, 8, 160),
    (32, 8, 160),
    (32, 4, 160),
    (64, 4, 160),
    (1, 8, 2000),
    (32, 4, 2000),
    (64, 8, 1000),
]:
    t, lens, nb = tables(b, ctx)
    k = torch.randn(nb, 16, hkv, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(b, hkv * 4, 128, device=dev, dtype=torch.bfloat16)
    us = graph_us(lambda q=q, k=k, v=v, t=t, n=lens: paged_attention_decode(q, k, v, t, n, 0.088))
    print(f"{LABEL} gqa B={b:3d} Hkv={hkv} G=4 ctx={ctx:5d}: {us:7.1f} us", flush=True)
for b, h, ctx in [(1, 16, 160), (32, 16, 160), (32, 64, 160), (1, 16, 2000), (32, 16, 2000)]:
    t, lens, nb = tables(b, ctx)
    cache = torch.randn(nb, 16, 1, 576, device=dev, dtype=torch.bfloat16)
    ql = torch.randn(b, h, 512, device=dev, dtype=torch.bfloat16)
    qr = torch.randn(b, h, 64, device=dev, dtype=torch.bfloat16)
    us = graph_us(lambda a=ql, r=qr, c=cache, t=t, n=lens: mla_decode(a, r, c, t, n, 0.07))
    print(f"{LABEL} mla B={b:3d} H={h} ctx={ctx:5d}: {us:7.1f} us", flush=True)
