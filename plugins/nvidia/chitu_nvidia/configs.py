"""Per-architecture launch configs of the soft-FP8 GEMM (no autotuning at serve time).

Tables are keyed by compute capability; each row gives the config for M up to
``max_m`` (some rows only for K up to ``max_k`` or N from ``min_n``: the first row that
serves a shape wins). Winners of the sweeps named in the comments, on the GPU named
there; other archs of a family fall back to the nearest entry below them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from chitu_core.kernels.attn_reduce import DecodeAttnConfig
from chitu_core.kernels.fp8_gemm import Fp8GemmConfig
from chitu_core.kernels.mla_decode import MLA_DECODE_CONFIG
from chitu_core.kernels.paged_prefill import DEFAULT_MLA_CONFIG, MLA_CONFIG_SM90, PrefillConfig


@dataclass(frozen=True)
class ConfigRow:
    """``config`` serves M up to ``max_m``; when set, only K up to ``max_k`` and N from
    ``min_n`` on (a later row serves the other shapes)."""

    max_m: int
    config: Fp8GemmConfig
    max_k: int | None = None
    min_n: int | None = None

    def serves(self, m: int, k: int | None, n: int | None) -> bool:
        """Whether this row applies; an unknown K or N skips the rows that need it."""
        if m > self.max_m:
            return False
        if self.max_k is not None and (k is None or k > self.max_k):
            return False
        return self.min_n is None or (n is not None and n >= self.min_n)


_C = Fp8GemmConfig

# Ampere (sm_80/86): not measured (no Ampere card here); the Hopper winners, whose
# shared memory (<= 40 KB a program) fits Ampere. M = 1: the FMA GEMV; M 2..16: the
# mm kernel with a 16-row token tile (x as the MMA's A operand, the weight widened
# straight to bf16 in registers as B: mma.m16n8k16, which Hopper also runs at M = 16);
# M 17..64: the swap-AB GEMV (32- then 64-token tiles), but the wide kernel at M 33..64
# when K <= 4096; M 65..128: the wide kernel when N >= 4096 (the Hopper winners, <= 82 KB
# of shared memory); otherwise, and from M = 129 on: widen the weight to bf16 once and
# call cuBLAS.
_WIDE_M128 = _C(kind="wide", block_n=64, block_m=128, block_k=64, split_k=2, num_warps=4,
                num_stages=4, scale_on_acc=False)  # fmt: skip
# M 2..16: the K split whose program count is nearest 4 per SM, at most 8 slices, instead
# of the whole-wave pick (which chose 5-12 slices for K <= 4096). Sweep of fixed splits:
# benchmarks/results/sweep-m2-16-split-h200-2026-11-26.jsonl (K-permuted weights, H200).
# A/B against the whole-wave pick in one run (gemm-m2-16-split-ab-h200-2026-11-26.txt):
# 52 cases (13 shapes x M 2, 4, 8, 16) 2113.2 us against 2244.3; 4096 x 6144 14.3 against
# 17.9 at M = 4, 4096 x 28672 42.2 / 46.7, 4096 x 14336 26.0 / 28.5, lm head 236.4 / 254.2,
# 1536 x 24576 at M = 16 15.7 / 20.7. Slower at M 2..4 on DeepSeek's 18432 x 7168 (53.5 /
# 46.7 at M = 2, 49.1 / 45.8 at M = 4) and 7168 x 18432 (52.5 / 50.6, 50.3 / 48.0); faster at
# M 8..16 there. Llama-8B FP8 decode on one H200 (decode-m2-16-split-h200-2026-11-26.txt):
# 1095 against 997 tokens/s at batch 4, 2139 / 1978 at 8, 4146 / 3810 at 16 (means of 2 runs).
_MM_M4 = _C(kind="mm", block_m=16, block_n=64, block_k=128, max_split_k=8, target_ctas_per_sm=4.0,
            num_warps=2, num_stages=4)  # fmt: skip
_MM_M16 = _C(kind="mm", block_m=16, block_n=64, block_k=128, max_split_k=8,
             target_ctas_per_sm=4.0, num_warps=4, num_stages=3)  # fmt: skip
_MM_M32 = _C(kind="mm", block_m=32, block_n=64, block_k=128, max_split_k=4, num_warps=4,
             num_stages=3)  # fmt: skip
_WIDE_M64 = _C(kind="wide", block_n=64, block_m=64, block_k=128, split_k=2, num_warps=4,
               num_stages=3, scale_on_acc=False)  # fmt: skip
_SM80 = (
    ConfigRow(1, _C(kind="gemv", block_m=1, block_n=64, num_warps=8, num_stages=1)),
    ConfigRow(4, _MM_M4),
    ConfigRow(16, _MM_M16),
    ConfigRow(32, _C(kind="gemv", block_m=32, block_n=32, num_warps=4, num_stages=3)),
    ConfigRow(64, _WIDE_M64, max_k=4096),
    ConfigRow(64, _C(kind="gemv", block_m=64, block_n=64, num_warps=4, num_stages=3)),
    ConfigRow(128, _WIDE_M128, min_n=4096),
    ConfigRow(1 << 62, _C(kind="dequant")),
)

# Hopper (sm_90): winners of ``bench_ops.py --tune`` on an H200
# (benchmarks/results/gemm-h200-2026-11-26.json, ``soft_fp8_table``); M 2..16 from the
# decode probe on an H200 (benchmarks/results/decode-probe/probe-h200.json: the mm
# kernel with bf16 widening beat the swap-AB GEMV by 8-26% at M = 4 and 16). M 17..32:
# the mm kernel with a 32 x 64 tile: over the 4 Llama-8B linears at M = 32, 126.0 us
# against 132.9 for the swap-AB GEMV 32 x 32 and 136.9 for cuBLAS bf16; 60.2 against
# 66.0 on 7168 x 18432; 1-2% behind the GEMV on the TP=2 shards of Llama-8B (H200,
# benchmarks/results/sweep-m32-h200-2026-11-26.jsonl). With K <= 4096 its K split is at
# most 4 (the automatic pick, made for the GEMV, gives 5-11 slices there). bench_ops
# --ms 32 capped (tp-h200x2-2026-11-26-split.txt) against free
# (gemm-h200-2026-11-26-m32-256-wide.json): 4096 x 6144 16.5 us against 21.1, 4096 x 28672
# 53.9 against 61.1 (2 slices); but 7168 x 18432 61.2 against 60.1 and 14336 x 4096 32.3
# against 30.5, so K > 4096 keeps the free pick. TP=2 shards 4096 x 3072, 2048 x 4096,
# 4096 x 14336: 55.2 against 61.0 (sweep-m32-small-h200-2026-11-26.jsonl). At M = 1 the free
# pick is within 2% of the best fixed split on those shapes (sweep-m1-small-*.jsonl); at M 4
# and 16 it was not (4096 x 6144: 17.6 against 14.5, sweep-m{4,16}-small-*.jsonl), hence
# _MM_M4 / _MM_M16's target of 4 programs per SM. M 33..64: the swap-AB GEMV
# 64 x 64 still wins when K > 4096; for K <= 4096 (Llama-8B's q/k/v, o and gate/up, and
# TP=2 shards) the wide kernel 64 x 64 x 128 with 2 K slices: summed over 7 such shapes,
# 213 us against 241 at M = 48 and 218 against 262 at M = 64 (cuBLAS bf16: 183, 180);
# over 5 shapes with K > 4096 the GEMV keeps 235 against 258 (M = 48)
# (benchmarks/results/sweep-wide-m32-64-h200-2026-11-26.jsonl).
# M 65..128: the wide kernel, 64 x 128 x 64, 2 K slices, scales folded into the
# widening. Summed over the six shapes of benchmarks/results/sweep-wide-h200-2026-11-26.jsonl
# at M = 128: 494 us, against 654 for dequant + cuBLAS (the previous row, bench_ops in
# gemm-h200-2026-11-26-m32-256-before-wide.json) and 302 for cuBLAS bf16. It loses only
# on 7168 x 2112 (33.1 against 24.0): 33 tiles of 64 rows, 66 programs with the 2 K
# slices, half the SMs; so N < 4096 keeps dequant + cuBLAS (N = 4096: 60.0 against 84.6).
# From M = 129 on dequant + cuBLAS still wins (M = 256: 739 against 829 for the best
# wide tile).
_SM90 = (
    ConfigRow(1, _C(kind="gemv", block_m=1, block_n=64, num_warps=8, num_stages=1)),
    ConfigRow(4, _MM_M4),
    ConfigRow(16, _MM_M16),
    ConfigRow(32, _MM_M32, max_k=4096),
    ConfigRow(32, dataclasses.replace(_MM_M32, max_split_k=16)),
    ConfigRow(64, _WIDE_M64, max_k=4096),
    ConfigRow(64, _C(kind="gemv", block_m=64, block_n=64, num_warps=4, num_stages=3)),
    ConfigRow(128, _WIDE_M128, min_n=4096),
    ConfigRow(1 << 62, _C(kind="dequant")),
)

SOFT_FP8_TABLES: dict[tuple[int, int], tuple[ConfigRow, ...]] = {
    (8, 0): _SM80,
    (8, 6): _SM80,
    (8, 9): _SM80,
    (9, 0): _SM90,
}


# K-permuted weights (``PackedWeight.k_perm``, the NVIDIA plugin's default): the wide
# kernel loads 4 codes per word straight into its MMA operand (no byte gathering), which
# moves it down to M = 17. Winners of benchmarks/results/sweep-kperm-h200-2026-11-26.py
# (H200, Triton 3.6; jsonl beside it), against the K-order table above on the same run:
# * M 17..32, N >= 14336: 128 x 32 x 128, one K slice. K <= 4096 (Llama-8B gate/up and its
#   TP=2 shard, DeepSeek's 1536 x 24576): 41.8 / 27.0 / 17.8 us against 53.2 / 32.0 / 23.6;
#   K 7168 (sweep-kperm-wide-h200-2026-11-26.jsonl, the M = 24/32 runs): lm head 7168 x
#   129280 258.8 against 353.2 for mm (cuBLAS 466.4), 7168 x 36864 109.9 / 120.0, 7168 x
#   18432 62.4 / 63.1. K > 4096 with N >= 7168: 64 x 32 x 128, automatic split (18432 x 7168
#   54.9 against 63.4). Elsewhere the mm kernel (x tile permuted in registers) keeps M <= 32
#   (K <= 4096 shapes within 5%; 14336 x 4096, 7168 x 4096, 7168 x 2112 mm ahead or equal).
# * M 33..64, K <= 4096, N >= 14336: 128 x 64 x 128, one slice: 49.0 / 31.6 / 20.8 against
#   73.6 / 43.3 / 32.3; other K <= 4096: 64 x 64 x 128, 2 slices (22.7 / 16.1 / 11.5 against
#   23.5 / 16.5 / 11.8); K > 4096 with N >= 14336: 64 x 64 x 128, 2 slices (74.0 against
#   81.5 on 7168 x 18432); the rest 64 x 64 x 128 with the automatic split (18432 x 7168
#   69.0 against 73.6 for the GEMV, 14336 x 4096 43.7 / 42.0, 7168 x 2112 18.1 / 18.3): the
#   GEMV's swap-AB tile would take the x tile through shared memory twice on this layout.
# * M 65..128: for K <= 4096 and N >= 14336 128 x 128 x 128 with 8 warps, one slice (76.8 /
#   39.0 / 33.0 against 64 x 128 x 128's 80.3 / 40.3 / 32.0 and the K-order table's 113.9 /
#   60.8 / 51.3), else 64 x 128 x 128, 2 slices for N >= 4096 (7168 x 18432 119.3 against
#   136.1, 18432 x 7168 93.2 / 115.7, 4096 x 6144 27.6 / 32.0, 14336 x 4096 51.7 / 59.0,
#   2048 x 4096 14.3 / 14.9); N < 4096 keeps dequant + cuBLAS.
# * M 129..256 (benchmarks/results/sweep-kperm-wide-h200-2026-11-26.py, M = 192 and 256
#   against dequant + cuBLAS, the K-order path): K <= 4096, N >= 14336: 128 x 256 x 64, 8
#   warps, one slice (M = 256: 124.5 / 62.6 / 51.0 against 183.4 / 90.9 / 60.6); N >= 6144:
#   128 x 128 x 128, 8 warps, one slice (7168 x 18432 184.5 / 197.2, 18432 x 7168 153.3 /
#   197.7, 4096 x 6144 36.7 / 41.7); N >= 4096: the same, 2 slices (14336 x 4096 72.4 /
#   94.8); N < 4096 keeps dequant + cuBLAS. M 257..512, K <= 4096, N >= 14336: the
#   128 x 256 x 64 tile still wins (M = 512: 241.2 / 119.6 / 77.7 against 256.2 / 134.2 /
#   86.6); other shapes at M = 512 and every shape at M = 1024 keep dequant + cuBLAS.
# * K splits, second pass (sweeps of fixed splits and of the target rule on an H200:
#   sweep-m1-64-split-h200-2026-11-26.jsonl, sweep-m96-256-split-h200-2026-11-26.jsonl; A/B
#   against the previous rows in one run: gemm-table-ab-h200-2026-11-26.txt, 33 changed
#   cases 1826.6 us against 1927.9):
#   - M = 1, N >= 14336: the GEMV with 4 warps and the split nearest 8 programs per SM
#     (4096 x 128256 136.2 against 158.5 us, 7168 x 18432 43.0 / 48.8, 4096 x 14336 22.2 /
#     24.6, 4096 x 28672 40.2 / 42.8, 7168 x 36864 74.4 / 78.3; smaller N lose 2-4% with it).
#   - M 17..32, K > 4096, N >= 14336: the wide tile with the split nearest 3 per SM
#     (7168 x 18432 55.3 / 62.7 at M = 24, 56.5 / 62.7 at M = 32; lm head 265.9 / 271.0).
#     Tiles at M = 32, against the mm kernel (sweep-m32-64-tiles-h200-2026-11-26.jsonl):
#     N 4096..6143 with K > 4096, and N >= 6144 with K <= 4096: the wide 64 x 32 x 128 tile
#     nearest 3 per SM (14336 x 4096 27.3 against 31.4, 7168 x 4096 18.0 / 19.5, 4096 x 6144
#     15.7 / 16.9); the other shapes below N = 7168: the swap-AB GEMV 32 x 32 nearest 4 per
#     SM (4096 x 3072 11.7 / 13.1, 2048 x 4096 9.9 / 10.3, 7168 x 2112 12.9 / 13.9, 4096 x
#     4096 13.5 / 13.6). 18432 x 7168 keeps the wide 64 x 32 tile's whole-wave pick (54.1;
#     60.8 with the target).
#   - M 33..64: K 2049..4096 with N < 14336 4 slices instead of 2 (4096 x 6144 18.4 / 22.2 at
#     M = 48, 4096 x 4096 15.4 / 16.4; K <= 2048 keeps 2: 2048 x 4096 11.3 against 11.6);
#     K 4097..14336 with N < 14336 nearest 3 per SM (14336 x 4096 33.2 / 42.1, 7168 x 4096
#     21.4 / 27.0, 7168 x 2112 16.2 / 17.1); 18432 x 7168 keeps the whole-wave pick (66.9
#     against 76.8 with the target).
#   - M 65..128, K > 4096 with N < 7168: 4 slices instead of 2 (14336 x 4096 43.3 / 51.2 at
#     M = 96, 45.2 / 51.7 at 128; 7168 x 4096 27.3 / 29.6, 29.0 / 30.2); K <= 4096 and
#     N >= 7168 keep 2 (4 slices: 4096 x 6144 33.5 against 26.5, 18432 x 7168 100.0 / 92.8).
#   DeepSeek-V3 shapes, this table against the one before these passes (same run,
#   gemm-ds-shapes-table-ab-h200-2026-11-26.txt: 47 changed cases 2880.6 us against 3064.8)
#   showed two losses, which keep their previous configs: K <= 1024 at M = 1 (kv_b 512 x
#   32768: 7.6 us with the 8-warp whole-wave GEMV, 10.0 with the wide-N row) and K <= 2048
#   with N >= 6144 at M 17..32 (2048 x 7168: 13.9 with the mm tile, 15.8 with the wide
#   tile). Still slower: M 2..4 on 16384 x 7168 (2-3%), 7168 x 36864 (1-3%), 18432 x 7168
#   (5-6%).
#   Llama-8B FP8 decode on one H200, previous rows against these (M = 1 and 17..64 rows;
#   decode-table-h200-2026-11-26.txt, means of 2 runs): batch 1 291.2 against 284.1 tokens/s,
#   32 7180 / 7203, 48 9675 / 8848, 64 12529 / 11440.
# sm_80 runs the same rows, compile-checked only; sm_86/sm_89 (99 KB of shared memory a
# block) drop the 8-warp tiles.
def _wide(bn: int, bm: int, bk: int, stages: int, split: int, warps: int = 4) -> Fp8GemmConfig:
    return _C(kind="wide", block_n=bn, block_m=bm, block_k=bk, split_k=split, num_warps=warps,
              num_stages=stages, scale_on_acc=False)  # fmt: skip


_GEMV_M32 = _C(kind="gemv", block_m=32, block_n=32, num_warps=4, num_stages=3)
_GEMV_M1_WIDE_N = _C(kind="gemv", block_m=1, block_n=64, num_warps=4, num_stages=1,
                     target_ctas_per_sm=8.0)  # fmt: skip


def _near(config: Fp8GemmConfig, per_sm: float) -> Fp8GemmConfig:
    """config with the automatic K split nearest ``per_sm`` programs per SM (<= 8 slices)."""
    return dataclasses.replace(config, split_k=0, max_split_k=8, target_ctas_per_sm=per_sm)


_K_PERM = (
    ConfigRow(1, _SM90[0].config, max_k=1024),
    ConfigRow(1, _GEMV_M1_WIDE_N, min_n=14336),
    *_SM90[:3],
    ConfigRow(32, _wide(128, 32, 128, 4, 1), max_k=4096, min_n=14336),
    ConfigRow(32, _near(_wide(128, 32, 128, 4, 1), 3.0), min_n=14336),
    ConfigRow(32, _MM_M32, max_k=2048, min_n=6144),
    ConfigRow(32, _near(_wide(64, 32, 128, 4, 0), 3.0), max_k=4096, min_n=6144),
    ConfigRow(32, _near(_GEMV_M32, 4.0), max_k=4096),
    ConfigRow(32, _wide(64, 32, 128, 4, 0), min_n=7168),
    ConfigRow(32, _near(_wide(64, 32, 128, 4, 0), 3.0), min_n=4096),
    ConfigRow(32, _near(_GEMV_M32, 4.0)),
    ConfigRow(64, _wide(128, 64, 128, 3, 1), max_k=4096, min_n=14336),
    ConfigRow(64, _wide(64, 64, 128, 3, 2), max_k=2048),
    ConfigRow(64, _wide(64, 64, 128, 3, 4), max_k=4096),
    ConfigRow(64, _wide(64, 64, 128, 3, 2), min_n=14336),
    ConfigRow(64, _near(_wide(64, 64, 128, 3, 0), 3.0), max_k=14336),
    ConfigRow(64, _wide(64, 64, 128, 3, 0)),
    ConfigRow(128, _wide(128, 128, 128, 3, 1, warps=8), max_k=4096, min_n=14336),
    ConfigRow(128, _wide(64, 128, 128, 3, 2), max_k=4096, min_n=4096),
    ConfigRow(128, _wide(64, 128, 128, 3, 2), min_n=7168),
    ConfigRow(128, _wide(64, 128, 128, 3, 4), min_n=4096),
    ConfigRow(256, _wide(128, 256, 64, 3, 1, warps=8), max_k=4096, min_n=14336),
    ConfigRow(256, _wide(128, 128, 128, 3, 1, warps=8), min_n=6144),
    ConfigRow(256, _wide(128, 128, 128, 3, 2, warps=8), min_n=4096),
    ConfigRow(512, _wide(128, 256, 64, 3, 1, warps=8), max_k=4096, min_n=14336),
    _SM90[-1],
)


def _wide8(row: ConfigRow) -> bool:
    return row.config.kind == "wide" and row.config.num_warps == 8


# 99 KB of shared memory: no 8-warp wide tile (M 65..128, K <= 4096, N >= 14336: the 4-warp
# tile; M > 128: dequant + cuBLAS)
_K_PERM_SM86 = tuple(
    dataclasses.replace(row, config=_wide(64, 128, 128, 3, 1)) if _wide8(row) else row
    for row in _K_PERM
    if not (_wide8(row) and row.max_m > 128)
)  # fmt: skip
SOFT_FP8_TABLES_K_PERM: dict[tuple[int, int], tuple[ConfigRow, ...]] = {
    (8, 0): _K_PERM,
    (8, 6): _K_PERM_SM86,
    (8, 9): _K_PERM_SM86,
    (9, 0): _K_PERM,
}


def soft_fp8_config(
    capability: tuple[int, int],
    m: int,
    k: int | None = None,
    n: int | None = None,
    k_perm: bool = False,
) -> Fp8GemmConfig:
    """The soft-FP8 GEMM config for ``m`` tokens, ``k`` input and ``n`` output features
    (None skips the rows that need them) on a GPU of this compute capability, for a
    weight in K order or K-permuted (``k_perm``)."""
    tables = SOFT_FP8_TABLES_K_PERM if k_perm else SOFT_FP8_TABLES
    archs = sorted(a for a in tables if a <= capability) or [min(tables)]
    for row in tables[archs[-1]]:
        if row.serves(m, k, n):
            return row.config
    return tables[archs[-1]][-1].config


# MLA absorbed decode (DeepSeek-V3: 128 heads, R 512 + P 64). On sm_80/sm_90 the default
# 64-position tile needs 155 KB of shared memory, more than sm_86 (99 KB a block) has:
# there and on sm_89 16 positions (94 KB). Ampere entries are compile-checked, not timed.
_MLA_SM86 = dataclasses.replace(MLA_DECODE_CONFIG, block_n=16)
MLA_DECODE_TABLES = {(8, 6): _MLA_SM86, (8, 9): _MLA_SM86}


def mla_decode_config(capability: tuple[int, int]) -> DecodeAttnConfig:
    """The MLA decode config for a GPU of this compute capability."""
    return MLA_DECODE_TABLES.get(capability, MLA_DECODE_CONFIG)


# MLA prefill: the 64 x 64 tile with 8 warps (221 KB of shared memory) is Hopper-only
# (2.22 ms against 3.3 ms for the portable default at 1 x 2048 tokens, 128 heads, H200);
# everything else takes the default, which fits 99 KB.
def mla_prefill_config(capability: tuple[int, int]) -> PrefillConfig:
    """The MLA prefill config for a GPU of this compute capability."""
    return MLA_CONFIG_SM90 if capability >= (9, 0) else DEFAULT_MLA_CONFIG
