"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixture_dists import install_fixture_distribution

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def test_plugins_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed ``chitu-test-plugins`` distribution."""
    return install_fixture_distribution(FIXTURES / "test_plugins", tmp_path_factory)
