"""Per-architecture launch configs of the soft-FP8 GEMM (no autotuning at serve time).

Tables are keyed by compute capability; each row gives the config for M up to
``max_m``. Winners of ``benchmarks/bench_ops.py --tune`` on the GPU named in the
comment; other archs of a family fall back to the nearest entry below them.
"""

from __future__ import annotations

from dataclasses import dataclass

from chitu_core.kernels.fp8_gemm import Fp8GemmConfig


@dataclass(frozen=True)
class ConfigRow:
    max_m: int
    config: Fp8GemmConfig


_C = Fp8GemmConfig

# Ampere (sm_80/86): untuned defaults (no Ampere card available); sized for
# ~100 KB of shared memory per CTA at most.
_SM80 = (
    ConfigRow(16, _C(block_n=64, block_m=16, split_k=0, num_warps=4, num_stages=4)),
    ConfigRow(64, _C(block_n=64, block_m=64, split_k=0, num_warps=4, num_stages=3)),
    ConfigRow(
        256, _C(block_n=128, block_m=128, split_k=0, num_warps=8, num_stages=3, scale_on_acc=False)
    ),
    ConfigRow(
        1 << 62,
        _C(
            block_n=128,
            block_m=128,
            block_k=64,
            split_k=1,
            num_warps=8,
            num_stages=3,
            scale_on_acc=False,
        ),
    ),
)

# Hopper (sm_90): measured on an H200 (benchmarks/results/gemm-h200-2026-11-26.json);
# M<=16 and M<=64 rows as benchmarked there, M<=256 and prefill rows the winners of
# the first (launch-overhead-timed) sweep of that session: prefill 128x256 tiles ran
# 2601 us vs 3616 us for 128x128 at M=4096, K=7168, N=18432.
_SM90 = (
    ConfigRow(16, _C(block_n=32, block_m=16, split_k=0, num_warps=4, num_stages=4)),
    ConfigRow(64, _C(block_n=64, block_m=64, split_k=0, num_warps=4, num_stages=4)),
    ConfigRow(256, _C(block_n=128, block_m=128, split_k=0, num_warps=8, num_stages=4)),
    ConfigRow(
        1 << 62,
        _C(block_n=128, block_m=256, split_k=1, num_warps=8, num_stages=3, scale_on_acc=False),
    ),
)

SOFT_FP8_TABLES: dict[tuple[int, int], tuple[ConfigRow, ...]] = {
    (8, 0): _SM80,
    (8, 6): _SM80,
    (8, 9): _SM80,
    (9, 0): _SM90,
}

# On sm_89+ the native FP8 path is used from this many tokens on (soft FP8 below:
# decode is weight-bound and the soft kernel reads the same bytes without the
# activation-quantization pass).
NATIVE_FP8_MIN_M: dict[tuple[int, int], int] = {(8, 9): 128, (9, 0): 128}


def soft_fp8_config(capability: tuple[int, int], m: int) -> Fp8GemmConfig:
    """The soft-FP8 GEMM config for ``m`` tokens on a GPU of this compute capability."""
    archs = sorted(a for a in SOFT_FP8_TABLES if a <= capability) or [min(SOFT_FP8_TABLES)]
    for row in SOFT_FP8_TABLES[archs[-1]]:
        if m <= row.max_m:
            return row.config
    return SOFT_FP8_TABLES[archs[-1]][-1].config
