"""Hygon plugin checks that need no DCU: hooks, handles, binding, fallbacks, `chitu plugins`."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import torch

from chitu_core import hookspecs
from chitu_core.backend import InstalledBackend, _register, bind_ops, native_op_names
from chitu_core.ops.moe import fused_moe as generic_fused_moe
from chitu_core.quant import FORMAT_FP8_BLOCK128, FORMAT_UNQUANTIZED, quantize_fp8

pytest.importorskip("triton")
from chitu_hygon import linear as hygon_linear  # noqa: E402
from chitu_hygon import plugin  # noqa: E402
from chitu_hygon.configs import SOFT_FP8_TABLES, soft_fp8_config, table_for  # noqa: E402

from chitu_core.kernels.packed_weight import PackedWeight  # noqa: E402


def _bound_ops():
    pm = _register(plugin, "hygon")
    backend = InstalledBackend(
        "hygon", "chitu-hygon", "0", info=pm.hook.chitu_backend_info(),
        native_ops=native_op_names(pm), plugin_manager=pm,
    )  # fmt: skip
    return bind_ops(backend)


def test_hookimpl_names_match_specs():
    for name, fn in vars(plugin).items():
        if name.startswith("chitu_") and callable(fn):
            impl_args = list(inspect.signature(fn).parameters)
            spec_args = list(inspect.signature(getattr(hookspecs, name)).parameters)
            assert set(impl_args) <= set(spec_args), name


def test_unavailable_without_a_hip_torch():
    if torch.version.hip is not None:
        pytest.skip("this torch is a ROCm/HIP build")
    reason = plugin.chitu_check_available()
    assert reason and "not a ROCm/HIP build" in reason


def test_chitu_plugins_reports_hygon_unavailable_with_reason():
    proc = subprocess.run(
        [sys.executable, "-m", "chitu_core.cli", "plugins", "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    row = next(r for r in json.loads(proc.stdout)["backends"] if r["name"] == "hygon")
    assert not row["load_error"], row["reason"]
    assert {"prepare_weight", "linear", "fused_moe", "memory_info"} <= set(row["native_ops"])
    if torch.version.hip is None:
        assert not row["available"]
        assert "is not a ROCm/HIP build" in row["reason"]


def test_prepare_weight_keeps_fp8_one_byte():
    q = quantize_fp8(torch.randn(300, 260))
    h = plugin.chitu_prepare_weight(q.weight, q.scale, FORMAT_FP8_BLOCK128)
    assert isinstance(h, PackedWeight)
    assert h.weight.dtype == torch.uint8 and h.weight.is_contiguous()
    assert torch.equal(h.weight, q.weight.view(torch.uint8))
    torch.testing.assert_close(h.as_quantized().dequantize(), q.dequantize())
    d = plugin.chitu_prepare_weight(torch.randn(8, 16).bfloat16(), None, FORMAT_UNQUANTIZED)
    assert d.weight.dtype == torch.bfloat16 and d.scale is None
    with pytest.raises(ValueError):
        plugin.chitu_prepare_weight(q.weight, None, FORMAT_FP8_BLOCK128)


def test_weight_group_binds_and_fused_moe_reads_its_own_handles():
    ops = _bound_ops()  # PluginLoadError if a consumer of prepare_weight's handles is missing
    assert {"prepare_weight", "linear", "fused_moe"} <= ops.native
    gen = torch.Generator().manual_seed(0)
    w13 = quantize_fp8(torch.randn(4, 256, 128, generator=gen) * 0.1)
    w2 = quantize_fp8(torch.randn(4, 128, 128, generator=gen) * 0.1)
    x = torch.randn(3, 128, generator=gen)
    weights = torch.rand(3, 2, generator=gen)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32)
    handles = [ops.prepare_weight(w.weight, w.scale, w.fmt) for w in (w13, w2)]
    out = ops.fused_moe(x, *handles, weights, ids)
    torch.testing.assert_close(out, generic_fused_moe(x, w13, w2, weights, ids))


def test_every_table_covers_every_m():
    for arch, table in SOFT_FP8_TABLES.items():
        assert [r.max_m for r in table] == sorted(r.max_m for r in table), arch
        assert table[-1].config.kind == "dequant", arch
        for m in (1, 2, 4, 5, 16, 17, 64, 65, 10_000):
            config = soft_fp8_config(arch, m)
            assert config.kind != "gemv" or m <= config.block_m, (arch, m, config)
            assert not config.fused_reduce, (arch, config)
            if config.kind != "dequant":  # the dequant path launches with fixed settings
                assert config.num_stages <= 2, (arch, config)
    assert table_for("gfx928:sramecc+:xnack-") is SOFT_FP8_TABLES["gfx928"]
    assert table_for("gfx1100") is SOFT_FP8_TABLES["gfx928"]  # unknown: the default table


def test_build_failure_falls_back_to_generic_once(monkeypatch):
    """A kernel the DCU's Triton cannot build: logged once, then the generic linear."""
    calls = []

    def failing_gemm(*args, **kwargs):
        calls.append(kwargs["config"])
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(hygon_linear, "fp8_gemm", failing_gemm)
    monkeypatch.setattr(hygon_linear, "UNSUPPORTED", {})
    q = quantize_fp8(torch.randn(64, 256))
    w = plugin.chitu_prepare_weight(q.weight, q.scale, q.fmt)
    x = torch.randn(2, 256).bfloat16()
    expected = torch.nn.functional.linear(x, q.dequantize(torch.bfloat16))
    for _ in range(2):
        y = plugin.chitu_linear(x, w, None)
        torch.testing.assert_close(y, expected)
    assert len(calls) == 1 and len(hygon_linear.UNSUPPORTED) == 1


def test_out_of_memory_is_not_swallowed(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("HIP out of memory")

    monkeypatch.setattr(hygon_linear, "fp8_gemm", oom)
    monkeypatch.setattr(hygon_linear, "UNSUPPORTED", {})
    q = quantize_fp8(torch.randn(64, 256))
    w = plugin.chitu_prepare_weight(q.weight, q.scale, q.fmt)
    with pytest.raises(torch.OutOfMemoryError):
        plugin.chitu_linear(torch.randn(1, 256).bfloat16(), w, None)
    assert not hygon_linear.UNSUPPORTED
