"""The NVIDIA kernels on a real GPU vs the exact dequantized reference, at DeepSeek-V3 shapes."""

from __future__ import annotations

import pytest
import torch
from interp_cases import CASES as CASE_NAMES  # every soft-FP8 numerics case (tests/kernels)

from chitu_core.quant import (
    FORMAT_FP8_BLOCK128,
    FORMAT_FP8_CHANNEL,
    FORMAT_UNQUANTIZED,
    quantize_block_fp8,
    quantize_channel_fp8,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.version.hip is not None, reason="needs an NVIDIA GPU"
    ),
]


@pytest.fixture(scope="module")
def cases():
    import interp_cases

    interp_cases.DEVICE = "cuda"
    return interp_cases


@pytest.mark.parametrize("use_ptx", [True, False], ids=["ptx", "portable"])
@pytest.mark.parametrize("case", list(CASE_NAMES))
def test_kernel_cases_on_gpu(cases, case, use_ptx):
    cases.USE_PTX = use_ptx
    cases.CASES[case]()


def _reference(x, w_deq, bias):
    torch.backends.cuda.matmul.allow_tf32 = False
    y = x.float() @ w_deq.T
    return y if bias is None else y + bias.float()


def _rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


# (K, N) of DeepSeek-V3 linears
SHAPES = [(7168, 18432), (18432, 7168), (7168, 2112), (1536, 24576), (7168, 129280)]


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 4, 16, 64, 96, 128, 256, 1024])
@pytest.mark.parametrize("path", ["soft", "native"])
def test_linear_block_fp8(k, n, m, path):
    """Both paths on the plugin's K-permuted weights (native permutes x alike)."""
    from chitu_nvidia import plugin

    if path == "native" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("native FP8 needs sm_89+")
    torch.manual_seed(0)
    w, s = quantize_block_fp8(torch.randn(n, k, device="cuda") * 0.02)
    h = plugin.chitu_prepare_weight(w, s, FORMAT_FP8_BLOCK128)
    x = torch.randn(m, k, device="cuda").bfloat16()
    bias = torch.randn(n, device="cuda").bfloat16()
    y = plugin._linear.linear(x, h, bias, native=path == "native")
    ref = _reference(x, h.as_quantized().dequantize(torch.float32), bias)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert not y.isnan().any()
    # soft: exact operands, bf16 output rounding; native: fp8 activations (~2^-4 per element)
    assert _rel_err(y, ref) < (4e-3 if path == "soft" else 4e-2)


@pytest.mark.parametrize("mode", ["auto", "soft", "native"])
def test_fp8_compute_modes_pick_their_path(mode):
    """A weight prepared under each --fp8-compute mode takes the path the dispatch table
    says at each M, with that path's numerics (native: the fp8_act class's e4m3 rounding)."""
    from chitu_nvidia import fp8_dispatch, plugin

    from chitu_core.backend_info import BackendOptions

    cap = torch.cuda.get_device_capability()
    if mode == "native" and cap < (8, 9):
        pytest.skip("native FP8 needs sm_89+")
    try:
        plugin.chitu_configure(BackendOptions(mode))
        torch.manual_seed(2)
        k, n = 4096, 6144
        w, s = quantize_block_fp8(torch.randn(n, k, device="cuda") * 0.02)
        h = plugin.chitu_prepare_weight(w, s, FORMAT_FP8_BLOCK128)
    finally:
        plugin.chitu_configure(BackendOptions())
    assert h.k_perm
    assert h.native_from_m == fp8_dispatch.native_from_m(mode, cap, FORMAT_FP8_BLOCK128, n, k)
    ref_w = h.as_quantized().dequantize(torch.float32)
    for m in (1, 64, 127, 128, 256):
        x = torch.randn(m, k, device="cuda").bfloat16()
        err = _rel_err(plugin.chitu_linear(x, h, None), _reference(x, ref_w, None))
        native = m >= h.native_from_m
        assert err < (4e-2 if native else 4e-3), (mode, m, err)
        if native:  # e4m3 activations: clearly above the soft path's bf16 rounding
            assert err > 5e-3, (mode, m, err)


@pytest.mark.parametrize("m", [0, 1, 33, 512])
def test_linear_channel_and_dense(m):
    from chitu_nvidia import plugin

    torch.manual_seed(1)
    k, n = 4096, 6144
    w = torch.randn(n, k, device="cuda") * 0.02
    x = torch.randn(m, k, device="cuda").bfloat16()
    wq, s = quantize_channel_fp8(w)
    h = plugin.chitu_prepare_weight(wq, s, FORMAT_FP8_CHANNEL)
    y = plugin.chitu_linear(x, h, None)
    assert y.shape == (m, n)
    if m:
        assert _rel_err(y, _reference(x, h.as_quantized().dequantize(), None)) < 4e-3
    d = plugin.chitu_prepare_weight(w.bfloat16(), None, FORMAT_UNQUANTIZED)
    yd = plugin.chitu_linear(x, d, None)
    if m:
        assert _rel_err(yd, _reference(x, w.bfloat16().float(), None)) < 4e-3


def test_memory_hooks():
    from chitu_nvidia import plugin

    dev = plugin.chitu_device(0)
    free, total = plugin.chitu_memory_info(dev)
    assert 0 < free <= total
    plugin.chitu_synchronize(dev)
    plugin.chitu_empty_cache(dev)
