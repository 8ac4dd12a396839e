"""Numerical tolerances of every op, per activation dtype, in one place, with the reasons.

The metric is the relative Frobenius error ``||y - ref|| / ||ref||`` of a
backend's output ``y`` against the CPU reference ``ref`` (fp32/fp64), plus the
largest absolute error relative to the largest reference magnitude, which
catches a few badly wrong elements that a norm would average away. NaN must
appear exactly where the reference has NaN.

Bounds per compute dtype (unit roundoff u: fp32 2^-24, fp16 2^-11, bf16 2^-8):

* fp32: 2e-5. Both sides accumulate in >= fp32; the reference in fp64. The
  error of an fp32 dot product of length K grows like sqrt(K) u, about 1e-6
  for the K <= 20000 we test; attention and MoE chain three such steps.
* fp16: 4e-3. Output rounding alone gives u/sqrt(3) RMS = 2.8e-4; intermediate
  roundings (softmax probabilities, SwiGLU product) add a few u.
* bf16: 1.6e-2. Output rounding alone is 2.3e-3 RMS; attention rounds the
  probabilities and MoE the SwiGLU intermediate to bf16 before the second
  matmul (the contract says so), which costs up to ~3 u = 1.2e-2.

FP8-activation class (``fp8_act``): ops whose backend path quantizes the activations
to e4m3 with one fp32 scale per token and 128-wide K group (scale = group amax / 448;
DeepSeek-V3's own inference recipe, FP8 tensor cores, "native W8A8") before the GEMM.
The weight side is exact as in every class; the error is the activation rounding:
e4m3 keeps 3 mantissa bits, so each element is off by up to 2^-4 of itself (u = 2^-4),
about 2.5-3.6% RMS, and a dot product of independent roundings carries the same
relative error (1/sqrt(K) shrinking is cancelled by the norm's). Measured 2.6e-2 on
an H100 (linear, M = 512, random activations). Bound: rel_fro 5e-2 (below u, so a path
that rounds coarser than e4m3, e.g. one scale per token instead of per 128 group on
outlier-heavy inputs, still fails), for the op's FP8-weight cases only, and only when
the backend declares the path (``OpPath.fp8_activations`` from ``chitu_configure``): an
undeclared one is held to the compute dtype's bound and fails. Whole-model logits of
such a run: ``MODEL_REL_FRO_FP8_ACT`` = 0.2, about 3x the 7.0e-2 measured on the tiny
DeepSeek-V3 (FP8 weights; bf16 run 1.9e-2) with the recipe emulated on the CPU
(``python -m conformance.fp8_act_emulation``); the tiny Llama has bf16 weights (6.7e-3,
unchanged). A wrong op still gives O(1).

``max_abs_rel`` is 4x ``rel_fro``: single elements near the top of the range
may carry a few roundings more than the RMS.

``moe_route`` weights are fp32 whatever the run's dtype (the spec says so) and
are held to the fp32 bound; integer outputs (expert ids, sampled tokens) must
be equal.

Whole-model logits (``conformance/model_check.py``: the tiny demo models on the
backend at its compute dtype against cpu_ref in fp32) compound the roundings of
every layer, and in DeepSeek-V3 a rounding may flip a near-tied expert choice.
Measured with the generic ops on the CPU: bf16 1.9e-2 (DeepSeek-V3 tiny), 6.8e-3
(Llama tiny); fp32 1e-6. Bounds: fp32 1e-4, fp16 2e-2, bf16 6e-2, about 3x the
measurements; a wrong op gives O(1) errors. Greedy tokens must match the
oracle's until the first step where the oracle's own logits nearly tie between
its token and the backend's (gap below ``max_abs_rel`` x the largest logit):
from there on the two runs condition on different text and are not compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REL_FRO_BY_DTYPE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}
MAX_ABS_REL_FACTOR = 4.0

MODEL_REL_FRO_BY_DTYPE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
# The fp8_act class (see the module docstring): ops, then whole-model logits.
FP8_ACT_REL_FRO = 5e-2
MODEL_REL_FRO_FP8_ACT = 0.2

# Ops whose result is copied, not computed: any difference is a bug.
EXACT_OPS = frozenset({"store_kv", "all_gather", "send", "recv", "allocate_kv_cache"})
# Ops whose float outputs are fp32 whatever the activation dtype.
FP32_OUTPUT_OPS = frozenset({"moe_route"})


@dataclass(frozen=True)
class Tolerance:
    """Bounds for one op at one dtype (0 means bit-exact)."""

    rel_fro: float
    max_abs_rel: float


@dataclass(frozen=True)
class ErrorReport:
    """How far ``y`` is from ``ref``: the metrics the tolerances bound."""

    rel_fro: float
    max_abs_rel: float
    cosine: float
    nan_mismatch: int

    def within(self, tol: Tolerance) -> bool:
        return (
            self.nan_mismatch == 0
            and self.rel_fro <= tol.rel_fro
            and self.max_abs_rel <= tol.max_abs_rel
        )


def tolerance_for(op: str, dtype: torch.dtype, fp8_activations: bool = False) -> Tolerance:
    """The bound for ``op`` run with activations of ``dtype``; ``fp8_activations``: the
    case's activations are quantized to e4m3 in 1x128 groups by a path the backend
    declared (the ``fp8_act`` class, never tighter than the dtype's own)."""
    if op in EXACT_OPS:
        return Tolerance(0.0, 0.0)
    if dtype not in REL_FRO_BY_DTYPE:
        raise ValueError(f"no tolerance for dtype {dtype}; known: {list(REL_FRO_BY_DTYPE)}")
    rel = REL_FRO_BY_DTYPE[dtype]
    if fp8_activations:
        rel = max(rel, FP8_ACT_REL_FRO)
    return Tolerance(rel, rel * MAX_ABS_REL_FACTOR)


def model_tolerance(dtype: torch.dtype, fp8_activations: bool = False) -> Tolerance:
    """The bound on whole-model logits run at ``dtype`` (see the module docstring);
    ``fp8_activations``: some linear of the run quantizes its activations to e4m3."""
    if dtype not in MODEL_REL_FRO_BY_DTYPE:
        raise ValueError(
            f"no model tolerance for dtype {dtype}; known: {list(MODEL_REL_FRO_BY_DTYPE)}"
        )
    rel = MODEL_REL_FRO_BY_DTYPE[dtype]
    if fp8_activations:
        rel = max(rel, MODEL_REL_FRO_FP8_ACT)
    return Tolerance(rel, rel * MAX_ABS_REL_FACTOR)


def compare(y: torch.Tensor, ref: torch.Tensor) -> ErrorReport:
    """Error metrics of ``y`` against ``ref`` (same shape; any dtypes and devices)."""
    if tuple(y.shape) != tuple(ref.shape):
        raise ValueError(f"shape {tuple(y.shape)} != reference shape {tuple(ref.shape)}")
    y64 = y.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    nan_y, nan_ref = torch.isnan(y64), torch.isnan(ref64)
    nan_mismatch = int((nan_y != nan_ref).sum())
    keep = ~(nan_y | nan_ref)
    diff, base = (y64 - ref64)[keep], ref64[keep]
    if base.numel() == 0:
        return ErrorReport(0.0, 0.0, 1.0, nan_mismatch)
    ref_norm = float(base.norm())
    ref_max = float(base.abs().max())
    diff_norm = float(diff.norm())
    rel_fro = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else math.inf)
    max_abs = float(diff.abs().max())
    max_abs_rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf)
    y_norm = float(y64[keep].norm())
    cosine = float((y64[keep] * base).sum()) / (y_norm * ref_norm) if y_norm * ref_norm > 0 else 1.0
    return ErrorReport(rel_fro, max_abs_rel, cosine, nan_mismatch)


def assert_close(op: str, y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> ErrorReport:
    """Raise ``AssertionError`` naming the op, the metrics and the bound if ``y`` is out of bounds."""
    report = compare(y, ref)
    tol = tolerance_for(op, dtype)
    if not report.within(tol):
        raise AssertionError(
            f"{op} ({dtype}): rel_fro {report.rel_fro:.3e} (bound {tol.rel_fro:.1e}), "
            f"max_abs_rel {report.max_abs_rel:.3e} (bound {tol.max_abs_rel:.1e}), "
            f"cosine {report.cosine:.6f}, NaN mismatches {report.nan_mismatch}"
        )
    return report
