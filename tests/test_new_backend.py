"""``chitu new-backend``: names are validated, and the generated package installs, is listed
by ``chitu plugins`` and passes ``chitu conformance --quick`` as generated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixture_dists import install_fixture_distribution

from chitu_core.cli import main
from chitu_core.contract import suggested_range
from chitu_core.scaffold import new_backend

NAME = "scaffoldcheck"


def _chitu(*args: str, site: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run the chitu CLI in a fresh process that sees the distributions installed in ``site``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "chitu_core", *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize(
    "name,message",
    [
        ("MyChip", "invalid backend name"),
        ("my-chip", "invalid backend name"),
        ("1chip", "invalid backend name"),
        ("class", "invalid backend name"),
        ("auto", "reserved"),
        ("cpu_ref", "already installed"),
        ("core", "module chitu_core already exists"),
    ],
)
def test_bad_names_are_refused_with_a_reason(name, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        new_backend(name, tmp_path)
    assert not any(tmp_path.iterdir()), "nothing is written for a refused name"


def test_cli_reports_errors_and_never_overwrites(tmp_path, capsys):
    assert main(["new-backend", "Bad-Name", "--dir", str(tmp_path)]) == 2
    assert "invalid backend name 'Bad-Name'" in capsys.readouterr().err
    assert main(["new-backend", NAME, "--dir", str(tmp_path)]) == 0
    assert f"chitu conformance --backend {NAME} --quick" in capsys.readouterr().out
    assert main(["new-backend", NAME, "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_generated_backend_installs_lists_and_passes_quick_conformance(tmp_path, tmp_path_factory):
    root = new_backend(NAME, tmp_path / "src")
    assert root.name == f"chitu-{NAME}"
    package = root / f"chitu_{NAME}"
    for path in ("pyproject.toml", "README.md", "tests/test_conformance.py"):
        assert (root / path).is_file(), path
    assert f'{NAME} = "chitu_{NAME}.plugin"' in (root / "pyproject.toml").read_text()
    plugin_source = (package / "plugin.py").read_text()
    compile(plugin_source, "plugin.py", "exec")
    # Written against this Chitu's contract: it declares the range that admits it.
    assert f'contract="{suggested_range()}"' in plugin_source

    site = install_fixture_distribution(root, tmp_path_factory)
    listed = _chitu("plugins", "--json", site=site, timeout=120)
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in json.loads(listed.stdout)["backends"] if r["name"] == NAME)
    assert row["available"] and row["distribution"] == f"chitu-{NAME}", row
    assert {"prepare_weight", "linear", "fused_moe", "rms_norm"} <= set(row["native_ops"])

    out, certs = tmp_path / "report", tmp_path / "certs"
    run = _chitu(
        "conformance", "--backend", NAME, "--quick", "--no-timing", "--no-progress",
        "--out", str(out), "--cert-dir", str(certs), site=site, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert f"PASS: backend {NAME} 0.1.0" in run.stdout
    assert (out / "report.md").is_file()
    (cert,) = certs.glob(f"{NAME}--*.json")
    assert json.loads(cert.read_text())["demote"] == []
