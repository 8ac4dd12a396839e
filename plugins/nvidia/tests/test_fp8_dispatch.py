"""``--fp8-compute`` on the NVIDIA plugin without a GPU: the dispatch table, the handles,
the declared paths, and the K-permuted activation quantization under the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from chitu_core.backend_info import BackendOptions
from chitu_core.quant import (
    FORMAT_FP8_BLOCK128,
    FORMAT_FP8_CHANNEL,
    FORMAT_UNQUANTIZED,
    quantize_block_fp8,
)

pytest.importorskip("triton")
from chitu_nvidia import fp8_dispatch, plugin  # noqa: E402
from chitu_nvidia.fp8_dispatch import NEVER, native_from_m  # noqa: E402

HOPPER, ADA, AMPERE, A10 = (9, 0), (8, 9), (8, 0), (8, 6)
LLAMA_SHAPES = [(4096, 6144), (4096, 28672), (14336, 4096), (4096, 128256)]  # (K, N)


@pytest.mark.parametrize("k,n", LLAMA_SHAPES)
def test_auto_on_hopper_is_soft_below_the_crossover_and_native_from_it(k, n):
    from_m = native_from_m("auto", HOPPER, FORMAT_FP8_BLOCK128, n, k)
    assert from_m == 128  # the measured crossover (fp8_dispatch.NATIVE_FROM_M)
    for m, path in ((1, "soft"), (64, "soft"), (127, "soft"), (128, "native"), (4096, "native")):
        assert ("native" if m >= from_m else "soft") == path


@pytest.mark.parametrize("capability", [AMPERE, A10])
@pytest.mark.parametrize("mode", ["auto", "soft"])
def test_ampere_is_soft_only(capability, mode):
    for k, n in LLAMA_SHAPES:
        assert native_from_m(mode, capability, FORMAT_FP8_BLOCK128, n, k) == NEVER


def test_modes_and_formats():
    fmt = FORMAT_FP8_BLOCK128
    assert native_from_m("soft", HOPPER, fmt, 4096, 4096) == NEVER
    assert native_from_m("native", HOPPER, fmt, 4096, 4096) == 0  # every M
    assert native_from_m("native", ADA, fmt, 4096, 4096) == 0
    assert native_from_m("auto", ADA, fmt, 4096, 4096) == 128
    # no native path for per-channel weights nor for experts (no native fused MoE yet)
    assert native_from_m("native", HOPPER, FORMAT_FP8_CHANNEL, 4096, 4096) == NEVER
    assert native_from_m("native", HOPPER, fmt, 4096, 4096, is_experts=True) == NEVER
    # a later arch takes the nearest table below it (sm_100 -> sm_90's rows)
    assert native_from_m("auto", (10, 0), fmt, 4096, 4096) == 128


def test_native_mode_needs_fp8_hardware():
    fp8_dispatch.check_mode(BackendOptions("native"), HOPPER)
    fp8_dispatch.check_mode(BackendOptions("auto"), AMPERE)
    with pytest.raises(ValueError, match="sm_89.*auto or soft"):
        fp8_dispatch.check_mode(BackendOptions("native"), AMPERE)


def test_declared_paths():
    """Only a mode that can quantize activations declares the fp8_act class."""
    assert not any(p.fp8_activations for p in fp8_dispatch.describe("soft", HOPPER).values())
    assert not any(p.fp8_activations for p in fp8_dispatch.describe("auto", AMPERE).values())
    auto = fp8_dispatch.describe("auto", HOPPER)
    assert auto["linear"].fp8_activations and "from M 128" in auto["linear"].description
    assert not auto["fused_moe"].fp8_activations  # MoE stays soft
    assert fp8_dispatch.describe("native", HOPPER)["linear"].fp8_activations


def test_prepare_weight_keeps_cpu_weights_soft():
    """Off the GPU (the generic view, tests) a handle never takes the native path, and
    unquantized weights have nothing to choose."""
    w, s = quantize_block_fp8(torch.randn(256, 256))
    assert plugin.chitu_prepare_weight(w, s, FORMAT_FP8_BLOCK128).native_from_m == NEVER
    d = plugin.chitu_prepare_weight(torch.randn(8, 16), None, FORMAT_UNQUANTIZED)
    assert d.native_from_m == NEVER


def test_prepare_weight_folds_the_mode_into_the_handle(monkeypatch):
    """On a (faked) Hopper GPU the configured mode decides each handle's crossover."""
    w, s = quantize_block_fp8(torch.randn(256, 384))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: HOPPER)
    monkeypatch.setattr(plugin, "_has_cuda_device", lambda: True)

    class CudaLike:  # prepare_weight reads only .device.type, .shape, .dim() before packing
        def __init__(self, t):
            self.t, self.shape, self.device = t, t.shape, torch.device("cuda", 0)

        def dim(self):
            return self.t.dim()

    real_pack = plugin.pack_weight
    monkeypatch.setattr(plugin, "pack_weight", lambda wt, *a, **kw: real_pack(wt.t, *a, **kw))
    try:
        for mode, want in (("auto", 128), ("native", 0), ("soft", NEVER)):
            paths = plugin.chitu_configure(BackendOptions(mode))
            assert paths["linear"].fp8_activations == (mode != "soft")
            h = plugin.chitu_prepare_weight(CudaLike(w), s, FORMAT_FP8_BLOCK128)
            assert h.native_from_m == want and h.k_perm, mode
    finally:
        plugin.chitu_configure(BackendOptions())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: AMPERE)
    with pytest.raises(ValueError, match="sm_89"):
        plugin.chitu_configure(BackendOptions("native"))


_INTERP_SCRIPT = textwrap.dedent(
    """
    import torch
    from chitu_core.kernels.fp8_gemm import permute_k
    from chitu_nvidia.native_fp8 import act_quant

    torch.manual_seed(0)
    for m, k in ((3, 400), (2, 256), (1, 48)):
        x = torch.randn(m, k).bfloat16()
        q0, s0 = act_quant(x, False)
        q1, s1 = act_quant(x, True)
        assert torch.equal(s0, s1), (m, k)
        assert torch.equal(permute_k(q0.view(torch.uint8)), q1.view(torch.uint8)), (m, k)
        deq = q0.float().reshape(m, -1)
        groups = torch.nn.functional.pad(deq, (0, -k % 128)).reshape(m, -1, 128)
        back = (groups * s0[..., None]).reshape(m, -1)[:, :k]
        err = ((back - x.float()).norm() / x.float().norm()).item()
        # a sanity bound: the interpreter's e4m3 conversion does not round to nearest as
        # the GPU does (6.1e-2 measured here); GPU numerics: test_gpu_linear.py
        assert err < 0.1, err
    print("ok")
    """
)


def test_act_quant_k_perm_under_interpreter():
    """x quantized into the K-permuted order is the K-order quantization permuted by
    ``permute_k``, with the same 1x128 scales: the dot product with a K-permuted weight
    is unchanged (why native W8A8 can share the soft path's weight layout)."""
    root = Path(__file__).resolve().parents[3]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "plugins" / "nvidia")])
    proc = subprocess.run(
        [sys.executable, "-c", _INTERP_SCRIPT], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
