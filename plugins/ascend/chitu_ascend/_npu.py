"""Lazy access to torch_npu: the plugin module is imported on machines without it.

``chitu plugins`` loads every backend's entry point to describe it, so no module
of this package imports torch_npu at import time; ops reach it through
``torch_npu()`` (one ``sys.modules`` lookup after the first call).
"""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def torch_npu() -> ModuleType:
    """The imported torch_npu module (importing it registers ``torch.npu`` and HCCL)."""
    import torch_npu as module

    return module
