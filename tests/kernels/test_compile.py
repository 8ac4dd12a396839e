"""Cross-compile every portable soft-FP8 kernel for Ampere (and HIP) on a GPU-less machine.

``triton.compile(ASTSource(...), target=GPUTarget(...))`` runs the whole
pipeline down to a cubin (ptxas) or a HIP code object without a device: a
kernel that needs FP8 hardware (e.g. a ``tl.float8e4nv`` -> bf16 convert) fails
here for sm_80/sm_86. Slow-ish (a few seconds a kernel), so the set is small
but covers every constexpr branch that changes the generated code.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
from kernel_test_helpers import CUDA_TARGETS  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("compile tests need compiled (not interpreted) kernels", allow_module_level=True)

from chitu_core.kernels.e4m3_widen import e4m3_widen_kernel  # noqa: E402
from chitu_core.kernels.fp8_gemm import (  # noqa: E402
    Fp8GemmConfig,
    kernel_source,
    splitk_reduce_kernel,
)

HIP_TARGETS = [GPUTarget("hip", "gfx90a", 64), GPUTarget("hip", "gfx942", 64)]


def _variant(cfg: Fp8GemmConfig, nan: bool = True):
    """(use_ptx -> (source, num_warps, num_stages)) of the kernel fp8_gemm launches for cfg,
    with a masked K tail."""
    return lambda p: (kernel_source(cfg, even_k=False, use_ptx=p, nan_codes=nan),
                      cfg.num_warps, cfg.num_stages)  # fmt: skip


C = Fp8GemmConfig
# the kernels of the per-arch tables: decode FMA GEMV (prefetch), swap-AB dot GEMV, mm, dequant,
# the batched-decode wide kernel (scales folded into the widening, and on the partial sums)
NEW_VARIANTS = {
    "gemv_fma": _variant(C(kind="gemv", block_n=64, block_m=1, prefetch=True, num_warps=8,
                           num_stages=1)),
    "gemv_dot": _variant(C(kind="gemv", block_n=64, block_m=16, num_warps=4, num_stages=3)),
    "mm": _variant(C(kind="mm", block_m=64, block_n=64, block_k=64, scale_on_acc=False,
                     num_warps=4, num_stages=3)),
    "dequant": _variant(C(kind="dequant", num_warps=4, num_stages=3)),
    "wide": _variant(C(kind="wide", block_m=128, block_n=64, block_k=64, scale_on_acc=False,
                       num_warps=4, num_stages=4)),
    "wide_acc_no_nan": _variant(C(kind="wide", block_m=64, block_n=128, block_k=128, num_warps=4,
                                  num_stages=3), nan=False),
    # the widenings without the NaN fix (weights with no NaN code): fp16 (FMA) and bf16 (MMA)
    "gemv_fma_no_nan": _variant(C(kind="gemv", block_n=64, block_m=1, num_warps=4, num_stages=1),
                                nan=False),
    "mm_no_nan": _variant(C(kind="mm", block_m=16, block_n=128, block_k=128, num_warps=4,
                            num_stages=3), nan=False),
}  # fmt: skip


@pytest.mark.parametrize("target", CUDA_TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("name", list(NEW_VARIANTS))
def test_new_kernels_compile_for_cuda(target, name):
    src, num_warps, num_stages = NEW_VARIANTS[name](True)
    _compile(src, target, num_warps, num_stages)
    if name == "gemv_fma":  # portable widening and no PTX fence: what HIP and CPU run
        src, num_warps, num_stages = NEW_VARIANTS[name](False)
        _compile(src, target, num_warps, num_stages)


def _compile(src, target, num_warps=4, num_stages=3):
    kernel = triton.compile(
        src, target=target, options={"num_warps": num_warps, "num_stages": num_stages}
    )
    asm = kernel.asm
    assert ("cubin" in asm) if target.backend == "cuda" else ("hsaco" in asm)
    return kernel


def _hip_available(target) -> bool:
    try:
        _compile(_widen_source(False), target)
    except Exception:  # noqa: BLE001 - no AMD toolchain in this triton build
        return False
    return True


def _widen_source(use_ptx: bool, bf16: bool = False, nan: bool = True):
    sig = {
        "bits_ptr": "*u8",
        "out_ptr": "*bf16",
        "num_elements": "i32",
        "USE_PTX": "constexpr",
        "BLOCK": "constexpr",
        "BF16": "constexpr",
        "NAN": "constexpr",
    }
    consts = {"USE_PTX": use_ptx, "BLOCK": 1024, "BF16": bf16, "NAN": nan}
    return ASTSource(e4m3_widen_kernel, sig, consts)


def _reduce_source():
    sig = {"ws_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16", "num_elements": "i32", "N": "i32",
           "split_k": "i32", "HAS_BIAS": "constexpr", "BLOCK": "constexpr"}  # fmt: skip
    return ASTSource(splitk_reduce_kernel, sig, {"HAS_BIAS": True, "BLOCK": 1024})


@pytest.mark.parametrize("target", CUDA_TARGETS, ids=lambda t: f"sm_{t.arch}")
def test_helpers_compile_for_cuda(target):
    _compile(_widen_source(True), target)
    _compile(_widen_source(True, bf16=True), target)  # bf16x2 fma: sm_80+
    _compile(_widen_source(True, nan=False), target)  # the widenings without the NaN fix
    _compile(_widen_source(True, bf16=True, nan=False), target)
    _compile(_widen_source(False), target)
    _compile(_reduce_source(), target)


def test_fp8_hardware_convert_does_not_compile_for_sm80():
    """The control: the compile test can fail (hardware e4m3 -> bf16 needs sm_89+)."""
    import triton.language as tl

    @triton.jit
    def hw_convert_kernel(in_ptr, out_ptr):
        offs = tl.arange(0, 128)
        tl.store(out_ptr + offs, tl.load(in_ptr + offs).to(tl.bfloat16))

    sig = {"in_ptr": "*fp8e4nv", "out_ptr": "*bf16"}
    with pytest.raises(Exception):  # noqa: B017 - any compile error will do
        _compile(ASTSource(hw_convert_kernel, sig, {}), GPUTarget("cuda", 80, 32))


@pytest.mark.parametrize("target", HIP_TARGETS, ids=lambda t: t.arch)
def test_portable_kernels_compile_for_hip(target):
    if not _hip_available(target):
        pytest.skip(f"this triton build cannot compile for {target.arch}")
    for name in ("gemv_dot", "wide", "mm"):  # the portable widening, MFMA tiles
        src, num_warps, num_stages = NEW_VARIANTS[name](False)
        _compile(src, target, num_warps, num_stages)
    _compile(_reduce_source(), target)
