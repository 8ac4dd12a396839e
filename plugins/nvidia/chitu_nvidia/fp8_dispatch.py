"""Which FP8 GEMM path a weight takes, per ``--fp8-compute`` mode, GPU, shape and token count.

The choice is made once per weight, when it is prepared: ``native_from_m`` (the
token count from which the native W8A8 path serves the weight; ``NEVER`` for
soft only) is stored in its ``PackedWeight`` and the hot path compares one
integer. Paths:

* soft W8A16: e4m3 weight codes widened to bf16 inside the GEMM, activations
  untouched (``chitu_core.kernels.fp8_gemm``). Every sm_80+ GPU.
* native W8A8: activations quantized to e4m3 per token and 1x128 K group, FP8
  tensor-core GEMM with both block scales (``native_fp8``: the Triton kernel
  below ``SCALED_MM_MIN_M`` tokens, cuBLAS block-scaled ``_scaled_mm`` from
  there). sm_89+ only; FP8 block-128 weights only.

``auto`` uses the per-arch ``NATIVE_FROM_M`` rows below: decode-sized M is
weight-bandwidth bound, where the soft kernel reads the same bytes without the
activation-quantization pass; from the crossover on the FP8 tensor cores win.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from chitu_core.backend_info import BackendOptions, OpPath
from chitu_core.kernels.packed_weight import NEVER_NATIVE
from chitu_core.quant import FORMAT_FP8_BLOCK128

logger = logging.getLogger(__name__)

NEVER = NEVER_NATIVE  # native_from_m of a weight that always takes the soft path
NATIVE_FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class NativeRow:
    """From ``native_from_m`` tokens on, the native path serves weights with K up to
    ``max_k`` and N up to ``max_n`` (None: any); the first row that serves a shape wins."""

    native_from_m: int
    max_k: int | None = None
    max_n: int | None = None

    def serves(self, k: int, n: int) -> bool:
        return (self.max_k is None or k <= self.max_k) and (self.max_n is None or n <= self.max_n)


# sm_90, H100 (benchmarks/results/gemm-h100-2026-11-26-final.txt, soft K-permuted vs
# native; the native column is the Triton W8A8 kernel below M = 128 and cuBLAS
# block-scaled _scaled_mm from 128): at M = 128 native wins on 7 of the 8 shapes (7168 x
# 18432 74.6 us against 125.2, 18432 x 7168 69.4 / 96.1, lm head 358.5 / 693.9, 4096 x
# 28672 58.0 / 79.9, 4096 x 6144 20.2 / 28.2, 1536 x 24576 25.0 / 33.9, 7168 x 2112 26.6 /
# 28.4) and ties on 14336 x 4096 (48.7 / 48.0); at M = 256 and prefill sizes it wins
# everywhere (M = 4096: 0.6-0.7x the soft time). At M <= 64 the Triton W8A8 kernel loses
# on every shape (M = 64: 110.3 against 81.4 on 7168 x 18432).
# sm_89 (Ada): not measured here; the Hopper crossover, where _scaled_mm may fall back
# to the Triton kernel.
NATIVE_FROM_M: dict[tuple[int, int], tuple[NativeRow, ...]] = {
    (8, 9): (NativeRow(128),),
    (9, 0): (NativeRow(128),),
}


def has_native_fp8(capability: tuple[int, int]) -> bool:
    return capability >= NATIVE_FP8_MIN_CAPABILITY


def check_mode(options: BackendOptions, capability: tuple[int, int]) -> None:
    """Raise ValueError for ``native`` on a GPU without FP8 arithmetic."""
    if options.fp8_compute == "native" and not has_native_fp8(capability):
        major, minor = capability
        raise ValueError(
            f"--fp8-compute native needs FP8 tensor cores (sm_89+), this GPU is sm_{major}{minor}; "
            "use --fp8-compute auto or soft (weights stay FP8, widened in the GEMM)"
        )


def _rows(capability: tuple[int, int]) -> tuple[NativeRow, ...]:
    archs = sorted(a for a in NATIVE_FROM_M if a <= capability)
    return NATIVE_FROM_M[archs[-1]] if archs else ()


def native_from_m(
    mode: str, capability: tuple[int, int], fmt: str, n: int, k: int, is_experts: bool = False
) -> int:
    """The token count from which a ``[N, K]`` weight of ``fmt`` takes the native path
    (``NEVER``: always soft). Experts (fused MoE) are soft in every mode: no native FP8
    fused MoE yet."""
    if is_experts or fmt != FORMAT_FP8_BLOCK128 or not has_native_fp8(capability):
        return NEVER
    if mode == "soft":
        return NEVER
    if mode == "native":
        return 0
    for row in _rows(capability):
        if row.serves(k, n):
            return row.native_from_m
    return NEVER


def describe(mode: str, capability: tuple[int, int]) -> dict[str, OpPath]:
    """``chitu_configure``'s answer: the path of linear and fused_moe under ``mode``."""
    soft = "soft W8A16 (weights widened in the GEMM)"
    native = "native W8A8 (activations to e4m3, 1x128 groups)"
    if mode == "soft" or not has_native_fp8(capability):
        linear = OpPath(f"FP8 weights: {soft}")
    elif mode == "native":
        linear = OpPath(f"FP8 block-128 weights: {native} at every M; per-channel: {soft}", True)
    else:
        rows = _rows(capability)
        parts = []
        for row in rows:
            where = " and ".join(
                f"{name} <= {v}" for name, v in (("K", row.max_k), ("N", row.max_n)) if v
            )
            parts.append(
                f"{where + ': ' if where else ''}{soft} for M < {row.native_from_m}, "
                f"{native} from M {row.native_from_m}"
            )
        linear = OpPath(f"FP8 block-128 weights: {'; '.join(parts)}; per-channel: {soft}", True)
    moe = OpPath(f"FP8 experts: {soft} (no native FP8 fused MoE yet)")
    return {"linear": linear, "fused_moe": moe}


class PathLog:
    """Logs each distinct (format, shape, crossover) once, as weights are prepared: the
    start-up log line that says which path each linear takes."""

    def __init__(self) -> None:
        self._seen: set[tuple] = set()

    def __call__(self, fmt: str, shape: tuple[int, ...], from_m: int) -> None:
        key = (fmt, shape, from_m)
        if key in self._seen:
            return
        self._seen.add(key)
        what = f"{'experts' if len(shape) == 3 else 'linear'} {fmt} {list(shape)}"
        if from_m >= NEVER:
            logger.info("%s: soft W8A16 at every M", what)
        elif from_m == 0:
            logger.info("%s: native W8A8 at every M", what)
        else:
            logger.info("%s: soft W8A16 for M < %d, native W8A8 from M %d", what, from_m, from_m)
