"""``chitu new-backend NAME``: write a backend plugin package that runs as generated.

The package is a distribution ``chitu-NAME`` (import ``chitu_NAME``) that
registers ``chitu_NAME.plugin`` under entry point ``NAME`` in the group
``chitu.backends``. Its ``plugin.py`` has the two required hooks and a handful
of op hooks, each delegating to the generic op of ``chitu_core.ops``: on the
default device type "cpu" it installs, shows up in ``chitu plugins`` and passes
``chitu conformance --backend NAME --quick`` before any kernel is written. The
vendor then replaces one body at a time with a kernel.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import keyword
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

import chitu_core
from chitu_core.backend import ENTRY_POINT_GROUP
from chitu_core.contract import suggested_range
from chitu_core.hookspecs import CONTRACT_VERSION

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
# Names the CLI gives a meaning of its own.
RESERVED_NAMES = frozenset({"auto"})
# torch.distributed backend of the device types we know; others start with gloo.
DIST_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl", "xpu": "xccl"}


@dataclass(frozen=True)
class BackendSkeleton:
    """What ``write_backend`` fills the templates with (validated by ``new_backend``)."""

    name: str  # entry-point / backend name: "foo"
    device_type: str  # torch device type: "cpu", "cuda", "npu"...

    @property
    def package(self) -> str:
        return f"chitu_{self.name}"

    @property
    def distribution(self) -> str:
        return f"chitu-{self.name.replace('_', '-')}"


def check_name(name: str) -> None:
    """Raise ``ValueError`` saying what to do unless ``name`` can name a new backend.

    A backend name is lowercase letters, digits and ``_``, starting with a letter
    (it is also part of a Python package name), is not a Python keyword, not
    ``auto``, not the name of an installed backend, and ``chitu_NAME`` must not
    already be an importable module.
    """
    if not _NAME_RE.fullmatch(name) or keyword.iskeyword(name):
        raise ValueError(
            f"invalid backend name {name!r}: use lowercase letters, digits and '_', "
            "starting with a letter (it becomes the package chitu_NAME), e.g. 'mychip'"
        )
    if name in RESERVED_NAMES:
        raise ValueError(f"backend name {name!r} is reserved ('--backend auto'); pick another")
    installed = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if name in installed:
        dist = installed[name].dist
        raise ValueError(
            f"a backend named {name!r} is already installed (distribution "
            f"{dist.name if dist else '?'}); installed backends: {', '.join(sorted(installed))}; "
            "pick another name"
        )
    if importlib.util.find_spec(f"chitu_{name}") is not None:
        raise ValueError(
            f"module chitu_{name} already exists in this environment; pick another backend name"
        )


def check_device_type(device_type: str) -> None:
    """Raise ``ValueError`` unless ``device_type`` is a plain torch device type name."""
    if not _NAME_RE.fullmatch(device_type):
        raise ValueError(
            f"invalid device type {device_type!r}: a torch device type such as "
            f"{', '.join(DIST_BACKENDS)}"
        )


def new_backend(name: str, directory: str | Path = ".", device_type: str = "cpu") -> Path:
    """Validate, then write the package into ``directory/chitu-NAME``; returns that path.

    Raises ``ValueError`` for a bad name or device type, or when the target
    directory already exists (nothing is overwritten).
    """
    check_name(name)
    check_device_type(device_type)
    skeleton = BackendSkeleton(name, device_type)
    root = Path(directory) / skeleton.distribution
    if root.exists():
        raise ValueError(f"{root} already exists; remove it or pass another --dir")
    write_backend(skeleton, root)
    return root


def write_backend(skeleton: BackendSkeleton, root: Path) -> list[Path]:
    """Write every file of the package under ``root``; returns the paths written."""
    fields = {
        "name": skeleton.name,
        "package": skeleton.package,
        "distribution": skeleton.distribution,
        "device_type": skeleton.device_type,
        "dist_backend": DIST_BACKENDS.get(skeleton.device_type, "gloo"),
        # Below cpu_ref (0) on the host, so that 'auto' keeps picking the oracle there.
        "priority": -10 if skeleton.device_type == "cpu" else 50,
        "compute_dtype": "float32" if skeleton.device_type == "cpu" else "bfloat16",
        "chitu_version": chitu_core.__version__,
        # The contract this Chitu implements: the generated hooks are written against it.
        "contract": suggested_range(),
        "contract_version": CONTRACT_VERSION,
    }
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{skeleton.package}/__init__.py": INIT,
        f"{skeleton.package}/plugin.py": PLUGIN,
        "tests/test_conformance.py": TEST_CONFORMANCE,
    }
    written = []
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template).substitute(fields))
        written.append(path)
    return written


# ------------------------------------------------------------------------------ templates
# string.Template fields: $name, $package, $distribution, $device_type, $dist_backend,
# $priority, $compute_dtype, $chitu_version, $contract, $contract_version.

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "$distribution"
version = "0.1.0"
description = "Chitu backend '$name'"
requires-python = ">=3.10"
dependencies = ["chitu>=$chitu_version"]

[project.optional-dependencies]
test = ["pytest>=7"]

# How Chitu finds the backend: entry point '$name' in the group 'chitu.backends'.
[project.entry-points."chitu.backends"]
$name = "$package.plugin"

[tool.setuptools.packages.find]
include = ["$package*"]

[tool.ruff]
line-length = 100
"""

