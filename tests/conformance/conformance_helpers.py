"""Fixtures of the conformance tests: the broken test backends, installed out of the env."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
from fixture_dists import install_fixture_distribution

from conformance.cli import add_conformance_command

BROKEN_BACKENDS = Path(__file__).parents[1] / "fixtures" / "broken_backends"

# backend -> the one op it breaks (see tests/fixtures/broken_backends/chitu_broken/)
BROKEN_OPS = {
    "broken_gemm": "linear",
    "broken_moe": "fused_moe",
    "broken_attention": "paged_attention_decode",
    "broken_router": "moe_route",
    "broken_allreduce": "all_reduce",
}


@pytest.fixture(scope="session")
def broken_backends_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed ``chitu-broken-backends`` distribution."""
    return install_fixture_distribution(BROKEN_BACKENDS, tmp_path_factory)


@pytest.fixture
def broken_backends(broken_backends_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The broken backends on ``sys.path`` (and so in ``discover_backends()``) for one test."""
    monkeypatch.syspath_prepend(str(broken_backends_dir))
    yield broken_backends_dir
    for name in [m for m in sys.modules if m == "chitu_broken" or m.startswith("chitu_broken.")]:
        sys.modules.pop(name, None)


@pytest.fixture
def cert_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private certificate directory (also as $CHITU_CERT_DIR, so no test writes to ~)."""
    path = tmp_path / "certs"
    monkeypatch.setenv("CHITU_CERT_DIR", str(path))
    return path


def run_command(*argv: str) -> int:
    """Parse ``argv`` as ``chitu conformance ...`` and run the command in this process."""
    parser = argparse.ArgumentParser(prog="chitu")
    add_conformance_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["conformance", *argv])
    return args.func(args)
