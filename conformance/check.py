"""Check one case: run it on the backend, compare with cpu_ref, time it against the generic op.

Every failure message starts with the case id (``op[shape...]``), so a log line
or a report row names the op and the case without context.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

import torch

from chitu_core.quant import FORMAT_UNQUANTIZED, QuantizedWeight
from conformance.case import Case, call_op, prepare_inputs, run_reference, sample_rows, select_rows
from conformance.device import time_call
from conformance.roofline import DeviceSpec, case_cost
from conformance.tolerances import FP32_OUTPUT_OPS, ErrorReport, compare, tolerance_for

logger = logging.getLogger(__name__)

PASS, FAIL, ERROR, SKIP = "pass", "fail", "error", "skip"


@dataclass
class CaseResult:
    """The outcome of one case: status, worst errors and bounds, and timings (seconds)."""

    case_id: str
    op: str
    model: str = ""
    status: str = PASS
    message: str = ""
    native: bool = True
    rel_fro: float = 0.0
    max_abs_rel: float = 0.0
    cosine: float = 1.0
    nan_mismatch: int = 0
    int_mismatch: int = 0
    bound_rel_fro: float = 0.0
    bound_max_abs_rel: float = 0.0
    # "fp8_act" where the backend declared that this case's activations go to e4m3
    tolerance_class: str = ""
    time_s: float | None = None
    generic_time_s: float | None = None
    roofline_s: float | None = None
    flops: float | None = None
    bytes: float | None = None
    wall_s: float = 0.0  # building, running, checking and timing the case

    @property
    def passed(self) -> bool:
        return self.status in (PASS, SKIP)

    @property
    def error_ratio(self) -> float:
        """Worst error as a fraction of its bound (1.0 is at the bound; inf for an exact op off,
        a misplaced NaN or a wrong integer)."""
        if self.nan_mismatch or self.int_mismatch:
            return math.inf
        ratios = [0.0]
        for err, bound in (
            (self.rel_fro, self.bound_rel_fro),
            (self.max_abs_rel, self.bound_max_abs_rel),
        ):
            ratios.append(err / bound if bound > 0 else (0.0 if err == 0 else math.inf))
        return max(ratios)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Runner:
    """What checking needs: the backend's ops, the oracle's, the generic ones, where and how."""

    ops: Any
    ref_ops: Any
    generic_ops: Any
    dtype: torch.dtype
    device: torch.device
    spec: DeviceSpec | None = None
    timing: bool = True
    # Ops whose path quantizes activations to e4m3 (``OpPath.fp8_activations``, declared
    # by the backend's ``chitu_configure``): their FP8-weight cases get the fp8_act class.
    fp8_act_ops: frozenset[str] = frozenset()

    def sync(self) -> None:
        self.ops.synchronize(self.device)

    def is_native(self, op: str) -> bool:
        return op in self.ops.native


def _expected_dtype(case: Case, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if case.op in FP32_OUTPUT_OPS else dtype


def has_fp8_weights(inputs) -> bool:
    """Whether any weight input of a case is FP8 (what an FP8-activation path multiplies)."""
    found = []
    for value in inputs.values():
        found += value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(v, QuantizedWeight) and v.fmt != FORMAT_UNQUANTIZED for v in found)


def _compare_outputs(
    case: Case,
    result: CaseResult,
    outputs,
    expected,
    rows,
    r: Runner,
    fp8_act: bool = False,
    is_oracle: bool = False,
) -> None:
    """Fill ``result``'s metrics from outputs vs expected; set FAIL with a message if out of
    bounds. ``fp8_act``: hold float outputs to the declared FP8-activation class."""
    problems = []
    result.tolerance_class = "fp8_act" if fp8_act else str(r.dtype).removeprefix("torch.")
    if len(outputs) != len(expected):
        problems.append(f"returned {len(outputs)} outputs, expected {len(expected)}")
    for index, (out, ref) in enumerate(zip(outputs, expected, strict=False)):
        where = f"output {index}" if len(expected) > 1 else "output"
        if out.device.type != r.device.type:
            problems.append(f"{where} is on {out.device}, expected {r.device.type}")
        out = out if rows is None else out[rows.to(out.device)]
        if tuple(out.shape) != tuple(ref.shape):
            problems.append(f"{where} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
            continue
        if not ref.is_floating_point():
            mismatch = int((out.cpu().long() != ref.cpu().long()).sum())
            result.int_mismatch += mismatch
            if mismatch:
                problems.append(f"{where}: {mismatch} of {ref.numel()} integer values differ")
            continue
        want = _expected_dtype(case, r.dtype)
        if out.dtype != want:
            problems.append(f"{where} is {out.dtype}, the contract says {want}")
        tol = tolerance_for(case.op, want, fp8_act)
        report = ErrorReport(0.0, 0.0, 1.0, 0) if is_oracle else compare(out, ref)
        result.rel_fro = max(result.rel_fro, report.rel_fro)
        result.max_abs_rel = max(result.max_abs_rel, report.max_abs_rel)
        result.cosine = min(result.cosine, report.cosine)
        result.nan_mismatch += report.nan_mismatch
        result.bound_rel_fro, result.bound_max_abs_rel = tol.rel_fro, tol.max_abs_rel
        if not report.within(tol):
            problems.append(
                f"{where}: rel_fro {report.rel_fro:.3e} (bound {tol.rel_fro:.1e}), "
                f"max_abs_rel {report.max_abs_rel:.3e} (bound {tol.max_abs_rel:.1e}), "
                f"cosine {report.cosine:.6f}, NaN mismatches {report.nan_mismatch}"
            )
    if problems:
        result.status = FAIL
        result.message = f"{case.id} ({r.dtype}): " + "; ".join(problems)


def _time(case: Case, inputs, result: CaseResult, first_s: float, args, r: Runner) -> None:
    result.time_s = time_call(lambda: call_op(r.ops, case, args), r.device, r.sync, first_s)
    if result.native:
        generic_args = prepare_inputs(r.generic_ops, case, inputs, r.dtype, r.device)
        generic_first = None
        if r.device.type == "cpu":  # the host has no warm-up to do: the first call is a sample
            start = time.perf_counter()
            call_op(r.generic_ops, case, generic_args)
            generic_first = time.perf_counter() - start
        fn = lambda: call_op(r.generic_ops, case, generic_args)  # noqa: E731
        result.generic_time_s = time_call(fn, r.device, r.sync, generic_first)
    else:
        result.generic_time_s = result.time_s
    cost = case_cost(case, inputs, r.dtype)
    if cost is not None and r.spec is not None:
        result.flops, result.bytes = cost.flops, cost.bytes
        result.roofline_s = cost.seconds(r.spec, r.dtype)


def _is_the_oracle(op: str, r: Runner) -> bool:
    """Whether the backend's ``op`` is the reference's own function, run in fp32 on the host
    (cpu_ref checking itself): then its output *is* the expected output, as the whole-model
    check also assumes."""
    if r.dtype != torch.float32 or r.device.type != "cpu" or op not in r.ref_ops.native:
        return False
    mine, theirs = getattr(r.ops, op), getattr(r.ref_ops, op)
    return getattr(mine, "__wrapped__", mine) is getattr(theirs, "__wrapped__", theirs)


def check_case(case: Case, r: Runner) -> CaseResult:
    """Run ``case`` on the backend and the oracle; compare; time real-shape cases."""
    start = time.perf_counter()
    result = _check_case(case, r)
    result.wall_s = time.perf_counter() - start
    return result


def _check_case(case: Case, r: Runner) -> CaseResult:
    result = CaseResult(case.id, case.op, case.model, native=r.is_native(case.op))
    try:
        inputs = case.inputs()
        args = prepare_inputs(r.ops, case, inputs, r.dtype, r.device)
        r.sync()
        start = time.perf_counter()
        outputs = call_op(r.ops, case, args)
        r.sync()
        first_s = time.perf_counter() - start
    except Exception as exc:  # a kernel may fail in any way; the report must say which case
        result.status = ERROR
        result.message = f"{case.id} ({r.dtype}): raised {type(exc).__name__}: {exc}"
        logger.debug("%s", traceback.format_exc())
        return result
    rows = sample_rows(case, inputs)
    is_oracle = _is_the_oracle(case.op, r)
    if is_oracle:  # the oracle's own op at its own dtype: nothing to recompute or compare
        expected = [out if rows is None else out[rows] for out in outputs]
    else:
        ref_inputs = inputs if rows is None else select_rows(case, inputs, rows)
        expected = run_reference(r.ref_ops, case, ref_inputs, r.dtype)
    fp8_act = case.op in r.fp8_act_ops and has_fp8_weights(inputs)
    _compare_outputs(case, result, outputs, expected, rows, r, fp8_act, is_oracle)
    del outputs, expected
    if r.timing and case.is_timed and result.status == PASS:
        try:
            _time(case, inputs, result, first_s, args, r)
        except Exception as exc:  # the generic op failing here is a finding too, not a crash
            result.message = f"{case.id}: timing failed: {type(exc).__name__}: {exc}"
    return result
