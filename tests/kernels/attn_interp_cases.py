"""Numerics of the paged decode attention kernels, run under TRITON_INTERPRET=1.

Not collected by pytest (no ``test_`` prefix): ``test_attention_kernels.py`` runs
each ``case_*`` in a fresh subprocess with the interpreter switched on before
triton is imported. Also usable on a GPU (``python
tests/kernels/attn_interp_cases.py --device cuda``).

Every cache is filled with NaN except the slots a sequence owns, and table
entries past a sequence's end hold garbage (huge, negative, one past the
cache), so a kernel that reads a position it should mask, or dereferences an
ignored table entry, fails loudly. The oracle is the reference backend
(``chitu_cpu_ref``, fp64) on the same (rounded) inputs.
"""

from __future__ import annotations

import sys

import torch
from chitu_cpu_ref.attention import chitu_mla_decode as ref_mla_decode
from chitu_cpu_ref.attention import chitu_paged_attention_decode as ref_decode

from chitu_core.kernels.attn_reduce import DecodeAttnConfig
from chitu_core.kernels.mla_decode import mla_decode
from chitu_core.kernels.paged_decode import paged_attention_decode

DEVICE = "cpu"
GARBAGE = (2**31 - 1, -(2**31), -1, 1 << 20)

# Small tiles so that short contexts still span several tiles and splits.
SMALL = DecodeAttnConfig(block_h=16, block_n=16, min_tokens_per_split=16, max_splits=8)


