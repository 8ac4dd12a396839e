"""The gate: no certificate for the oracle, a loud skip, certify on first use, reuse the
certificate, re-certify when the plugin version or the device changes."""

from __future__ import annotations

import json
import logging
from dataclasses import fields, replace

import pytest

from conformance import gate, runner
from conformance.certificate import (
    CERT_DIR_ENV,
    Certificate,
    CertificateKey,
    load_valid,
    save,
)
from conformance.certificate import cert_dir as resolve_cert_dir

BACKEND, OP = "broken_router", "moe_route"  # the fastest broken backend to certify


@pytest.fixture
def counted_runs(monkeypatch):
    """Counts the suite runs the gate starts."""
    runs = []
    real = gate.run_suite

    def run_suite(config):
        runs.append(config)
        return real(config)

    monkeypatch.setattr(gate, "run_suite", run_suite)
    return runs


def test_reference_needs_no_certificate(cert_dir, counted_runs):
    assert gate.ensure_certified("cpu_ref") == ()
    assert gate.cached_demotions("cpu_ref") == ()
    assert not counted_runs and not cert_dir.exists()


def test_skip_warns_loudly_and_demotes_nothing(broken_backends, cert_dir, counted_runs, caplog):
    with caplog.at_level(logging.WARNING, logger="conformance.gate"):
        assert gate.ensure_certified(BACKEND, skip=True) == ()
    assert "CONFORMANCE SKIPPED" in caplog.text and BACKEND in caplog.text
    assert not counted_runs


def test_certifies_on_first_use_then_reuses_then_recertifies_on_changes(
    broken_backends, cert_dir, counted_runs, monkeypatch
):
    assert gate.ensure_certified(BACKEND, progress=False) == (OP,)
    assert len(counted_runs) == 1 and counted_runs[0].native_only and counted_runs[0].quick
    (path,) = cert_dir.glob(f"{BACKEND}--*.json")
    cert = json.loads(path.read_text())
    assert (
        cert["ops_checked"] == [OP] and cert["models_passed"] and cert["key"]["backend"] == BACKEND
    )
    assert gate.ensure_certified(BACKEND, progress=False) == (OP,)
    assert len(counted_runs) == 1, "a valid certificate must be reused"

    real_discover = gate.discover_backends

    def new_release():
        backends = real_discover()
        backends[BACKEND].version = "0.0.2"
        return backends

    with monkeypatch.context() as patch:  # the gate and the suite see the new release
        patch.setattr(gate, "discover_backends", new_release)
        patch.setattr(runner, "discover_backends", new_release)
        assert gate.cached_demotions(BACKEND) is None
        assert gate.ensure_certified(BACKEND, progress=False) == (OP,)
        assert len(counted_runs) == 2, "a new plugin version must be certified again"
        assert gate.cached_demotions(BACKEND) == (OP,)
    assert gate.cached_demotions(BACKEND) is None  # back to 0.0.1: that certificate was replaced

    with monkeypatch.context() as patch:  # the same release on another CPU
        patch.setattr(gate, "device_name", lambda device: "Some Other CPU")
        patch.setattr(runner, "device_name", lambda device: "Some Other CPU")
        assert gate.cached_demotions(BACKEND) is None
        assert gate.ensure_certified(BACKEND, progress=False) == (OP,)
        assert len(counted_runs) == 3, "another device must be certified again"
        assert len(list(cert_dir.glob(f"{BACKEND}--*.json"))) == 2  # one file per device


def test_cert_dir_argument_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CERT_DIR_ENV, str(tmp_path / "env"))
    assert resolve_cert_dir() == tmp_path / "env"
    assert resolve_cert_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(CERT_DIR_ENV)
    assert resolve_cert_dir().parts[-3:] == (".cache", "chitu", "certs")


def test_certificate_is_invalid_when_any_key_field_changes(tmp_path):
    key = CertificateKey("vendor", "chitu-vendor", "1.0", "0.1.0", "2.13.0", "Some GPU")
    save(Certificate(key, "quick", ["linear"], [], ["linear"], ["linear"], True), tmp_path)
    assert load_valid(key, tmp_path).demote == ["linear"]
    for field in fields(CertificateKey):
        if field.name == "backend":
            continue  # another backend's certificate is another file
        changed = replace(key, **{field.name: _other(getattr(key, field.name))})
        assert load_valid(changed, tmp_path) is None, field.name


def _other(value):
    return value + 1 if isinstance(value, int) else value + "-changed"
