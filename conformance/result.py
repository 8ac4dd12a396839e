"""What a conformance run found: ``RunInfo`` (who ran what, where) and ``SuiteResult``.

``SuiteResult.to_dict()`` is report.json; the certificate and report.md read it.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from chitu_core.backend import OP_NAMES
from chitu_core.hookspecs import CONTRACT_VERSION
from chitu_core.quant import WEIGHT_FORMATS
from conformance.check import ERROR, FAIL, CaseResult
from conformance.determinism import DeterminismResult
from conformance.model_check import ModelResult

# Task accuracy on a real model (issue 28 item 1) is not part of the suite yet.
ACCURACY_NOT_CHECKED = {
    "checked": False,
    "summary": "accuracy: not checked (the real-model accuracy check is not in this suite yet)",
}


@dataclass
class RunInfo:
    """Who ran what, where: the certificate's key fields and the run's settings."""

    backend: str
    distribution: str
    plugin_version: str
    chitu_version: str
    torch_version: str
    device_name: str
    device_type: str
    dtype: str
    mode: str
    native_ops: list[str]
    demoted_ops: list[str]
    contract_version: str = CONTRACT_VERSION
    contract_declared: str = ""  # the plugin's BackendInfo.contract
    has_native_fp8: bool = False
    batch_invariant_claimed: bool = False
    # The compute path certified: --fp8-compute, and per op the path the backend declared
    fp8_compute: str = "auto"
    compute_paths: dict[str, str] = field(default_factory=dict)
    fp8_act_ops: list[str] = field(default_factory=list)
    host: str = field(default_factory=platform.node)
    started: str = ""
    elapsed_s: float = 0.0
    resumed_checks: int = 0  # finished checks taken from the cache of a stopped run
    roofline: dict[str, Any] = field(default_factory=dict)


@dataclass
class SuiteResult:
    """Everything a run found; ``to_dict`` is report.json."""

    info: RunInfo
    cases: list[CaseResult]
    models: list[ModelResult]
    ops_checked: list[str]
    ops_skipped: list[str]
    determinism: list[DeterminismResult] = field(default_factory=list)
    accuracy: dict[str, Any] = field(default_factory=lambda: dict(ACCURACY_NOT_CHECKED))

    @property
    def failed_ops(self) -> list[str]:
        """Ops with a failing or erroring case, in contract order."""
        bad = {c.op for c in self.cases if c.status in (FAIL, ERROR)}
        return [op for op in OP_NAMES if op in bad]

    @property
    def models_passed(self) -> bool:
        return all(m.passed for m in self.models)

    @property
    def determinism_passed(self) -> bool:
        return all(d.passed for d in self.determinism)

    @property
    def passed(self) -> bool:
        return not self.failed_ops and self.models_passed and self.determinism_passed

    @property
    def demote(self) -> list[str]:
        """Native ops to serve with the generic implementation (see the module docstring)."""
        native = set(self.info.native_ops)
        if not (self.models_passed and self.determinism_passed):
            return [op for op in OP_NAMES if op in native]
        return [op for op in self.failed_ops if op in native]

    @property
    def failures(self) -> list[str]:
        """One message per failing case, model or determinism check, naming what failed."""
        return (
            [c.message for c in self.cases if c.status in (FAIL, ERROR)]
            + [m.message for m in self.models if not m.passed]
            + [d.message for d in self.determinism if not d.passed]
        )

    @property
    def failures_by_op(self) -> dict[str, str]:
        """One line per failed op: how many of its cases failed and the first failing case."""
        lines = {}
        for op in self.failed_ops:
            bad = [c for c in self.cases if c.op == op and c.status in (FAIL, ERROR)]
            total = sum(c.op == op for c in self.cases)
            lines[op] = f"{len(bad)} of {total} cases failed; first: {bad[0].message}"
        return lines

    @property
    def compute_paths(self) -> dict[str, str]:
        """Per checked op, the path it was certified for: implementation, activation dtype,
        and for the weight ops the weight formats and how FP8 weights are multiplied."""
        info, paths = self.info, {}
        for op in self.ops_checked:
            impl = "native" if op in info.native_ops else "generic"
            if op in info.demoted_ops:
                impl = "generic (demoted for this run)"
            path = f"{impl}, {info.dtype} activations"
            ids = " ".join(c.case_id for c in self.cases if c.op == op)
            formats = [fmt for fmt in WEIGHT_FORMATS if fmt in ids]
            if formats:
                path += f"; weights {', '.join(formats)}"
            if any(fmt.startswith("fp8") for fmt in formats):
                path += (
                    "; FP8 soft or native, the backend's choice per shape (native FP8 device)"
                    if info.has_native_fp8
                    else f"; FP8 soft (e4m3 widened to {info.dtype} in the GEMM)"
                )
            paths[op] = path
        return paths

    def to_dict(self) -> dict[str, Any]:
        return {
            "info": asdict(self.info),
            "passed": self.passed,
            "failed_ops": self.failed_ops,
            "demote": self.demote,
            "ops_checked": self.ops_checked,
            "ops_skipped": self.ops_skipped,
            "failures": self.failures,
            "failures_by_op": self.failures_by_op,
            "compute_paths": self.compute_paths,
            "determinism": [d.to_dict() for d in self.determinism],
            "accuracy": self.accuracy,
            "cases": [c.to_dict() for c in self.cases],
            "models": [m.to_dict() for m in self.models],
        }
