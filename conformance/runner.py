"""Run the conformance suite for one backend: op cases, collectives, the whole-model check.

The backend is found and bound through ``chitu_core.backend`` exactly as the
engine binds it (``select_backend`` + ``bind_ops`` with the run's demotions);
the oracle is ``cpu_ref`` and the baseline for timings is the generic op on
the backend's own device. Ops that fail are the ones to demote; the
whole-model check then runs with them demoted (the configuration that would
be served), and if it still fails no single op can be blamed, so every native
op is to be demoted.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from tqdm import tqdm

import chitu_core
from chitu_core.backend import (
    COLLECTIVE_OPS,
    OP_NAMES,
    InstalledBackend,
    bind_ops,
    discover_backends,
    select_backend,
)
from chitu_core.errors import UnknownBackendError
from conformance.case import Case
from conformance.cases import suite_cases
from conformance.check import ERROR, FAIL, SKIP, CaseResult, Runner, check_case
from conformance.collectives import run_collectives
from conformance.device import device_name
from conformance.model_check import ModelResult, check_models
from conformance.roofline import DeviceSpec, device_spec

logger = logging.getLogger(__name__)

REFERENCE = "cpu_ref"
# Ops the single-process model check exercises (everything but the collectives).
MODEL_OPS = frozenset(OP_NAMES) - frozenset(COLLECTIVE_OPS) - {"new_group"}


@dataclass(frozen=True)
class SuiteConfig:
    """One run. ``ops`` None: every op with cases; ``native_only``: only the backend's own ops
    (what the gate checks: a generic op cannot be demoted any further)."""

    backend: str
    quick: bool = True
    ops: tuple[str, ...] | None = None
    demote: tuple[str, ...] = ()
    native_only: bool = False
    dtype: str | None = None
    timing: bool = True
    model_check: bool = True
    progress: bool = True
    progress_label: str | None = None  # the bar's text (default "conformance BACKEND")

    def __post_init__(self) -> None:
        unknown = set(self.ops or ()) | set(self.demote)
        unknown -= set(OP_NAMES)
        if unknown:
            raise ValueError(f"unknown op(s) {sorted(unknown)}; ops are {', '.join(OP_NAMES)}")


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
    host: str = field(default_factory=platform.node)
    started: str = ""
    elapsed_s: float = 0.0
    roofline: dict[str, Any] = field(default_factory=dict)


@dataclass
class SuiteResult:
    """Everything a run found; ``to_dict`` is report.json."""

    info: RunInfo
    cases: list[CaseResult]
    models: list[ModelResult]
    ops_checked: list[str]
    ops_skipped: list[str]

    @property
    def failed_ops(self) -> list[str]:
        """Ops with a failing or erroring case, in contract order."""
        bad = {c.op for c in self.cases if c.status in (FAIL, ERROR)}
        return [op for op in OP_NAMES if op in bad]

    @property
    def models_passed(self) -> bool:
        return all(m.passed for m in self.models)

    @property
    def passed(self) -> bool:
        return not self.failed_ops and self.models_passed

    @property
    def demote(self) -> list[str]:
        """Native ops to serve with the generic implementation (see the module docstring)."""
        native = set(self.info.native_ops)
        if not self.models_passed:
            return [op for op in OP_NAMES if op in native]
        return [op for op in self.failed_ops if op in native]

    @property
    def failures(self) -> list[str]:
        """One message per failing case or model, naming the op (or model) and the case."""
        return [c.message for c in self.cases if c.status in (FAIL, ERROR)] + [
            m.message for m in self.models if not m.passed
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "info": asdict(self.info),
            "passed": self.passed,
            "failed_ops": self.failed_ops,
            "demote": self.demote,
            "ops_checked": self.ops_checked,
            "ops_skipped": self.ops_skipped,
            "failures": self.failures,
            "cases": [c.to_dict() for c in self.cases],
            "models": [m.to_dict() for m in self.models],
        }


def _selected_ops(config: SuiteConfig, native: Iterable[str]) -> set[str]:
    ops = set(config.ops) if config.ops is not None else set(OP_NAMES)
    return ops & set(native) if config.native_only else ops


@dataclass
class Plan:
    """A bound backend and what to check on it (shared by ``run_suite`` and the pytest plugin)."""

    config: SuiteConfig
    installed: InstalledBackend
    runner: Runner
    device_name: str
    cases: list[Case]
    selected: set[str]
    has_collectives: bool
    has_model_check: bool

    def collective_results(self) -> list[CaseResult]:
        """The collectives of the selected ops, in a spawned world."""
        r = self.runner
        results = run_collectives(
            self.installed.name, self.config.demote, r.dtype, r.device.type, r.ops.native
        )
        return [result for result in results if result.op in self.selected]

    def model_results(self, failed_ops: Iterable[str] = ()) -> list[ModelResult]:
        """The whole-model check with the run's demotions plus ``failed_ops`` demoted."""
        demote = tuple(sorted(set(self.config.demote) | set(failed_ops)))
        return check_models(self.installed.name, demote, self.runner.dtype)

    def info(self, started: str, elapsed_s: float) -> RunInfo:
        r, installed = self.runner, self.installed
        return RunInfo(
            backend=installed.name,
            distribution=installed.distribution,
            plugin_version=installed.version,
            chitu_version=chitu_core.__version__,
            torch_version=torch.__version__,
            device_name=self.device_name,
            device_type=r.device.type,
            dtype=str(r.dtype).removeprefix("torch."),
            mode="quick" if self.config.quick else "full",
            native_ops=sorted(r.ops.native, key=OP_NAMES.index),
            demoted_ops=sorted(r.ops.demoted, key=OP_NAMES.index),
            started=started,
            elapsed_s=elapsed_s,
            roofline=asdict(r.spec) if r.spec is not None else {},
        )


