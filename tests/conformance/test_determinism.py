"""Determinism: the same greedy request twice, and batch invariance when a backend claims it."""

from __future__ import annotations

import torch

from conformance import determinism
from conformance.check import CaseResult
from conformance.determinism import DeterminismResult, check_arch
from conformance.result import RunInfo, SuiteResult


def _with_linear(monkeypatch, change):
    """Engines built by the determinism check get ``change(x, y)`` applied to every linear."""
    build = determinism._engine

    def engine_with_changed_linear(*args):
        engine = build(*args)
        linear = engine.ops.linear
        engine.ops.linear = lambda x, w, bias: change(x, linear(x, w, bias))
        return engine

    monkeypatch.setattr(determinism, "_engine", engine_with_changed_linear)


def test_the_oracle_is_deterministic_and_batch_invariant():
    result = check_arch("llama", "cpu_ref", (), "float32", claimed=True)
    assert result.passed, result.message
    assert result.repeat_tokens_equal and result.repeat_logits_equal
    assert result.batch_invariant and result.batch_max_rel_diff == 0.0


def test_a_backend_whose_results_change_between_runs_fails(monkeypatch):
    noise = torch.Generator().manual_seed(0)  # advances: every call draws new noise
    _with_linear(monkeypatch, lambda x, y: y + torch.randn(y.shape, generator=noise) * y.std())
    result = check_arch("llama", "cpu_ref", (), "float32", claimed=False)
    assert not result.passed and not result.repeat_tokens_equal
    assert result.message.startswith("determinism[llama]: the same greedy request gave")


def test_batch_variance_is_informational_unless_claimed(monkeypatch):
    # Deterministic, but the output depends on how many rows the batch has.
    _with_linear(monkeypatch, lambda x, y: y * (1 + 1e-3 * x.shape[0]))
    unclaimed = check_arch("llama", "cpu_ref", (), "float32", claimed=False)
    assert unclaimed.passed and unclaimed.repeat_tokens_equal
    assert not unclaimed.batch_logits_equal and unclaimed.batch_max_rel_diff > 0
    claimed = check_arch("llama", "cpu_ref", (), "float32", claimed=True)
    assert not claimed.passed and "claims batch invariance" in claimed.message


def test_a_failed_determinism_check_demotes_every_native_op():
    info = RunInfo(
        "x", "d", "1", "1", "t", "cpu", "cpu", "float32", "quick", ["linear", "rms_norm"], []
    )
    ok = DeterminismResult("llama", passed=True, repeat_tokens_equal=True)
    bad = DeterminismResult("llama", passed=False, message="determinism[llama]: ...")
    cases = [CaseResult("linear[a]", "linear")]
    assert SuiteResult(info, cases, [], ["linear"], [], [ok]).demote == []
    failed = SuiteResult(info, cases, [], ["linear"], [], [bad])
    assert not failed.passed and failed.demote == ["linear", "rms_norm"]
    assert failed.failures == ["determinism[llama]: ..."]
