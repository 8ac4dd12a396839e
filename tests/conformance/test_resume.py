"""A stopped run resumes from its finished checks; a changed key or --fresh starts over."""

from __future__ import annotations

import sys

import conformance.runner as runner
from conformance.resume import CheckCache, source_digest
from conformance.runner import SuiteConfig, run_suite


def _config(path, fresh=False):
    return SuiteConfig(
        "cpu_ref",
        ops=("rms_norm", "silu_and_mul"),
        model_check=False,
        timing=False,
        progress=False,
        cache_path=path,
        fresh=fresh,
    )


def test_a_rerun_takes_finished_cases_from_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "checks-cache.jsonl"
    first = run_suite(_config(path))
    assert first.info.resumed_checks == 0 and first.passed
    calls = []
    check_case = runner.check_case
    monkeypatch.setattr(runner, "check_case", lambda *a: calls.append(a) or check_case(*a))
    again = run_suite(_config(path))
    assert calls == [] and again.info.resumed_checks == len(first.cases)
    assert [c.to_dict() for c in again.cases] == [c.to_dict() for c in first.cases]
    fresh = run_suite(_config(path, fresh=True))
    assert len(calls) == len(first.cases) and fresh.info.resumed_checks == 0


def test_a_run_killed_mid_line_keeps_the_finished_checks(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = CheckCache(path, {"plugin_version": "1"})
    cache.put("linear[a]", {"status": "pass"})
    with path.open("a") as f:
        f.write('{"id": "linear[b]", "val')  # the write the kill interrupted
    assert CheckCache(path, {"plugin_version": "1"}).get("linear[a]") == {"status": "pass"}


def test_a_changed_key_discards_the_cache(tmp_path, caplog):
    path = tmp_path / "cache.jsonl"
    CheckCache(path, {"plugin_version": "1", "device_name": "A"}).put("linear[a]", 1)
    with caplog.at_level("INFO", logger="conformance.resume"):
        other = CheckCache(path, {"plugin_version": "2", "device_name": "A"})
    assert other.get("linear[a]") is None and len(other) == 0
    assert "['plugin_version']" in caplog.text
    assert CheckCache(path, {"plugin_version": "2", "device_name": "A"}).get("linear[a]") is None


def test_an_edited_plugin_source_changes_the_digest(tmp_path, monkeypatch):
    package = tmp_path / "chitu_digest_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "kernel.py").write_text("SCALE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        before = source_digest("chitu_digest_probe")
        (package / "kernel.py").write_text("SCALE = 2\n")
        assert source_digest("chitu_digest_probe") != before
    finally:
        sys.modules.pop("chitu_digest_probe", None)
