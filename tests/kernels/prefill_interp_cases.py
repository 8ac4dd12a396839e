"""Numerics of the paged prefill attention kernel, run under TRITON_INTERPRET=1.

Not collected by pytest (no ``test_`` prefix): ``test_prefill_kernels.py`` runs each
``case_*`` in a fresh subprocess with the interpreter switched on before triton is
imported. Also usable on a GPU (``python tests/kernels/prefill_interp_cases.py
--device cuda``). The reference is ``chitu_cpu_ref`` (fp64, one sequence at a time).
"""

from __future__ import annotations

import sys

import torch
from chitu_cpu_ref.attention import chitu_mla_prefill as ref_mla_prefill
from chitu_cpu_ref.attention import chitu_paged_attention_prefill as ref_prefill

import chitu_core.kernels.paged_prefill as pp
from chitu_core.kernels.paged_prefill import PrefillConfig, mla_prefill, paged_attention_prefill

DEVICE = "cpu"
GARBAGE = (1 << 30, -1)  # table entries past a context's end: out of range either way

# (q_len, context_len) per sequence: a single token, a whole prompt, empty sequences in
# the middle, cached prefixes (chunked prefill), lengths off and on tile boundaries.
MIXED = [(1, 1), (5, 5), (0, 0), (3, 20), (17, 40), (0, 9), (33, 33), (1, 12), (16, 32)]


def paged_batch(seqs, num_kv_heads, head_dim, value_dim, block_size, dtype, seed=0):
    """Caches holding ``seqs`` in shuffled blocks, tables padded with garbage.

    Returns (key_cache, value_cache or None, block_tables, cu_seqlens_q, context_lens)
    on the CPU; callers move them.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = sum(blocks) + 2  # spare blocks nobody owns
    order = torch.randperm(num_blocks, generator=gen)
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    value_cache = None
    if value_dim:
        value_cache = torch.randn(num_blocks, block_size, num_kv_heads, value_dim, generator=gen)
        value_cache = value_cache.to(dtype)
    tables = torch.empty(len(seqs), max(blocks) + 2, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        tables[b] = GARBAGE[b % 2]
        tables[b, :n] = order[used : used + n].int()
        used += n
    q_lens = torch.tensor([0] + [q for q, _ in seqs])
    cu_seqlens = q_lens.cumsum(0).to(torch.int32)
    context_lens = torch.tensor([ctx for _, ctx in seqs], dtype=torch.int32)
    return key_cache.to(dtype), value_cache, tables, cu_seqlens, context_lens


def assert_close(out, ref, tol: float, what: str) -> None:
    """max |out - ref| <= tol * max |ref| (ref fp64), no NaN."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not out.isnan().any(), f"{what}: NaN in the output"
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def _to(*tensors):
    return [t.to(DEVICE) for t in tensors]


def run_gqa(num_heads, num_kv_heads, head_dim, value_dim, block_size, config, dtype, seqs=MIXED,
            strided_q=False) -> None:  # fmt: skip
    kc, vc, tables, cu, ctx = paged_batch(seqs, num_kv_heads, head_dim, value_dim,
                                          block_size, dtype)  # fmt: skip
    num_tokens = int(cu[-1])
    gen = torch.Generator().manual_seed(1)
    if strided_q:  # a slice of a fused qkv projection: q rows are not contiguous
        qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen)
        q = qkv.to(dtype)[:, :num_heads]
    else:
        q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    ref = ref_prefill(q.double(), kc.double(), vc.double(), tables, cu, ctx, scale)
    q_d, kc_d, vc_d, tables_d, cu_d, ctx_d = _to(q, kc, vc, tables, cu, ctx)
    out = paged_attention_prefill(q_d, kc_d, vc_d, tables_d, cu_d, ctx_d, scale, config=config)
    assert out.dtype == dtype
    # fp32: exact fp32 dots (~1e-6); bf16: p and the output rounded to bf16 (2^-8 each).
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    what = f"Hq={num_heads} Hkv={num_kv_heads} D={head_dim}/{value_dim} bs={block_size} {config}"
    assert_close(out, ref, tol, what)


