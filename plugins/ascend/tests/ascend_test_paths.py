"""Paths shared by the Ascend plugin tests (a uniquely named module, not ``conftest``)."""

from __future__ import annotations

from pathlib import Path

FAKE_DIR = Path(__file__).parent / "fake_torch_npu"
PLUGIN_ROOT = Path(__file__).resolve().parents[1]
