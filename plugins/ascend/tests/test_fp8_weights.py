"""FP8 -> int8 (per output channel, groups of 128 along K) at load time: the numerics loss.

Checks the conversion of ``chitu_ascend.weight`` and its use through the FAKE
torch_npu's ``npu_weight_quant_batchmatmul`` (documented semantics on the CPU),
against cpu_ref; not the NPU kernel itself. The measured loss is printed
(``pytest -s``) and bounded.
"""

from __future__ import annotations

import torch
from chitu_ascend.weight import (
    FP8_WEIGHTS_ENV,
    GROUP_SIZE,
    LAYOUT_DENSE,
    LAYOUT_INT8,
    AscendWeight,
    prepare_weight,
)

from chitu_core.quant import FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL, quantize_fp8
from conformance.tolerances import compare

# Measured 6.6e-3 (FP8 block-128 weights quantized from Gaussian values, K=2048, fp32
# activations, so nothing but the conversion); half an int8 step of the group amax is
# the whole error: bound it at 1e-2.
CONVERSION_REL_BOUND = 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _fp8(fmt: str, n: int = 512, k: int = 2048, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    return quantize_fp8(w, fmt)


def test_conversion_loss_against_cpu_ref(ascend_ops, ref_ops):
    x = torch.randn(32, 2048, generator=torch.Generator().manual_seed(1))
    for fmt in (FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL):
        q = _fp8(fmt)
        handle = ascend_ops.prepare_weight(q.weight, q.scale, fmt)
        assert handle.layout == LAYOUT_INT8
        ref_handle = ref_ops.prepare_weight(q.weight, q.scale, fmt)
        # fp32 activations: the conversion alone (the dequantize-and-matmul path)
        conversion = _rel(ascend_ops.linear(x, handle, None), ref_ops.linear(x, ref_handle, None))
        # bf16 activations through npu_weight_quant_batchmatmul vs the oracle on the same x
        xb = x.bfloat16()
        end_to_end = _rel(ascend_ops.linear(xb, handle, None), ref_ops.linear(xb, ref_handle, None))
        dense_bf16 = _rel(
            ascend_ops.linear(
                xb, ascend_ops.prepare_weight(q.dequantize(), None, "unquantized"), None
            ),
            ref_ops.linear(xb, ref_handle, None),
        )
        print(
            f"\n{fmt}: FP8 -> int8 linear output rel. error vs cpu_ref: conversion alone "
            f"{conversion:.2e}; bf16 activations through npu_weight_quant_batchmatmul "
            f"{end_to_end:.2e} (bf16 dense weights, for scale: {dense_bf16:.2e})"
        )
        assert conversion < CONVERSION_REL_BOUND
        assert end_to_end < CONVERSION_REL_BOUND + 2 * dense_bf16


def test_int8_handle_layout_and_bytes():
    q = _fp8(FORMAT_FP8_BLOCK128, n=300, k=260)
    h = prepare_weight(q.weight, q.scale, FORMAT_FP8_BLOCK128)
    assert isinstance(h, AscendWeight) and h.weight.dtype == torch.int8
    assert h.weight.shape == (300, 260) and h.weight.is_contiguous()
    assert h.antiquant_scale.shape == (-(-260 // GROUP_SIZE), 300)
    assert h.antiquant_scale.dtype == torch.bfloat16
    # 1 byte per weight element plus one bf16 scale per (row, group of 128)
    assert h.weight.element_size() == 1
    assert h.antiquant_scale.numel() == 300 * -(-260 // GROUP_SIZE)
    # |q| <= 127 and the bf16 scale never lets a value exceed it
    assert int(h.weight.abs().max()) <= 127


def test_int8_error_is_at_most_half_a_step():
    q = _fp8(FORMAT_FP8_BLOCK128, n=256, k=384, seed=3)
    exact = q.dequantize()
    h = prepare_weight(q.weight, q.scale, FORMAT_FP8_BLOCK128)
    step = h.antiquant_scale.float().repeat_interleave(GROUP_SIZE, 0)[:384].t()
    assert bool(((h.dequantize(torch.float32) - exact).abs() <= step / 2 + 1e-12).all())


def test_zero_and_nan_groups():
    w = torch.randn(128, 256) * 0.1
    w[:, :128] = 0.0
    q = quantize_fp8(w, FORMAT_FP8_BLOCK128)
    bits = q.weight.view(torch.uint8).clone()
    bits[5, 200] = 0x7F  # one NaN code: row 5 of the second group
    h = prepare_weight(bits, q.scale, FORMAT_FP8_BLOCK128)
    dense = h.dequantize(torch.float32)
    assert torch.equal(dense[:, :128], torch.zeros(128, 128))
    assert dense[5, 128:].isnan().all() and not dense[:5].isnan().any()
    y = torch.randn(3, 256) @ dense.t()
    assert y[:, 5].isnan().all() and not y[:, :5].isnan().any()  # as the reference


def test_bf16_option_keeps_exact_fp8_values(monkeypatch, ascend_ops, ref_ops):
    monkeypatch.setenv(FP8_WEIGHTS_ENV, "bf16")
    q = _fp8(FORMAT_FP8_BLOCK128, n=256, k=256)
    h = ascend_ops.prepare_weight(q.weight, q.scale, FORMAT_FP8_BLOCK128)
    assert h.layout == LAYOUT_DENSE and h.weight.dtype == torch.bfloat16
    assert torch.equal(h.weight.float(), q.dequantize().bfloat16().float())
    x = torch.randn(4, 256).bfloat16()
    ref = ref_ops.linear(x, ref_ops.prepare_weight(q.weight, q.scale, FORMAT_FP8_BLOCK128), None)
    assert compare(ascend_ops.linear(x, h, None), ref).rel_fro < 5e-3
    monkeypatch.setenv(FP8_WEIGHTS_ENV, "fp4")
    try:
        ascend_ops.prepare_weight(q.weight, q.scale, FORMAT_FP8_BLOCK128)
    except ValueError as exc:
        assert FP8_WEIGHTS_ENV in str(exc)
    else:
        raise AssertionError("an unknown CHITU_ASCEND_FP8_WEIGHTS must raise")
