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
    dequant_kernel,
    fp8_gemm_kernel,
    fp8_gemv_kernel,
    fp8_mm_kernel,
    fp8_wide_kernel,
    splitk_reduce_kernel,
)

HIP_TARGETS = [GPUTarget("hip", "gfx90a", 64), GPUTarget("hip", "gfx942", 64)]


def _gemm_source(scale_mode: int, split_k: int, use_ptx: bool, block_n: int, block_m: int):
    sig = {
        "x_ptr": "*bf16", "w_ptr": "*u8", "scale_ptr": "*fp32", "bias_ptr": "*bf16",
        "y_ptr": "*bf16" if split_k == 1 else "*fp32",
        "M": "i32", "N": "i32", "K": "i32",
        "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_sk": "i32",
        "stride_ym": "i32", "stride_ys": "i32", "k_tiles_per_split": "i32",
    }  # fmt: skip
    constexprs = {
        "SCALE_MODE": scale_mode, "HAS_BIAS": True, "WRITE_PARTIAL": split_k > 1, "EVEN_K": True,
        "USE_PTX": use_ptx, "BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_K": 128,
        "GROUP_M": 8, "DOT_IN_FP32": False, "NAN": True,
    }  # fmt: skip
    sig.update(dict.fromkeys(constexprs, "constexpr"))
    return ASTSource(fp8_gemm_kernel, sig, constexprs)


# (scale_mode, split_k, block_n, block_m): decode split-K, batched decode, prefill, per-channel
GEMM_VARIANTS = [(0, 4, 64, 16), (1, 1, 128, 128)]

_NEW_SIG = {
    "x_ptr": "*bf16", "w_ptr": "*u8", "scale_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16",
    "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
    "stride_wn": "i32", "stride_sn": "i32", "stride_sk": "i32", "stride_ym": "i32",
    "k_tiles_per_split": "i32",
}  # fmt: skip


def _new_source(kernel, use_ptx: bool, **constexprs):
    c = dict(HAS_BIAS=True, FUSED_REDUCE=True, FENCE_PTX=use_ptx, EVEN_K=False, USE_PTX=use_ptx,
             DOT_IN_FP32=False, WIDEN_BF16=True, NAN=True)  # fmt: skip
    c.update(constexprs)
    sig = dict(_NEW_SIG)
    sig.update(dict.fromkeys(c, "constexpr"))
    return ASTSource(kernel, sig, c)


def _dequant_source(use_ptx: bool):
    sig = {"w_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": "*bf16", "N": "i32", "K": "i32",
           "stride_wn": "i32", "stride_sn": "i32", "stride_sk": "i32"}  # fmt: skip
    c = {"CHANNEL": False, "USE_PTX": use_ptx, "BLOCK_N": 16, "BLOCK_K": 512, "NAN": True}
    sig.update(dict.fromkeys(c, "constexpr"))
    return ASTSource(dequant_kernel, sig, c)


# the kernels of the per-arch tables: decode FMA GEMV (prefetch), swap-AB dot GEMV, mm, dequant
NEW_VARIANTS = {
    "gemv_fma": lambda p: (_new_source(fp8_gemv_kernel, p, SCALE_MODE=0, BLOCK_N=64, BLOCK_M=1,
                                       PREFETCH=True), 8, 1),
    "gemv_dot": lambda p: (_new_source(fp8_gemv_kernel, p, SCALE_MODE=0, BLOCK_N=64, BLOCK_M=16,
                                       PREFETCH=False), 4, 3),
    "mm": lambda p: (_new_source(fp8_mm_kernel, p, SCALE_MODE=1, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64,
                                 GROUP_M=8), 4, 3),
    "dequant": lambda p: (_dequant_source(p), 4, 3),
    # batched decode: the shipped M 65..128 tile (scales folded into the widening), and
    # scales on the partial sums
    "wide": lambda p: (_new_source(fp8_wide_kernel, p, SCALE_MODE=1, BLOCK_M=128, BLOCK_N=64,
                                   BLOCK_K=64, GROUP_M=8), 4, 4),
    "wide_acc_no_nan": lambda p: (_new_source(fp8_wide_kernel, p, SCALE_MODE=0, BLOCK_M=64,
                                              BLOCK_N=128, BLOCK_K=128, GROUP_M=8, NAN=False), 4, 3),
    # the widenings without the NaN fix (weights with no NaN code): fp16 (FMA) and bf16 (MMA)
    "gemv_fma_no_nan": lambda p: (_new_source(fp8_gemv_kernel, p, SCALE_MODE=0, BLOCK_N=64,
                                              BLOCK_M=1, PREFETCH=False, NAN=False), 4, 1),
    "mm_no_nan": lambda p: (_new_source(fp8_mm_kernel, p, SCALE_MODE=0, BLOCK_M=16, BLOCK_N=128,
                                        BLOCK_K=128, GROUP_M=8, NAN=False), 4, 3),
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


# Every variant with the PTX widening; the portable widening once (it is the same code path).
GEMM_BUILDS = [pytest.param(v, True, id=f"{v}-ptx") for v in GEMM_VARIANTS] + [
    pytest.param(GEMM_VARIANTS[0], False, id=f"{GEMM_VARIANTS[0]}-portable")
]


@pytest.mark.parametrize("target", CUDA_TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("variant,use_ptx", GEMM_BUILDS)
def test_gemm_compiles_for_cuda(target, variant, use_ptx):
    scale_mode, split_k, block_n, block_m = variant
    num_warps = 8 if block_m >= 128 else 4
    _compile(_gemm_source(scale_mode, split_k, use_ptx, block_n, block_m), target, num_warps)


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
    _compile(_gemm_source(0, 4, False, 64, 16), target)
    _compile(_gemm_source(1, 1, False, 128, 64), target, num_warps=8)
    _compile(_reduce_source(), target)
