"""The Hygon plugin's linear path under Triton's CPU interpreter, against cpu_ref.

Not collected by pytest (no ``test_`` prefix): ``test_hygon_interpreter.py`` runs
each case in a fresh subprocess with ``TRITON_INTERPRET=1`` set before triton is
imported. The kernels, configs and launch code are those a DCU runs
(``use_ptx=False``, split-K partials summed by the second kernel); what differs is
the device and ``DOT_IN_FP32`` (the interpreter gets bf16 ``tl.dot`` operands wrong,
so ``fp8_gemm`` upcasts them to fp32 there: same values).

    TRITON_INTERPRET=1 python plugins/hygon/tests/hygon_interp_cases.py configs
"""

from __future__ import annotations

import sys

import torch
from chitu_hygon import linear as hygon_linear
from chitu_hygon import plugin
from chitu_hygon.configs import SOFT_FP8_TABLES

from chitu_core.backend import (
    InstalledBackend,
    _register,
    bind_ops,
    discover_backends,
    native_op_names,
    select_backend,
)
from chitu_core.kernels.packed_weight import pack_weight as prepare_weight
from chitu_core.quant import (
    FORMAT_FP8_BLOCK128,
    FORMAT_FP8_CHANNEL,
    FORMAT_UNQUANTIZED,
    quantize_fp8,
)
from conformance.tolerances import assert_close

# N and K off every tile and 128-block edge: tails on both sides.
N, K = 200, 300


def _oracle():
    return bind_ops(select_backend("cpu_ref", discover_backends()))


def _hygon_ops():
    """The plugin bound as the engine binds it (the backend is unavailable here, so by hand)."""
    pm = _register(plugin, "hygon")
    installed = InstalledBackend(
        "hygon", "chitu-hygon", "0", info=pm.hook.chitu_backend_info(),
        native_ops=native_op_names(pm), plugin_manager=pm,
    )  # fmt: skip
    return bind_ops(installed)


def _problem(gen, fmt, m, dtype, with_bias=True):
    dense = torch.randn(N, K, generator=gen) * 0.05
    q = quantize_fp8(dense, fmt) if fmt != FORMAT_UNQUANTIZED else None
    weight, scale = (q.weight, q.scale) if q else (dense.to(dtype), None)
    x = torch.randn(m, K, generator=gen).to(dtype)
    bias = (torch.randn(N, generator=gen) * 0.1).to(dtype) if with_bias else None
    return x, weight, scale, bias


def _reference(oracle, x, weight, scale, fmt, bias):
    handle = oracle.prepare_weight(weight, scale, fmt)
    return oracle.linear(x.float(), handle, None if bias is None else bias.float())


def case_configs() -> None:
    """Every Triton config of every arch table (and the dequant path), both scale formats,
    bf16 and fp16, M up to the row's limit (split-K partials summed by the reduce kernel)."""
    gen = torch.Generator().manual_seed(0)
    oracle = _oracle()
    seen = set()
    for arch, table in SOFT_FP8_TABLES.items():
        for row in table:
            if row.config in seen:
                continue
            seen.add(row.config)
            m = min(row.max_m, 67)  # dequant: any M
            for fmt in (FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL):
                for dtype in (torch.bfloat16, torch.float16):
                    x, weight, scale, bias = _problem(gen, fmt, m, dtype)
                    w = prepare_weight(weight, scale, fmt)
                    key = (x.device, row.config)
                    y = hygon_linear.soft_fp8_linear(x, w, bias, row.config, num_cus=8)
                    assert key not in hygon_linear.UNSUPPORTED, hygon_linear.UNSUPPORTED[key]
                    assert y.dtype == dtype and y.shape == (m, N)
                    ref = _reference(oracle, x, weight, scale, fmt, bias)
                    assert_close("linear", y, ref, dtype)
                    print(f"{arch} {row.config.kind} m={m} {fmt} {dtype}: ok")


def case_hooks() -> None:
    """Through the bound hooks (prepare_weight, linear), every M regime of the default arch,
    every format, leading dims, no bias, M = 0 and fp32 activations."""
    gen = torch.Generator().manual_seed(1)
    ops, oracle = _hygon_ops(), _oracle()
    assert {"prepare_weight", "linear", "fused_moe"} <= ops.native
    for fmt in (FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL, FORMAT_UNQUANTIZED):
        for m in (1, 5, 16, 33, 130):
            for dtype in (torch.bfloat16, torch.float32):
                x, weight, scale, bias = _problem(gen, fmt, m, dtype, with_bias=m % 2 == 1)
                y = ops.linear(x, ops.prepare_weight(weight, scale, fmt), bias)
                assert_close("linear", y, _reference(oracle, x, weight, scale, fmt, bias), dtype)
    x, weight, scale, _ = _problem(gen, FORMAT_FP8_BLOCK128, 6, torch.bfloat16)
    handle = ops.prepare_weight(weight, scale, FORMAT_FP8_BLOCK128)
    y = ops.linear(x.view(2, 3, K), handle, None)
    assert y.shape == (2, 3, N)
    assert_close("linear", y.view(6, N), _reference(oracle, x, weight, scale, FORMAT_FP8_BLOCK128, None), torch.bfloat16)  # fmt: skip
    assert ops.linear(x[:0], handle, None).shape == (0, N)
    assert not hygon_linear.UNSUPPORTED, hygon_linear.UNSUPPORTED
    print("hooks: ok")


CASES = {"configs": case_configs, "hooks": case_hooks}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(CASES):
        CASES[name]()
