"""Make ``chitu_nvidia`` importable from the source tree when the plugin is not installed,
and the core's kernel test helpers and cases (``tests/kernels``) importable here."""

from __future__ import annotations

import sys
from pathlib import Path

_PLUGIN_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_PLUGIN_ROOT.parents[1] / "tests" / "kernels"))
try:
    import chitu_nvidia  # noqa: F401
except ImportError:
    sys.path.insert(0, str(_PLUGIN_ROOT))
