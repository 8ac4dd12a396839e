"""Run the conformance suite for one backend: op cases, collectives, the whole-model check.

The backend is found and bound through ``chitu_core.backend`` exactly as the
engine binds it (``select_backend`` + ``bind_ops`` with the run's demotions);
the oracle is ``cpu_ref`` and the baseline for timings is the generic op on
the backend's own device. Ops that fail are the ones to demote; the
whole-model check then runs with them demoted (the configuration that would
be served), and if it still fails no single op can be blamed, so every native
op is to be demoted. The determinism checks run in that same configuration, under
the same rule.

Every set-up phase says what it does before it starts (``conformance/progress.py``),
and with ``SuiteConfig.cache_path`` every finished check is kept so that a stopped
run continues where it stopped (``conformance/resume.py``).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import chitu_core
from chitu_core.backend import (
    COLLECTIVE_OPS,
    OP_NAMES,
    InstalledBackend,
    bind_ops,
    discover_backends,
    select_backend,
)
from chitu_core.backend_info import FP8_COMPUTE_MODES, BackendOptions
from chitu_core.errors import UnknownBackendError
from chitu_core.hookspecs import CONTRACT_VERSION
from conformance.case import Case
from conformance.cases import suite_cases
from conformance.certificate import SUITE_VERSION
from conformance.check import ERROR, FAIL, SKIP, CaseResult, Runner, check_case
from conformance.collectives import run_collectives
from conformance.determinism import DeterminismResult, check_determinism
from conformance.device import device_name
from conformance.model_check import ModelResult, check_models
from conformance.progress import Progress
from conformance.result import RunInfo, SuiteResult
from conformance.resume import CheckCache, source_digest
from conformance.roofline import DeviceSpec, describe_probe, device_spec, lookup, probe_dtypes

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
    fp8_compute: str = "auto"  # the --fp8-compute mode certified (``BackendOptions``)
    progress_label: str | None = None  # the bar's text (default "conformance BACKEND")
    cache_path: Path | None = None  # keep finished checks here; a rerun resumes from them
    fresh: bool = False  # discard the finished checks of cache_path first

    def __post_init__(self) -> None:
        if self.fp8_compute not in FP8_COMPUTE_MODES:
            raise ValueError(
                f"fp8_compute must be one of {', '.join(FP8_COMPUTE_MODES)}, "
                f"got {self.fp8_compute!r}"
            )
        unknown = set(self.ops or ()) | set(self.demote)
        unknown -= set(OP_NAMES)
        if unknown:
            raise ValueError(f"unknown op(s) {sorted(unknown)}; ops are {', '.join(OP_NAMES)}")


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
    cache: CheckCache = field(default_factory=lambda: CheckCache(None, {}))

    def served_demotions(self, failed_ops: Iterable[str] = ()) -> tuple[str, ...]:
        """The run's demotions plus ``failed_ops``: the configuration that would be served."""
        return tuple(sorted(set(self.config.demote) | set(failed_ops)))

    def collective_results(self) -> list[CaseResult]:
        """The collectives of the selected ops, in a spawned world."""
        r = self.runner
        results = run_collectives(
            self.installed.name, self.config.demote, r.dtype, r.device.type, r.ops.native
        )
        return [result for result in results if result.op in self.selected]

    def model_results(self, failed_ops: Iterable[str] = ()) -> list[ModelResult]:
        """The whole-model check with the run's demotions plus ``failed_ops`` demoted."""
        demote = self.served_demotions(failed_ops)
        return check_models(self.installed.name, demote, self.runner.dtype, self.config.fp8_compute)

    def determinism_results(self, failed_ops: Iterable[str] = ()) -> list[DeterminismResult]:
        """Repeat and batch invariance in the served configuration (``failed_ops`` demoted)."""
        claimed = self.installed.info.batch_invariant
        demote = self.served_demotions(failed_ops)
        quick = self.config.quick
        return check_determinism(
            self.installed.name, demote, self.runner.dtype, claimed, quick, self.config.fp8_compute
        )

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
            fp8_compute=self.config.fp8_compute,
            compute_paths={op: p.description for op, p in r.ops.paths.items()},
            fp8_act_ops=sorted(r.fp8_act_ops, key=OP_NAMES.index),
            contract_declared=installed.info.contract,
            has_native_fp8=installed.info.has_native_fp8,
            batch_invariant_claimed=installed.info.batch_invariant,
            started=started,
            elapsed_s=elapsed_s,
            roofline=asdict(r.spec) if r.spec is not None else {},
        )


def _plugin_package(installed: InstalledBackend) -> str:
    plugin = installed.plugin_manager.get_plugin(installed.name)
    module = plugin.__name__ if inspect.ismodule(plugin) else type(plugin).__module__
    return module.split(".")[0]


def cache_key(config: SuiteConfig, installed: InstalledBackend, name: str, dtype) -> dict:
    """Everything a finished check depends on (see ``conformance/resume.py``)."""
    return {
        "backend": installed.name,
        "distribution": installed.distribution,
        "plugin_version": installed.version,
        "plugin_digest": source_digest(_plugin_package(installed)),
        "chitu_version": chitu_core.__version__,
        "chitu_digest": source_digest("chitu_core", "conformance"),
        "torch_version": torch.__version__,
        "device_name": name,
        "dtype": str(dtype),
        "demote": sorted(config.demote),
        "fp8_compute": config.fp8_compute,
        "timing": config.timing,
        "suite_version": SUITE_VERSION,
        "contract_version": CONTRACT_VERSION,
    }


