"""``chitu_linear`` on Hygon DCUs: torch.matmul for dense weights, portable soft FP8 for FP8 ones.

FP8 weights go through ``chitu_core.kernels.fp8_gemm`` with ``use_ptx=False``
(the portable integer widening; HIP has no inline PTX) and a wave64 config from
``chitu_hygon.configs``. Where the DCU's Triton cannot build a kernel (an arch
the Triton build does not know, a missing lowering), the first launch of that
config raises; the config is then remembered as unsupported on that device,
the reason is logged once, and the generic dequantize-then-matmul linear runs
instead (same results, slower).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from chitu_core.kernels.fp8_gemm import Fp8GemmConfig, fp8_gemm
from chitu_core.kernels.packed_weight import PackedWeight, as_packed
from chitu_core.ops.linear import linear as generic_linear
from chitu_core.quant import FORMAT_FP8_CHANNEL, FORMAT_UNQUANTIZED
from chitu_hygon.configs import DEFAULT_ARCH, soft_fp8_config

logger = logging.getLogger(__name__)

# Compute units assumed off the device (Triton's CPU interpreter): only sizes split-K.
INTERPRETER_NUM_CUS = 8

# (device, config) -> why the kernel could not be built there; those run the generic linear.
UNSUPPORTED: dict[tuple[torch.device, Fp8GemmConfig], str] = {}


@functools.cache
def device_arch(device: torch.device) -> tuple[str, int]:
    """(base gcnArchName, compute-unit count) of ``device``, cached.

    Off a HIP device (tests under ``TRITON_INTERPRET=1`` on the CPU): the default
    arch and ``INTERPRETER_NUM_CUS``.
    """
    if device.type != "cuda":
        return DEFAULT_ARCH, INTERPRETER_NUM_CUS
    props = torch.cuda.get_device_properties(device)
    arch = getattr(props, "gcnArchName", "") or DEFAULT_ARCH
    return arch.split(":", 1)[0], props.multi_processor_count


def _is_build_failure(exc: Exception) -> bool:
    """A Triton front/back-end failure (CompilationError, MLIR ``PassManager::run failed``),
    not a device error that must surface (out of memory)."""
    from triton.compiler.errors import CompilationError

    if isinstance(exc, torch.OutOfMemoryError):
        return False
    return isinstance(exc, (CompilationError, RuntimeError))


def soft_fp8_linear(
    x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, config: Fp8GemmConfig, num_cus: int
) -> torch.Tensor:
    """``x [M, K] bf16/fp16 @ e4m3(w)^T * scale + bias`` -> ``[M, N]``: the Triton kernel of
    ``config``, or the generic linear where that kernel cannot be built on this device."""
    key = (x.device, config)
    if key not in UNSUPPORTED:
        try:
            return fp8_gemm(
                x, w.weight, w.scale, bias,
                channel=w.fmt == FORMAT_FP8_CHANNEL, config=config, num_sms=num_cus, use_ptx=False,
                nan_codes=w.has_nan_codes,
            )  # fmt: skip
        except Exception as exc:
            if not _is_build_failure(exc):
                raise
            UNSUPPORTED[key] = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "hygon: the soft-FP8 %s kernel (%s) cannot be built on %s: %s; "
                "using the generic linear for it",
                config.kind,
                config,
                x.device,
                UNSUPPORTED[key],
            )
    return generic_linear(x, w.as_quantized(), bias)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``y = x @ W^T + bias``. x: [M, K] (leading dims allowed) bf16/fp16/fp32; returns x.dtype.

    weight: a ``PackedWeight`` (or a generic ``QuantizedWeight``, repacked here) of an
    ``[N, K]`` weight; bias: ``[N]`` or None.
    """
    w = as_packed(weight)
    if w.weight.dim() != 2:
        raise ValueError(
            f"linear takes an [N, K] weight, got {tuple(w.weight.shape)}; stacked experts go to fused_moe"
        )
    if w.fmt == FORMAT_UNQUANTIZED:
        return F.linear(x, w.weight.to(x.dtype), bias)  # torch.matmul: hipBLAS(Lt)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x.dtype == torch.float32:
        # No fp32 matrix-core path worth a kernel: dequantize (exact in fp32) and BLAS.
        y = F.linear(x2, w.as_quantized().dequantize(torch.float32), bias)
    else:
        arch, num_cus = device_arch(x2.device)
        y = soft_fp8_linear(x2, w, bias, soft_fp8_config(arch, x2.shape[0]), num_cus)
    return y.reshape(*lead, y.shape[-1])