INIT = '''"""Chitu backend '$name' (generated by ``chitu new-backend``)."""

__version__ = "0.1.0"
'''

PLUGIN = '''"""Hook implementations of the Chitu backend '$name' (entry point ``$name``).

Generated by ``chitu new-backend``. The contract of every hook (arguments,
shapes, dtypes, tolerance) is in ``chitu_core/hookspecs.py``. As generated,
each op hook below calls the generic pure-torch op of ``chitu_core.ops``, so
the backend runs and passes conformance before any kernel exists. Replace one
body at a time with your kernel and rerun
``chitu conformance --backend $name --quick``. A hook you delete gets the
generic op (``chitu plugins`` marks native ops N, generic ones ``.``).
"""

from __future__ import annotations

from typing import Any

import torch
from chitu_core.backend_info import BackendInfo
from chitu_core.hookspecs import hookimpl
from chitu_core.ops import attention, linear, moe, small

# The torch device type the kernels run on ("cuda", "npu", "xpu"...). "cpu" runs anywhere.
DEVICE_TYPE = "$device_type"


# ------------------------------------------------------------------ required: describe


@hookimpl
def chitu_backend_info() -> BackendInfo:
    """Cheap and device-free: ``chitu plugins`` calls it on machines without the hardware."""
    return BackendInfo(
        name="$name",  # must equal the entry-point name in pyproject.toml
        device_type=DEVICE_TYPE,
        dist_backend="$dist_backend",  # torch.distributed backend of the collectives
        priority=$priority,  # 'chitu serve --backend auto' picks the highest available
        compute_dtype="$compute_dtype",  # the activation dtype models run in here
        # Hook contract versions these hooks follow (written for $contract_version); a Chitu
        # outside the range refuses to load the plugin and names the hooks that changed.
        contract="$contract",
    )


@hookimpl
def chitu_check_available() -> str | None:
    """None when usable here, else one line saying what is missing. Never raises."""
    if DEVICE_TYPE == "cpu":
        return None
    module = getattr(torch, DEVICE_TYPE, None)
    if module is None:
        return f"torch has no '{DEVICE_TYPE}' module (install the torch extension for it)"
    if not module.is_available():
        return f"no {DEVICE_TYPE} device visible"
    return None


# ------------------------------------------------------------------ weights and GeMM
# prepare_weight makes an opaque handle that linear and fused_moe consume, so the three
# are bound (and demoted) together: implement all three or none.


@hookimpl
def chitu_prepare_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> Any:
    """Repack a loaded weight once, at load time (e.g. into your GEMM's layout)."""
    return linear.prepare_weight(weight, scale, fmt)


@hookimpl
def chitu_linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """``y = x @ W^T + bias`` for bf16 and FP8 (block-128, per-channel) weights: your GEMM."""
    return linear.linear(x, weight, bias)


@hookimpl
def chitu_fused_moe(
    x: torch.Tensor, w13: Any, w2: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts over the handles of ``chitu_prepare_weight``: your fused MoE."""
    return moe.fused_moe(x, w13, w2, topk_weights, topk_ids)


# ------------------------------------------------------------------ attention


@hookimpl
def chitu_paged_attention_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over the paged KV cache: your decode attention."""
    return attention.paged_attention_decode(
        q, key_cache, value_cache, block_tables, context_lens, scale
    )


# ------------------------------------------------------------------ small ops


@hookimpl
def chitu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return small.rms_norm(x, weight, eps)


@hookimpl
def chitu_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return small.silu_and_mul(x)


# The other hooks of chitu_core/hookspecs.py get the generic op until you add them here:
# device, memory_info, allocate_kv_cache, synchronize, empty_cache, capture_graph,
# moe_route, store_kv, paged_attention_prefill, mla_prefill, mla_decode, add_rms_norm,
# rope, sample, and new_group with all_reduce, all_gather, reduce_scatter, send, recv
# (bound together, like the weight group).
'''

TEST_CONFORMANCE = '''"""The Chitu conformance suite (quick) on backend '$name', against the CPU reference."""

from __future__ import annotations

from conformance.runner import SuiteConfig, run_suite


def test_quick_conformance():
    result = run_suite(SuiteConfig(backend="$name", quick=True, timing=False, progress=False))
    assert result.passed, "\\n".join(result.failures)
'''

README = """\
# $distribution: the Chitu backend '$name'

Generated by `chitu new-backend $name`. The package registers the module
`$package.plugin` under the entry point `$name` (group `chitu.backends`, see
`pyproject.toml`); Chitu finds the backend once the package is installed.
Device type: `$device_type` (`DEVICE_TYPE` in `$package/plugin.py`).

## Try it

```bash
pip install -e .                              # from this directory
chitu plugins                                 # '$name' is listed, its ops marked N
chitu conformance --backend $name --quick     # numerics vs the CPU reference, then a certificate
pytest tests                                  # the same suite as a test
```

## Add your kernels

Every op hook in `$package/plugin.py` calls the generic op of `chitu_core.ops`.
Replace one body at a time with your kernel and rerun the conformance suite; the
contract of each hook is in `chitu_core/hookspecs.py`. A deleted hook gets the
generic implementation. `prepare_weight`, `linear` and `fused_moe` share the
weight handle and are implemented (and demoted) together, as are `new_group`
and the collectives.

`chitu serve --backend $name` serves only with a valid certificate for this
device: without one it runs the quick suite first, and an op that fails is
served by its generic implementation.
"""
