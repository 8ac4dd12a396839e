"""Launch configs of the portable soft-FP8 GEMM on Hygon DCUs (wave64), per GPU arch.

The kernels are ``chitu_core/kernels/fp8_gemm.py``, compiled with ``USE_PTX``
off (no inline PTX on HIP). What differs from the NVIDIA tables:

* a wavefront is 64 lanes, so ``num_warps`` counts wavefronts of 64: 4 is
  256 threads, the same thread count as 8 NVIDIA warps;
* a CU has 64 KB of LDS: the Triton configs here need at most 16 KB as compiled
  for gfx90a/gfx942 (the swap-AB GEMV at M <= 64; the mm tile 8 KB) and 4 KB for
  gfx906, so several programs fit a CU; ``tests/test_hygon_hip_compile.py``
  checks the bound for every variant;
* ``num_stages`` is at most 2 (the AMD stream pipeliner double-buffers in LDS).

NOT MEASURED ON A DCU: these are starting points chosen by tile arithmetic and
checked only by cross-compiling and by the interpreter (see the README). A
tuning run (``benchmarks/bench_ops.py --tune`` on the card) replaces them.
Tables are keyed by the base ``gcnArchName`` (``"gfx928:sramecc+:xnack-"`` ->
``"gfx928"``); an arch without a table gets ``DEFAULT_ARCH``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from chitu_core.kernels.fp8_gemm import Fp8GemmConfig

# Device memory limit a config must respect (bytes of LDS per CU).
MAX_LDS_BYTES = 64 * 1024


@dataclass(frozen=True)
class ConfigRow:
    """Use ``config`` for a GEMM of at most ``max_m`` tokens."""

    max_m: int
    config: Fp8GemmConfig


def _cfg(**fields) -> Fp8GemmConfig:
    # fused_reduce is NVIDIA-only: split-K partials are summed by the second kernel on HIP
    # (said explicitly so that the interpreter tests run the same path).
    return Fp8GemmConfig(fused_reduce=False, **fields)


# Matrix-core archs (CDNA2 gfx90a, CDNA3 gfx942; the DCUs with matrix cores, gfx926 /
# gfx928 / gfx936, take the same table). M = 1: the FMA GEMV, a [64, 128] weight tile
# per step over 4 wavefronts (32 bytes a lane). M 2..16: the mm kernel with a 16-row token
# tile (the bf16 MFMA's smallest M). M 17..64: the swap-AB GEMV (weight rows on the MFMA's
# M side). Above: widen the weight to bf16 once (Triton) and call hipBLAS(Lt) via torch.
_MATRIX_CORES = (
    ConfigRow(1, _cfg(kind="gemv", block_m=1, block_n=64, num_warps=4, num_stages=1)),
    ConfigRow(16, _cfg(kind="mm", block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=2)),
    ConfigRow(64, _cfg(kind="gemv", block_m=64, block_n=64, num_warps=4, num_stages=2)),
    ConfigRow(1 << 62, _cfg(kind="dequant")),
)

# gfx906 (Vega20; the Hygon Z100 generation): no matrix cores, ``tl.dot`` becomes FMA.
# Only the FMA GEMV (M <= 4, a narrower tile for M 2..4: [32, 128, 4] fp32 products
# over 256 lanes) and the dequant + BLAS path.
_GFX906 = (
    ConfigRow(1, _cfg(kind="gemv", block_m=1, block_n=64, num_warps=4, num_stages=1)),
    ConfigRow(4, _cfg(kind="gemv", block_m=4, block_n=32, num_warps=4, num_stages=1)),
    ConfigRow(1 << 62, _cfg(kind="dequant")),
)

DEFAULT_ARCH = "gfx928"

SOFT_FP8_TABLES: dict[str, tuple[ConfigRow, ...]] = {
    "gfx906": _GFX906,
    "gfx90a": _MATRIX_CORES,
    "gfx926": _MATRIX_CORES,
    "gfx928": _MATRIX_CORES,
    "gfx936": _MATRIX_CORES,
    "gfx942": _MATRIX_CORES,
}


def base_arch(gcn_arch_name: str) -> str:
    """``"gfx928:sramecc+:xnack-"`` -> ``"gfx928"`` (feature flags dropped)."""
    return gcn_arch_name.split(":", 1)[0]


def table_for(arch: str) -> tuple[ConfigRow, ...]:
    """The config table of ``arch`` (a base or full gcnArchName); ``DEFAULT_ARCH``'s if unknown."""
    return SOFT_FP8_TABLES.get(base_arch(arch), SOFT_FP8_TABLES[DEFAULT_ARCH])


def soft_fp8_config(arch: str, m: int) -> Fp8GemmConfig:
    """The soft-FP8 GEMM config for ``m`` tokens on a device of ``arch``."""
    table = table_for(arch)
    for row in table:
        if m <= row.max_m:
            return row.config
    return table[-1].config