def case_gqa_fp32() -> None:
    """Group sizes 1 and 4 (heads packed or not), block sizes 1/4/16, head dims that
    are not powers of two, Dv != D, and q as a strided slice of a fused qkv tensor."""
    c = PrefillConfig
    run_gqa(2, 2, 32, 32, 4, c(block_m=16, block_n=16), torch.float32)
    run_gqa(4, 1, 16, 16, 1, c(block_m=16, block_n=16, pack_heads=4), torch.float32)
    run_gqa(8, 2, 24, 40, 16, c(block_m=16, block_n=32, pack_heads=2), torch.float32,
            strided_q=True)  # fmt: skip


def case_gqa_bf16() -> None:
    """bf16 caches and queries (the production dtype)."""
    run_gqa(4, 1, 64, 64, 16, PrefillConfig(block_m=32, block_n=16, pack_heads=4),
            torch.bfloat16)  # fmt: skip


def case_long_prefix() -> None:
    """Chunked prefill after a long cached prefix: many unmasked key tiles, then the
    diagonal, and q tiles that start mid-tile of keys."""
    seqs = [(40, 300), (7, 129), (0, 5), (64, 64)]
    run_gqa(4, 2, 32, 32, 16, PrefillConfig(block_m=32, block_n=32, pack_heads=2),
            torch.float32, seqs)  # fmt: skip


def case_empty() -> None:
    """T == 0 (all sequences empty, and no sequences) returns empty without a launch."""
    real_kernel = pp.paged_prefill_kernel

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f"launched with grid {grid} for an empty batch")

    pp.paged_prefill_kernel = NoLaunch()
    try:
        for seqs in ([(0, 3), (0, 0)], []):
            kc, vc, _, _, ctx = paged_batch([(0, 4)], 2, 16, 8, 4, torch.float32)
            tables = torch.zeros(len(seqs), 2, dtype=torch.int32)
            cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
            ctx = torch.tensor([c for _, c in seqs], dtype=torch.int32)
            q = torch.empty(0, 4, 16)
            args = _to(kc, vc, tables, cu, ctx)
            out = paged_attention_prefill(q.to(DEVICE), *args, 0.25)
            assert out.shape == (0, 4, 8), out.shape
            out = mla_prefill(q.to(DEVICE), torch.empty(0, 4, 4, device=DEVICE),
                              torch.zeros(3, 4, 1, 20, device=DEVICE), *args[2:], 0.25)  # fmt: skip
            assert out.shape == (0, 4, 16), out.shape
    finally:
        pp.paged_prefill_kernel = real_kernel


def run_mla(num_heads, rank, rope_dim, block_size, config, dtype, seqs=MIXED) -> None:
    cache, _, tables, cu, ctx = paged_batch(seqs, 1, rank + rope_dim, 0, block_size, dtype)
    num_tokens = int(cu[-1])
    gen = torch.Generator().manual_seed(2)
    q_latent = torch.randn(num_tokens, num_heads, rank, generator=gen).to(dtype)
    q_rope = torch.randn(num_tokens, num_heads, rope_dim, generator=gen).to(dtype)
    scale = 0.1
    ref = ref_mla_prefill(q_latent.double(), q_rope.double(), cache.double(), tables, cu, ctx,
                          scale).double()  # fmt: skip
    args = _to(q_latent, q_rope, cache, tables, cu, ctx)
    out = mla_prefill(*args, scale, config=config)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(out, ref, tol, f"MLA Hq={num_heads} {rank}+{rope_dim} bs={block_size} {config}")


def case_mla_small() -> None:
    """Absorbed MLA with a small latent (64 + 16): heads packed or not, fp32 and bf16."""
    c = PrefillConfig
    run_mla(4, 64, 16, 4, c(block_m=16, block_n=16, pack_heads=4), torch.float32)
    run_mla(2, 64, 16, 16, c(block_m=16, block_n=32, pack_heads=1), torch.float32)
    run_mla(4, 64, 16, 1, c(block_m=32, block_n=16, pack_heads=4), torch.bfloat16)


def case_mla_real_dims() -> None:
    """DeepSeek-V3's 512 + 64 latent, few heads and tokens (the interpreter is slow)."""
    seqs = [(3, 3), (0, 0), (5, 21)]
    run_mla(4, 512, 64, 16, PrefillConfig(block_m=16, block_n=16, pack_heads=4),
            torch.float32, seqs)  # fmt: skip


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--device"]:
        DEVICE, args = args[1], args[2:]
    for name in args or list(CASES):
        CASES[name]()
        print(f"ok {name} (device={DEVICE})")
