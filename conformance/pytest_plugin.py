"""pytest plugin ``chitu_conformance``: the conformance suite as pytest tests, one per check.

Vendors run the same suite in their CI::

    pytest -p chitu_conformance --chitu-backend NAME --pyargs conformance
    pytest -p chitu_conformance --chitu-backend NAME --chitu-full --pyargs conformance
    pytest -p chitu_conformance --chitu-backend NAME --chitu-ops linear,fused_moe --pyargs conformance

(``-p chitu_conformance`` is needed only where plugin autoloading is off;
the ``pytest11`` entry point loads it otherwise.) ``--pyargs conformance``
collects ``conformance/test_suite.py``, which holds one parametrized test:
one test per op case (``linear[...]``), per collective, per demo model
(``model:deepseek_v3``) and per determinism check (``determinism:llama``). Without ``--chitu-backend`` it is skipped, and the
plugin adds nothing to other test sessions (it imports the suite, and torch,
only when asked to run it).
"""

from __future__ import annotations

from typing import Any

import pytest

MODEL_PREFIX = "model:"
DETERMINISM_PREFIX = "determinism:"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chitu", "Chitu conformance suite")
    group.addoption("--chitu-backend", help="backend to check (see 'chitu plugins')")
    group.addoption("--chitu-full", action="store_true", help="the full suite (default: --quick)")
    group.addoption("--chitu-ops", help="comma-separated ops to check (default: all)")
    group.addoption("--chitu-native-only", action="store_true", help="only the backend's own ops")
    group.addoption(
        "--chitu-no-model-check", action="store_true", help="skip the whole-model check"
    )


class ConformanceSession:
    """The plan of the run, built once per pytest session, and its lazily run checks."""

    def __init__(self, config: pytest.Config) -> None:
        from conformance.runner import SuiteConfig, plan_suite

        ops = config.getoption("chitu_ops")
        self.plan = plan_suite(
            SuiteConfig(
                backend=config.getoption("chitu_backend"),
                quick=not config.getoption("chitu_full"),
                ops=tuple(ops.split(",")) if ops else None,
                native_only=config.getoption("chitu_native_only"),
                model_check=not config.getoption("chitu_no_model_check"),
                timing=False,
                progress=False,
            )
        )
        self._collectives: dict[str, Any] | None = None
        self._models: dict[str, Any] | None = None
        self._determinism: dict[str, Any] | None = None

    def check_ids(self) -> list[str]:
        from conformance.collectives import COLLECTIVE_CASES
        from conformance.determinism import QUICK_ARCHS
        from conformance.model_check import ARCHS

        ids = [case.id for case in self.plan.cases]
        if self.plan.has_collectives:
            ids += [c.id for c in COLLECTIVE_CASES if c.op in self.plan.selected]
        if self.plan.has_model_check:
            ids += [f"{MODEL_PREFIX}{arch}" for arch in ARCHS]
            archs = QUICK_ARCHS if self.plan.config.quick else ARCHS
            ids += [f"{DETERMINISM_PREFIX}{arch}" for arch in archs]
        return ids

    def run(self, check_id: str) -> tuple[bool, str]:
        """``(passed_or_skipped, message)`` of one check; raises ``pytest.skip`` for a skip."""
        from conformance.check import SKIP, check_case

        if check_id.startswith(MODEL_PREFIX):
            if self._models is None:
                self._models = {m.arch: m for m in self.plan.model_results()}
            model = self._models[check_id[len(MODEL_PREFIX) :]]
            return model.passed, model.message
        if check_id.startswith(DETERMINISM_PREFIX):
            if self._determinism is None:
                self._determinism = {d.arch: d for d in self.plan.determinism_results()}
            result = self._determinism[check_id[len(DETERMINISM_PREFIX) :]]
            return result.passed, result.message
        case = next((c for c in self.plan.cases if c.id == check_id), None)
        if case is not None:
            result = check_case(case, self.plan.runner)
        else:
            if self._collectives is None:
                self._collectives = {r.case_id: r for r in self.plan.collective_results()}
            result = self._collectives[check_id]
        if result.status == SKIP:
            pytest.skip(result.message)
        return result.passed, result.message


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chitu_conformance: a check of the Chitu conformance suite")


def _session(config: pytest.Config) -> ConformanceSession:
    session = getattr(config, "_chitu_conformance", None)
    if session is None:
        session = ConformanceSession(config)
        config._chitu_conformance = session  # type: ignore[attr-defined]
    return session


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "chitu_check" not in metafunc.fixturenames:
        return
    if not metafunc.config.getoption("chitu_backend"):
        reason = "pass --chitu-backend NAME to run the conformance suite"
        metafunc.parametrize("chitu_check", [pytest.param(None, marks=pytest.mark.skip(reason))])
        return
    ids = _session(metafunc.config).check_ids()
    metafunc.parametrize("chitu_check", ids, ids=ids)


@pytest.fixture(scope="session")
def chitu_conformance(request: pytest.FixtureRequest) -> ConformanceSession:
    """The session's plan (the backend bound as the engine binds it)."""
    return _session(request.config)
