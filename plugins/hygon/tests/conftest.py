"""Make ``chitu_hygon`` importable from the source tree when the plugin is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

_PLUGIN_ROOT = Path(__file__).resolve().parents[1]
try:
    import chitu_hygon  # noqa: F401
except ImportError:
    sys.path.insert(0, str(_PLUGIN_ROOT))
