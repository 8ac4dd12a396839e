"""``chitu_linear`` on NVIDIA GPUs: cuBLAS for dense weights, soft or native FP8 for FP8 ones."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from chitu_core.kernels.fp8_gemm import fp8_gemm
from chitu_core.kernels.packed_weight import as_packed
from chitu_core.quant import FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL, FORMAT_UNQUANTIZED
from chitu_nvidia.configs import soft_fp8_config
from chitu_nvidia.native_fp8 import native_config, native_fp8_gemm

logger = logging.getLogger(__name__)


@functools.cache
def device_props(index: int) -> tuple[tuple[int, int], int]:
    """(compute capability, multiprocessor count) of a CUDA device, cached."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def linear(
    x: torch.Tensor, weight, bias: torch.Tensor | None, native: bool | None = None
) -> torch.Tensor:
    """``y = x @ W^T + bias``. x: [M, K] (leading dims allowed) bf16/fp16/fp32; returns x.dtype.

    native: None takes the native W8A8 path from ``weight.native_from_m`` tokens on (set
    when the weight was prepared, by ``--fp8-compute`` and ``fp8_dispatch``); True/False
    forces it (tests, benchmarks).
    """
    w = as_packed(weight)
    if w.weight.dim() != 2:
        raise ValueError(
            f"linear takes an [N, K] weight, got {tuple(w.weight.shape)}; stacked experts go to fused_moe"
        )
    if w.fmt == FORMAT_UNQUANTIZED:
        return F.linear(x, w.weight.to(x.dtype), bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x.dtype == torch.float32:
        # No fp32 tensor-core path: dequantize (exact in fp32) and use cuBLAS.
        y = F.linear(x2, w.as_quantized().dequantize(torch.float32), bias)
        return y.reshape(*lead, y.shape[-1])
    capability, num_sms = device_props(x.device.index or 0)
    m = x2.shape[0]
    if native is None:
        native = m >= w.native_from_m
    if native:
        if w.fmt != FORMAT_FP8_BLOCK128:
            raise ValueError(f"the native FP8 path takes block-128 weights, not {w.fmt}")
        y = native_fp8_gemm(x2, w.stored_fp8(), w.scale, bias, native_config(m), k_perm=w.k_perm)
    else:
        y = fp8_gemm(
            x2, w.weight, w.scale, bias,
            channel=w.fmt == FORMAT_FP8_CHANNEL,
            config=soft_fp8_config(capability, m, x2.shape[1], w.out_features, w.k_perm),
            num_sms=num_sms,
            use_ptx=torch.version.hip is None,
            nan_codes=w.has_nan_codes,
            scales_fold=w.scales_fold,
            k_perm=w.k_perm,
        )  # fmt: skip
    return y.reshape(*lead, y.shape[-1])
