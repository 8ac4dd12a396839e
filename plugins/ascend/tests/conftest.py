"""Fixtures of the Ascend plugin tests: the FAKE torch_npu on the path, the bound ops.

Every test here checks the plugin's operator MAPPING against the fake torch_npu
module (``fake_torch_npu/torch_npu``: documented semantics in plain torch on the
CPU), not the hardware. The fake is put on ``sys.path`` per test module and
removed afterwards, so the rest of a pytest session still sees no torch_npu.
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from ascend_test_paths import FAKE_DIR, PLUGIN_ROOT

try:
    import chitu_ascend  # noqa: F401
except ImportError:  # the plugin is not installed: use the source tree
    sys.path.insert(0, str(PLUGIN_ROOT))


def _unload_fake() -> None:
    import chitu_ascend._npu
    import chitu_ascend.device

    for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
        del sys.modules[name]
    sys.modules.pop("torch.npu", None)
    if hasattr(torch, "npu"):
        delattr(torch, "npu")
    chitu_ascend._npu.torch_npu.cache_clear()
    chitu_ascend.device.npu_device = _REAL_NPU_DEVICE


def _real_npu_device():
    import chitu_ascend.device

    return chitu_ascend.device.npu_device


_REAL_NPU_DEVICE = _real_npu_device()


@pytest.fixture(scope="module")
def fake_npu():
    """The fake torch_npu module, importable as ``torch_npu`` for this test module."""
    sys.path.insert(0, str(FAKE_DIR))
    import torch_npu

    assert torch_npu.IS_FAKE
    yield torch_npu
    sys.path.remove(str(FAKE_DIR))
    _unload_fake()


@pytest.fixture(scope="module")
def ascend_ops(fake_npu):
    """The ascend backend bound as the engine binds it (discover, select, bind)."""
    from chitu_core.backend import bind_ops, discover_backends, select_backend

    return bind_ops(select_backend("ascend", discover_backends()))


@pytest.fixture(scope="module")
def ref_ops():
    """The oracle, cpu_ref."""
    from chitu_core.backend import bind_ops, discover_backends, select_backend

    return bind_ops(select_backend("cpu_ref", discover_backends()))


@pytest.fixture
def npu_calls(fake_npu, monkeypatch) -> Counter:
    """Counts calls of each fake operator (``npu_*``) during one test."""
    calls: Counter = Counter()
    for name in [n for n in vars(fake_npu) if n.startswith("npu_")]:
        original = getattr(fake_npu, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(fake_npu, name, spy)
    return calls
