"""Shared test fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def test_plugins_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed ``chitu-test-plugins`` distribution (real entry points).

    Installed with pip into a temporary target, so the environment itself never
    sees the test backends.
    """
    target = tmp_path_factory.mktemp("test_plugins_site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(FIXTURES / "test_plugins"),
        ],
        check=True,
    )
    return target
