"""``chitu_linear`` on NVIDIA GPUs: cuBLAS for dense weights, soft or native FP8 for FP8 ones."""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from chitu_core.kernels.fp8_gemm import fp8_gemm
from chitu_core.kernels.packed_weight import as_packed
from chitu_core.quant import FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL, FORMAT_UNQUANTIZED
from chitu_nvidia.configs import NATIVE_FP8_MIN_M, soft_fp8_config

logger = logging.getLogger(__name__)


def force_soft_fp8() -> bool:
    """``CHITU_FORCE_SOFT_FP8=1`` runs the Ampere soft-FP8 path on any GPU."""
    return os.environ.get("CHITU_FORCE_SOFT_FP8", "0") not in ("", "0")


def k_perm_enabled() -> bool:
    """``CHITU_FP8_K_PERM=0`` keeps FP8 weights in K order (the default K-permutes them at
    load for the soft-FP8 wide kernel, ``PackedWeight.k_perm``); for A/B measurements."""
    return os.environ.get("CHITU_FP8_K_PERM", "1") not in ("", "0")


def native_fp8_enabled() -> bool:
    """``CHITU_NATIVE_FP8=1`` opts in to the native FP8 path on sm_89+.

    It quantizes activations to e4m3 per 1x128 group (as DeepSeek's inference does),
    which measured 2.6e-2 relative error at M=512, outside the contract's bf16 bound
    (1.6e-2, activations unquantized): so it is off unless asked for.
    """
    return os.environ.get("CHITU_NATIVE_FP8", "0") not in ("", "0")


@functools.cache
def device_props(index: int) -> tuple[tuple[int, int], int]:
    """(compute capability, multiprocessor count) of a CUDA device, cached."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def linear(
    x: torch.Tensor, weight, bias: torch.Tensor | None, native: bool | None = None
) -> torch.Tensor:
    """``y = x @ W^T + bias``. x: [M, K] (leading dims allowed) bf16/fp16/fp32; returns x.dtype.

    native: None picks by compute capability and ``CHITU_FORCE_SOFT_FP8``; True/False forces.
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
        native = (
            w.fmt == FORMAT_FP8_BLOCK128
            and not w.k_perm
            and not force_soft_fp8()
            and native_fp8_enabled()
            and capability >= (8, 9)
            and m >= NATIVE_FP8_MIN_M.get(capability, NATIVE_FP8_MIN_M[(9, 0)])
        )
    if native:
        from chitu_nvidia.native_fp8 import native_config, native_fp8_gemm

        y = native_fp8_gemm(x2, w.fp8_view(), w.scale, bias, native_config(m))
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