def plan_suite(config: SuiteConfig) -> Plan:
    """Bind the backend (as the engine does), the oracle and the generic ops; pick the cases.

    Raises ``ChituError`` when the backend or the oracle cannot be loaded.
    """
    backends = discover_backends()
    if REFERENCE not in backends:
        raise UnknownBackendError(
            "the conformance suite needs the reference backend 'cpu_ref': "
            "pip install -e plugins/cpu_ref"
        )
    installed = select_backend(config.backend, backends)
    ops = bind_ops(installed, config.demote)
    device = ops.device(0)
    dtype = getattr(torch, config.dtype or installed.info.compute_dtype)
    name = device_name(device)
    spec: DeviceSpec | None = device_spec(device, name) if config.timing else None
    reference = bind_ops(select_backend(REFERENCE, backends))
    generic = bind_ops(installed, OP_NAMES)
    runner = Runner(ops, reference, generic, dtype, device, spec, config.timing)
    selected = _selected_ops(config, ops.native)
    cases = [c for c in suite_cases(config.quick, device.type) if c.op in selected]
    has_collectives = bool(selected & set(COLLECTIVE_OPS))
    has_model_check = config.model_check and bool(selected & MODEL_OPS)
    return Plan(config, installed, runner, name, cases, selected, has_collectives, has_model_check)


def run_suite(config: SuiteConfig) -> SuiteResult:
    """Run the suite described by ``config`` and return what it found (never raises for a
    failing op; raises ``ChituError`` when the backend or the oracle cannot be loaded)."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    clock = time.perf_counter()
    plan = plan_suite(config)
    r = plan.runner
    total = len(plan.cases) + int(plan.has_collectives) + int(plan.has_model_check)
    desc = config.progress_label or f"conformance {plan.installed.name}"
    bar = tqdm(total=total, desc=desc, unit="check", disable=not config.progress)
    results: list[CaseResult] = []
    for case in plan.cases:
        bar.set_postfix_str(case.id[:60])
        results.append(check_case(case, r))
        logger.info("%s: %s in %.2f s", case.id, results[-1].status, results[-1].wall_s)
        r.ops.empty_cache(r.device)
        bar.update()
    if plan.has_collectives:
        bar.set_postfix_str("collectives (world of 2)")
        results += plan.collective_results()
        bar.update()
    models: list[ModelResult] = []
    if plan.has_model_check:
        bar.set_postfix_str("whole model")
        failed = {res.op for res in results if res.status in (FAIL, ERROR)} & r.ops.native
        models = plan.model_results(failed)
        bar.update()
    bar.close()
    checked = sorted({res.op for res in results if res.status != SKIP}, key=OP_NAMES.index)
    skipped = {res.op for res in results if res.status == SKIP} - set(checked)
    info = plan.info(started, time.perf_counter() - clock)
    return SuiteResult(info, results, models, checked, sorted(skipped, key=OP_NAMES.index))
