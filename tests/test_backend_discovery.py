"""Discovery, selection and binding through real entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from chitu_core import hookspecs
from chitu_core.backend import (
    OP_NAMES,
    _register,
    bind_ops,
    discover_backends,
    load_backend,
    select_backend,
)
from chitu_core.backend_info import BackendInfo
from chitu_core.errors import (
    BackendUnavailableError,
    PluginLoadError,
    PluginSignatureError,
    UnknownBackendError,
)
from chitu_core.ops import GENERIC_OPS
from chitu_core.quant import quantize_fp8


@pytest.fixture()
def with_test_plugins(test_plugins_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(test_plugins_dir))
    yield test_plugins_dir
    for name in (
        "chitu_test_linear_only",
        "chitu_test_broken",
        "chitu_test_bad_signature",
        "chitu_test_old_contract",
    ):
        sys.modules.pop(name, None)


def test_every_spec_is_an_op_or_required():
    specs = {
        n for n in vars(hookspecs) if n.startswith("chitu_") and callable(getattr(hookspecs, n))
    }
    assert {"chitu_" + op for op in OP_NAMES} | {
        "chitu_backend_info",
        "chitu_check_available",
        "chitu_configure",  # a lifecycle hook, called once at bind time
    } == specs
    assert set(GENERIC_OPS) == set(OP_NAMES), "every op needs a generic implementation"


def test_every_spec_documents_itself():
    for op in OP_NAMES:
        doc = getattr(hookspecs, "chitu_" + op).__doc__
        assert doc and len(doc.strip()) > 40, f"chitu_{op} needs a docstring stating its contract"


def test_shipped_backends_are_discovered():
    backends = discover_backends()
    for name in ("cpu_ref", "nvidia", "ascend", "hygon"):
        assert name in backends, f"{name} is not installed: pip install -e plugins/{name}"
        assert backends[name].load_error is None
    assert backends["cpu_ref"].is_available
    if not torch.cuda.is_available():
        assert "CUDA" in backends["nvidia"].unavailable_reason
    assert "torch_npu" in backends["ascend"].unavailable_reason or backends["ascend"].is_available


def test_unknown_backend_lists_installed():
    with pytest.raises(UnknownBackendError, match="installed backends: .*cpu_ref"):
        select_backend("nope", discover_backends())


def test_unavailable_backend_gives_reason():
    backends = discover_backends()
    if backends["ascend"].is_available:
        pytest.skip("an Ascend NPU is present")
    with pytest.raises(BackendUnavailableError, match="'ascend' is not available: torch_npu"):
        select_backend("ascend", backends)


def test_linear_only_plugin_falls_back_for_the_rest(with_test_plugins):
    backends = discover_backends()
    backend = backends["test_linear_only"]
    assert backend.is_available
    assert backend.native_ops == ("linear",)
    ops = bind_ops(backend)
    assert ops.native == {"linear"}
    assert ops.rms_norm is GENERIC_OPS["rms_norm"]
    assert ops.prepare_weight is GENERIC_OPS["prepare_weight"]

    import chitu_test_linear_only

    before = chitu_test_linear_only.CALLS["linear"]
    q = quantize_fp8(torch.randn(300, 200))
    x, bias = torch.randn(3, 200), torch.randn(300)
    y = ops.linear(x, ops.prepare_weight(q.weight, q.scale, q.fmt), bias)
    assert chitu_test_linear_only.CALLS["linear"] == before + 1, "the bound op must be the plugin's"
    torch.testing.assert_close(y, x @ q.dequantize().T + bias, rtol=1e-5, atol=1e-4)


def test_broken_and_bad_plugins_are_named_and_others_still_load(with_test_plugins):
    backends = discover_backends()
    assert backends["cpu_ref"].is_available
    assert "simulated: libvendor.so not found" in backends["test_broken"].load_error
    assert "ImportError" in backends["test_broken"].load_error
    bad = backends["test_bad_signature"].load_error
    assert "PluginSignatureError" in bad and "chitu_linear" in bad
    with pytest.raises(PluginLoadError, match="test_broken.*failed to load.*libvendor"):
        select_backend("test_broken", backends)
    with pytest.raises(PluginLoadError, match="chitu_linear"):
        select_backend("test_bad_signature", backends)


def test_auto_skips_broken_and_picks_highest_priority(with_test_plugins):
    ops = load_backend("auto")
    # Without an accelerator the serving CPU backend (10) wins; cpu_ref (0), the oracle, and
    # test_linear_only (-100) are chosen only by name.
    expected = "nvidia" if torch.cuda.is_available() else "cpu"
    assert ops.info.name == expected


class _MinimalPlugin:
    """The two required hooks; in-process test plugins add the hook under test."""

    @hookspecs.hookimpl
    def chitu_backend_info(self):
        return BackendInfo(name="x", device_type="cpu", dist_backend="gloo")

    @hookspecs.hookimpl
    def chitu_check_available(self):
        return None


def test_wrong_signature_raises_named_error():
    class Plugin(_MinimalPlugin):
        @hookspecs.hookimpl
        def chitu_rms_norm(self, x, weight, epsilon):
            return x

    with pytest.raises(PluginSignatureError, match="epsilon"):
        _register(Plugin(), "x")


def test_unknown_hook_name_is_rejected():
    class Plugin(_MinimalPlugin):
        @hookspecs.hookimpl
        def chitu_rmsnorm(self, x):  # typo of chitu_rms_norm
            return x

    with pytest.raises(PluginSignatureError, match="chitu_rmsnorm"):
        _register(Plugin(), "x")


def test_subset_implementation_is_called_with_its_arguments():
    seen = {}

    class Plugin(_MinimalPlugin):
        @hookspecs.hookimpl
        def chitu_rms_norm(self, x, eps):  # ignores weight
            seen["eps"] = eps
            return x * 2

    from chitu_core.backend import InstalledBackend, native_op_names

    pm = _register(Plugin(), "x")
    backend = InstalledBackend(
        "x",
        "d",
        "0",
        info=pm.hook.chitu_backend_info(),
        native_ops=native_op_names(pm),
        plugin_manager=pm,
    )
    ops = bind_ops(backend)
    out = ops.rms_norm(torch.ones(2, 3), torch.ones(3), 1e-6)
    assert seen["eps"] == 1e-6 and torch.equal(out, torch.full((2, 3), 2.0))


def test_demote_replaces_native_with_generic():
    backend = discover_backends()["cpu_ref"]
    ops = bind_ops(backend, demote=["rms_norm"])
    assert ops.rms_norm is GENERIC_OPS["rms_norm"] and "rms_norm" in ops.demoted
    # prepare_weight's handle is shared: demoting linear demotes the whole weight group.
    ops = bind_ops(backend, demote=["linear"])
    assert {"linear", "prepare_weight", "fused_moe"} <= ops.demoted
    with pytest.raises(ValueError, match="unknown op"):
        bind_ops(backend, demote=["linaer"])


def _run_cli(*args, extra_path=None):
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "chitu_core", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_chitu_plugins_cli_reports_fallbacks_and_errors(test_plugins_dir):
    proc = _run_cli("plugins", "--json", extra_path=test_plugins_dir)
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)["backends"]}
    assert rows["cpu_ref"]["available"]
    assert rows["test_linear_only"]["native_ops"] == ["linear"]
    assert "rms_norm" in rows["test_linear_only"]["generic_ops"]
    assert rows["test_broken"]["load_error"] and "libvendor" in rows["test_broken"]["reason"]
    assert not rows["nvidia"]["available"] or torch.cuda.is_available()

    table = _run_cli("plugins", extra_path=test_plugins_dir)
    assert table.returncode == 0
    assert "test_broken" in table.stdout and "BROKEN" in table.stdout
    assert "linear" in table.stdout


def test_chitu_cli_error_for_unknown_backend():
    proc = _run_cli("demo", "--backend", "nope")
    assert proc.returncode == 2
    assert "unknown backend 'nope'" in proc.stderr and "cpu_ref" in proc.stderr


def test_group_handle_ops_bind_and_demote_together():
    class Plugin(_MinimalPlugin):
        @hookspecs.hookimpl
        def chitu_new_group(self, ranks, timeout_s):
            return ("my-group", ranks)

        @hookspecs.hookimpl
        def chitu_all_reduce(self, tensor, group):
            return tensor

    from chitu_core.backend import COLLECTIVE_OPS, COMPOSED_OPS, InstalledBackend, native_op_names

    pm = _register(Plugin(), "x")
    backend = InstalledBackend(
        "x",
        "d",
        "0",
        info=pm.hook.chitu_backend_info(),
        native_ops=native_op_names(pm),
        plugin_manager=pm,
    )
    # new_group without every collective: the generic ones could not read its group handle.
    with pytest.raises(PluginLoadError, match="implements new_group but not"):
        bind_ops(backend)
    # Demoting one member demotes the whole group: everything falls back to torch.distributed.
    ops = bind_ops(backend, demote=["all_reduce"])
    assert ops.new_group is GENERIC_OPS["new_group"]
    assert {"new_group", "all_reduce"} <= ops.demoted
    # (the fused op too: it composes all_reduce and add_rms_norm, both generic here)
    assert all(getattr(ops, op) is GENERIC_OPS[op] for op in COLLECTIVE_OPS)
    assert set(COMPOSED_OPS) <= set(COLLECTIVE_OPS)


def test_composed_op_uses_the_backends_own_ops():
    """A backend with its own new_group/all_reduce/add_rms_norm but no fused
    all_reduce_add_rms_norm binds (the fused op is optional) and gets the composition of
    its OWN two ops: they read its group handle, and the result is their result."""
    calls = []

    class Plugin:
        @hookspecs.hookimpl
        def chitu_backend_info(self):
            return BackendInfo(name="y", device_type="cpu", dist_backend="gloo")

        @hookspecs.hookimpl
        def chitu_check_available(self):
            return None

        @hookspecs.hookimpl
        def chitu_new_group(self, ranks, timeout_s):
            return ("my-group", ranks)

        @hookspecs.hookimpl
        def chitu_all_reduce(self, tensor, group):
            assert group[0] == "my-group"
            calls.append("all_reduce")
            return tensor * 2  # a world of two equal ranks

        @hookspecs.hookimpl
        def chitu_add_rms_norm(self, x, residual, weight, eps):
            calls.append("add_rms_norm")
            return GENERIC_OPS["add_rms_norm"](x, residual, weight, eps)

    for op in ("all_gather", "reduce_scatter", "send", "recv"):
        setattr(Plugin, f"chitu_{op}", hookspecs.hookimpl(lambda self, *a: None))
    from chitu_core.backend import InstalledBackend, native_op_names

    pm = _register(Plugin(), "y")
    backend = InstalledBackend(
        "y", "d", "0", info=pm.hook.chitu_backend_info(), native_ops=native_op_names(pm),
        plugin_manager=pm,
    )  # fmt: skip
    ops = bind_ops(backend)
    assert "all_reduce_add_rms_norm" not in ops.native
    x, residual, weight = torch.randn(3, 8), torch.randn(3, 8), torch.rand(8) + 0.5
    normed, summed = ops.all_reduce_add_rms_norm(
        x.clone(), residual, weight, 1e-6, ops.new_group([0, 1], 5.0)
    )
    assert calls == ["all_reduce", "add_rms_norm"]
    torch.testing.assert_close(summed, residual + 2 * x)
    ref = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(normed, ref)