def make_tables(ctx_lens: list[int], block_size: int, extra_blocks: int = 2):
    """Permuted block tables with garbage past each sequence's end.

    Returns ``(block_tables [B, max_blocks] int32, context_lens [B] int32, num_blocks,
    owned)`` where ``owned`` lists ``(block, offset_limit)`` pairs of filled slots.
    """
    needed = [-(-n // block_size) for n in ctx_lens]
    max_blocks = max(needed, default=0) + extra_blocks
    num_blocks = sum(needed) + 3  # a few blocks nobody owns
    perm = torch.randperm(num_blocks)
    tables = torch.empty(len(ctx_lens), max_blocks, dtype=torch.int64)
    owned, used = [], 0
    for b, (n, k) in enumerate(zip(ctx_lens, needed, strict=True)):
        tables[b, :k] = perm[used : used + k]
        for i in range(k):
            owned.append((int(perm[used + i]), min(block_size, n - i * block_size)))
        used += k
        for j in range(k, max_blocks):
            tables[b, j] = GARBAGE[(b + j) % len(GARBAGE)]
    lens = torch.tensor(ctx_lens, dtype=torch.int32)
    return tables.to(torch.int32), lens, num_blocks, owned


def nan_cache(num_blocks, block_size, heads, dim, owned, dtype) -> torch.Tensor:
    """``[num_blocks, block_size, heads, dim]``: random values in owned slots, NaN elsewhere."""
    cache = torch.full((num_blocks, block_size, heads, dim), float("nan"))
    for block, limit in owned:
        cache[block, :limit] = torch.randn(limit, heads, dim)
    return cache.to(dtype)


def assert_close(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, dtype, what: str):
    """|out - ref| <= eps * (|ref| + mag): ``mag`` is the attention output over |v|,
    which bounds the effect of rounding each probability (bf16 before the P@V MMA)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out = out.double().cpu()
    eps = {torch.float32: 2e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}[dtype]
    tol = eps * (ref.abs() + mag) + 1e-6
    err = (out - ref).abs()
    assert not out.isnan().any(), f"{what}: NaN in output"
    assert bool((err <= tol).all()), f"{what}: max err/tol {(err / tol).max().item():.3g}"


def check_gqa(ctx_lens, block_size, num_kv_heads, group, head_dim, dtype, *,
              head_dim_v=None, splits=(None, 1, 3), config=SMALL) -> None:  # fmt: skip
    """Kernel vs fp64 reference for several split counts on one random problem."""
    head_dim_v = head_dim_v or head_dim
    tables, lens, num_blocks, owned = make_tables(ctx_lens, block_size)
    k = nan_cache(num_blocks, block_size, num_kv_heads, head_dim, owned, dtype)
    v = nan_cache(num_blocks, block_size, num_kv_heads, head_dim_v, owned, dtype)
    q = torch.randn(len(ctx_lens), num_kv_heads * group, head_dim).to(dtype)
    scale = head_dim**-0.5
    ref = ref_decode(q.double(), k, v, tables, lens, scale)
    mag = ref_decode(q.double(), k, v.abs(), tables, lens, scale)
    for num_splits in splits:
        out = paged_attention_decode(
            q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), tables.to(DEVICE), lens.to(DEVICE), scale,
            num_splits=num_splits, config=config, num_sms=4,
        )  # fmt: skip
        assert out.dtype == dtype
        what = (f"gqa lens={ctx_lens} bs={block_size} kv={num_kv_heads} G={group} "
                f"D={head_dim}/{head_dim_v} {dtype} splits={num_splits}")  # fmt: skip
        assert_close(out, ref, mag, dtype, what)


def check_mla(ctx_lens, block_size, num_heads, rank, rope_dim, dtype, *,
              splits=(None, 1, 3), config=SMALL, extra_blocks=2) -> None:  # fmt: skip
    tables, lens, num_blocks, owned = make_tables(ctx_lens, block_size, extra_blocks)
    cache = nan_cache(num_blocks, block_size, 1, rank + rope_dim, owned, torch.float32)
    cache[..., :rank] *= 0.5  # latents and rope keys of different scales
    cache = cache.to(dtype)
    q_latent = (torch.randn(len(ctx_lens), num_heads, rank) * 0.2).to(dtype)
    q_rope = torch.randn(len(ctx_lens), num_heads, rope_dim).to(dtype)
    scale = (128 + rope_dim) ** -0.5
    ref = ref_mla_decode(q_latent.double(), q_rope.double(), cache, tables, lens, scale)
    # softmax(scores) @ |c|: MLA as one-kv-head attention, key [c, k_pe], value |c|.
    q = torch.cat([q_latent.double(), q_rope.double()], dim=-1)
    mag = ref_decode(q, cache, cache[..., :rank].abs(), tables, lens, scale)
    for num_splits in splits:
        out = mla_decode(
            q_latent.to(DEVICE), q_rope.to(DEVICE), cache.to(DEVICE), tables.to(DEVICE),
            lens.to(DEVICE), scale, num_splits=num_splits, config=config, num_sms=4,
        )  # fmt: skip
        assert out.dtype == dtype
        what = (f"mla lens={ctx_lens} bs={block_size} H={num_heads} R={rank} P={rope_dim} "
                f"{dtype} splits={num_splits}")  # fmt: skip
        assert_close(out, ref, mag, dtype, what)


def case_gqa_fp32() -> None:
    """Groups 1/4/8, block sizes 1/16/64, lengths 1, non-multiples, several splits."""
    torch.manual_seed(0)
    check_gqa([1, 37, 150, 64], 16, 2, 4, 64, torch.float32)
    check_gqa([5, 90, 1], 1, 3, 1, 32, torch.float32, splits=(None, 4))
    check_gqa([200, 1, 129], 64, 1, 8, 64, torch.float32, splits=(None, 2, 8))


def case_gqa_bf16() -> None:
    torch.manual_seed(1)
    check_gqa([1, 77, 160], 16, 2, 4, 128, torch.bfloat16)
    check_gqa([33, 1], 64, 2, 8, 64, torch.bfloat16, splits=(None, 2))


def case_gqa_odd_shapes() -> None:
    """Non-power-of-two head dims, Dv != D, group 6 (padded) and 32 (two group tiles)."""
    torch.manual_seed(2)
    check_gqa([41, 3], 16, 2, 6, 80, torch.float32, head_dim_v=48, splits=(None, 2))
    check_gqa([50, 17], 4, 1, 32, 32, torch.float16, splits=(1, 3))
    check_gqa([70], 256, 1, 2, 16, torch.float32, splits=(1, 2),
              config=DecodeAttnConfig(block_h=16, block_n=32, min_tokens_per_split=16))  # fmt: skip


def case_gqa_table_full_and_strided() -> None:
    """Contexts that fill the whole table width; q a strided view (head stride > D)."""
    torch.manual_seed(3)
    block_size, lens = 8, [32, 32, 9]
    tables, ctx, num_blocks, owned = make_tables(lens, block_size, extra_blocks=0)
    k = nan_cache(num_blocks, block_size, 2, 32, owned, torch.float32)
    v = nan_cache(num_blocks, block_size, 2, 32, owned, torch.float32)
    q_big = torch.randn(3, 4, 64)
    q = q_big[:, :, 16:48]  # not contiguous
    ref = ref_decode(q.double(), k, v, tables, ctx, 0.3)
    mag = ref_decode(q.double(), k, v.abs(), tables, ctx, 0.3)
    for splits in (None, 1, 4):
        out = paged_attention_decode(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), tables.to(DEVICE),
                                     ctx.to(DEVICE), 0.3, num_splits=splits, config=SMALL,
                                     num_sms=4)  # fmt: skip
        assert_close(out, ref, mag, torch.float32, f"full table splits={splits}")


def case_wide_table_short_contexts() -> None:
    """Tables far wider than the contexts, as in a decode graph captured for max_model_len:
    each sequence's own length is spread over the splits (a 1-token context, one shorter
    than a split count's worth of tiles, and one spanning many tiles), GQA and MLA."""
    torch.manual_seed(6)
    cfg = DecodeAttnConfig(block_h=16, block_n=16, min_tokens_per_split=16, max_splits=16)
    lens = [1, 20, 47, 150]
    for dtype in (torch.float32, torch.bfloat16):
        tables, ctx, num_blocks, owned = make_tables(lens, 8, extra_blocks=60)  # width 79 x 8
        k = nan_cache(num_blocks, 8, 2, 32, owned, dtype)
        v = nan_cache(num_blocks, 8, 2, 32, owned, dtype)
        q = torch.randn(len(lens), 8, 32).to(dtype)
        ref = ref_decode(q.double(), k, v, tables, ctx, 0.2)
        mag = ref_decode(q.double(), k, v.abs(), tables, ctx, 0.2)
        for splits in (None, 3, 8, 16):
            out = paged_attention_decode(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE),
                                         tables.to(DEVICE), ctx.to(DEVICE), 0.2,
                                         num_splits=splits, config=cfg, num_sms=4)  # fmt: skip
            assert_close(out, ref, mag, dtype, f"wide table {dtype} splits={splits}")
    check_mla(lens, 8, 16, 64, 16, torch.float32, splits=(None, 5, 16), config=cfg, extra_blocks=60)


def case_mla_small() -> None:
    """R = 64, P = 16; 20 heads (a partial head tile); block sizes 1/16/64."""
    torch.manual_seed(4)
    check_mla([1, 45, 130], 16, 20, 64, 16, torch.float32)
    check_mla([19, 1], 1, 16, 64, 16, torch.float32, splits=(None, 2))
    check_mla([100, 3], 64, 8, 32, 16, torch.float32, splits=(1, 4))
    check_mla([1, 61, 96], 16, 20, 64, 16, torch.bfloat16, splits=(None, 1))


def case_mla_deepseek_dims() -> None:
    """The real R = 512, P = 64 split (576-wide rows), bf16 and fp32, q_rope strided."""
    torch.manual_seed(5)
    check_mla([1, 40], 16, 16, 512, 64, torch.bfloat16, splits=(1, 2),
              config=DecodeAttnConfig(block_h=16, block_n=32, min_tokens_per_split=16))  # fmt: skip
    check_mla([33], 64, 16, 512, 64, torch.float32, splits=(None,),
              config=DecodeAttnConfig(block_h=16, block_n=32, min_tokens_per_split=16))  # fmt: skip


def case_edges() -> None:
    """Empty batch / no heads; unsupported block sizes and dtypes raise ValueError."""
    cache = torch.zeros(4, 16, 2, 32)
    tables = torch.zeros(0, 3, dtype=torch.int32)
    lens = torch.zeros(0, dtype=torch.int32)
    out = paged_attention_decode(torch.zeros(0, 4, 32), cache, cache, tables, lens, 1.0)
    assert out.shape == (0, 4, 32)
    latent = torch.zeros(4, 16, 1, 80)
    out = mla_decode(torch.zeros(0, 8, 64), torch.zeros(0, 8, 16), latent, tables, lens, 1.0)
    assert out.shape == (0, 8, 64)
    one = torch.ones(1, dtype=torch.int32)
    out = paged_attention_decode(torch.zeros(1, 0, 32), cache[:, :, :0], cache[:, :, :0],
                                 torch.zeros(1, 3, dtype=torch.int32), one, 1.0)  # fmt: skip
    assert out.shape == (1, 0, 32)
    bad = torch.zeros(4, 12, 2, 32)  # block_size 12: not a power of two
    for call in (
        lambda: paged_attention_decode(torch.zeros(1, 4, 32), bad, bad,
                                       torch.zeros(1, 3, dtype=torch.int32), one, 1.0),
        lambda: mla_decode(torch.zeros(1, 8, 64), torch.zeros(1, 8, 16), torch.zeros(4, 12, 1, 80),
                           torch.zeros(1, 3, dtype=torch.int32), one, 1.0),
        lambda: paged_attention_decode(torch.zeros(1, 4, 32, dtype=torch.bfloat16), cache, cache,
                                       torch.zeros(1, 3, dtype=torch.int32), one, 1.0),
        lambda: paged_attention_decode(torch.zeros(1, 3, 32), cache, cache,
                                       torch.zeros(1, 3, dtype=torch.int32), one, 1.0),
    ):  # fmt: skip
        try:
            call()
        except ValueError:
            continue
        raise AssertionError("expected ValueError")


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--device"]:
        DEVICE, args = args[1], args[2:]
    for name in args or list(CASES):
        CASES[name]()
        print(f"ok {name} (device={DEVICE})")
