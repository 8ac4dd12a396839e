"""Installing the test-only plugin distributions of tests/fixtures (shared by conftests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def install_fixture_distribution(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install a test-only distribution (real entry points) into a fresh temporary directory.

    pip ``--target`` keeps it out of the environment: only a test that puts the
    directory on ``sys.path`` (or ``PYTHONPATH``) sees its backends.
    """
    target = tmp_path_factory.mktemp(f"{source.name}_site")
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
            str(source),
        ],
        check=True,
    )
    return target
