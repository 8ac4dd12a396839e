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
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("compile tests need compiled (not interpreted) kernels", allow_module_level=True)

from chitu_core.kernels.e4m3_widen import e4m3_widen_kernel  # noqa: E402
from chitu_core.kernels.fp8_gemm import fp8_gemm_kernel, splitk_reduce_kernel  # noqa: E402

CUDA_TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 86, 32), GPUTarget("cuda", 90, 32)]
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
        "GROUP_M": 8, "DOT_IN_FP32": False,
    }  # fmt: skip
    sig.update(dict.fromkeys(constexprs, "constexpr"))
    return ASTSource(fp8_gemm_kernel, sig, constexprs)


# (scale_mode, split_k, block_n, block_m): decode split-K, batched decode, prefill, per-channel
GEMM_VARIANTS = [(0, 4, 64, 16), (0, 1, 128, 64), (1, 1, 128, 128), (2, 1, 64, 16)]


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


def _widen_source(use_ptx: bool):
    sig = {
        "bits_ptr": "*u8",
        "out_ptr": "*bf16",
        "num_elements": "i32",
        "USE_PTX": "constexpr",
        "BLOCK": "constexpr",
    }
    return ASTSource(e4m3_widen_kernel, sig, {"USE_PTX": use_ptx, "BLOCK": 1024})


def _reduce_source():
    sig = {"ws_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16", "num_elements": "i32", "N": "i32",
           "split_k": "i32", "HAS_BIAS": "constexpr", "BLOCK": "constexpr"}  # fmt: skip
    return ASTSource(splitk_reduce_kernel, sig, {"HAS_BIAS": True, "BLOCK": 1024})


@pytest.mark.parametrize("target", CUDA_TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("variant", GEMM_VARIANTS, ids=str)
@pytest.mark.parametrize("use_ptx", [True, False], ids=["ptx", "portable"])
def test_gemm_compiles_for_cuda(target, variant, use_ptx):
    scale_mode, split_k, block_n, block_m = variant
    if not use_ptx and variant != GEMM_VARIANTS[0]:
        pytest.skip("portable widening: one variant is enough")
    num_warps = 8 if block_m >= 128 else 4
    _compile(_gemm_source(scale_mode, split_k, use_ptx, block_n, block_m), target, num_warps)


@pytest.mark.parametrize("target", CUDA_TARGETS, ids=lambda t: f"sm_{t.arch}")
def test_helpers_compile_for_cuda(target):
    _compile(_widen_source(True), target)
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