def _roofline(config: SuiteConfig, cache: CheckCache, device, name, dtype, say) -> DeviceSpec:
    stored = cache.get("roofline")
    if stored is not None:
        return DeviceSpec(**stored)
    if device.type == "cpu" or lookup(name) is None:
        say(describe_probe(device, probe_dtypes(dtype)))
    spec = device_spec(device, name, probe_dtypes(dtype))
    cache.put("roofline", asdict(spec))
    return spec


def plan_suite(config: SuiteConfig, say: Callable[[str], None] = lambda text: None) -> Plan:
    """Bind the backend (as the engine does), the oracle and the generic ops; pick the cases.

    ``say`` hears what each set-up phase is about to do. Raises ``ChituError`` when the
    backend or the oracle cannot be loaded.
    """
    say("loading the installed backends")
    backends = discover_backends()
    if REFERENCE not in backends:
        raise UnknownBackendError(
            "the conformance suite needs the reference backend 'cpu_ref': "
            "pip install -e plugins/cpu_ref"
        )
    installed = select_backend(config.backend, backends)
    ops = bind_ops(installed, config.demote, BackendOptions(fp8_compute=config.fp8_compute))
    device = ops.device(0)
    dtype = getattr(torch, config.dtype or installed.info.compute_dtype)
    name = device_name(device)
    cache = CheckCache(None, {})
    if config.cache_path is not None:
        say(f"hashing the sources of {installed.name} and chitu (the resume cache's key)")
        key = cache_key(config, installed, name, dtype)
        cache = CheckCache(config.cache_path, key, config.fresh)
    spec = _roofline(config, cache, device, name, dtype, say) if config.timing else None
    reference = bind_ops(select_backend(REFERENCE, backends))
    generic = bind_ops(installed, OP_NAMES)
    fp8_act = frozenset(op for op, path in ops.paths.items() if path.fp8_activations)
    runner = Runner(ops, reference, generic, dtype, device, spec, config.timing, fp8_act)
    selected = _selected_ops(config, ops.native)
    cases = [c for c in suite_cases(config.quick, device.type) if c.op in selected]
    has_collectives = bool(selected & set(COLLECTIVE_OPS))
    has_model_check = config.model_check and bool(selected & MODEL_OPS)
    return Plan(
        config, installed, runner, name, cases, selected, has_collectives, has_model_check, cache
    )


def _cached_or_run(plan: Plan, check_id: str, run, to_json, from_json, bar: Progress):
    """The check ``check_id``: ``from_json`` of its cached value, else ``run()``, stored."""
    bar.doing(check_id)
    stored = plan.cache.get(check_id)
    if stored is not None:
        value = from_json(stored)
    else:
        value = run()
        plan.cache.put(check_id, to_json(value))
    bar.advance()
    return value


def _dicts(items) -> list[dict[str, Any]]:
    return [asdict(item) for item in items]


def _run_case(case: Case, r: Runner) -> CaseResult:
    result = check_case(case, r)
    logger.info("%s: %s in %.2f s", case.id, result.status, result.wall_s)
    r.ops.empty_cache(r.device)
    return result


def run_suite(config: SuiteConfig) -> SuiteResult:
    """Run the suite described by ``config`` and return what it found (never raises for a
    failing op; raises ``ChituError`` when the backend or the oracle cannot be loaded)."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    clock = time.perf_counter()
    bar = Progress(config.progress_label or f"conformance {config.backend}", config.progress)
    plan = plan_suite(config, bar.say)
    r = plan.runner
    resumed = sum(plan.cache.get(c.id) is not None for c in plan.cases)
    if resumed:
        bar.say(f"resuming: {resumed} finished checks in {plan.cache.path} (--fresh: redo them)")
    bar.say(f"checking {len(plan.cases)} cases of {len(plan.selected)} ops against {REFERENCE}")
    bar.start(len(plan.cases) + int(plan.has_collectives) + 2 * int(plan.has_model_check))
    results = [
        _cached_or_run(
            plan, c.id, lambda c=c: _run_case(c, r), asdict, lambda d: CaseResult(**d), bar
        )
        for c in plan.cases
    ]
    if plan.has_collectives:
        names = ",".join(sorted(plan.selected & set(COLLECTIVE_OPS)))
        results += _cached_or_run(
            plan,
            f"collectives[{names}]",
            plan.collective_results,
            _dicts,
            lambda ds: [CaseResult(**d) for d in ds],
            bar,
        )
    models: list[ModelResult] = []
    determinism: list[DeterminismResult] = []
    if plan.has_model_check:
        failed = {res.op for res in results if res.status in (FAIL, ERROR)} & r.ops.native
        served = ",".join(plan.served_demotions(failed)) or "none"
        models = _cached_or_run(
            plan,
            f"whole model[demoted={served}]",
            lambda: plan.model_results(failed),
            _dicts,
            lambda ds: [ModelResult(**d) for d in ds],
            bar,
        )
        determinism = _cached_or_run(
            plan,
            f"determinism[{'quick' if config.quick else 'full'},demoted={served}]",
            lambda: plan.determinism_results(failed),
            _dicts,
            lambda ds: [DeterminismResult(**d) for d in ds],
            bar,
        )
    bar.close()
    checked = sorted({res.op for res in results if res.status != SKIP}, key=OP_NAMES.index)
    skipped = {res.op for res in results if res.status == SKIP} - set(checked)
    info = plan.info(started, time.perf_counter() - clock)
    info.resumed_checks = resumed
    return SuiteResult(
        info, results, models, checked, sorted(skipped, key=OP_NAMES.index), determinism
    )
