"""Cross-compile every kernel variant the Hygon configs launch, for HIP targets, with no GPU.

``triton.compile(ASTSource(...), target=GPUTarget("hip", arch, 64))`` runs the
whole AMD pipeline (TTGIR, LLVM, AMDGCN, the linked ``hsaco``) on this machine.
Each arch compiles the kernels of its own table in ``chitu_hygon.configs``,
with the constexprs ``fp8_gemm`` passes on HIP (``USE_PTX`` and the fused
split-K reduction off), in both scale formats and both half dtypes, plus the
dequant and split-K reduce helpers; each build must fit the 64 KB LDS of a CU.

gfx90a and gfx942 must compile. gfx906 (Vega20, the Z100 generation) and
gfx928 (a Hygon DCU arch) are tried too and what happens is recorded:
``EXPECTED_FAILURES`` holds the observed diagnostic of an arch this Triton
cannot target; those variants are xfail with it (``pytest -rx`` lists them),
and fail outright should the arch start compiling, so the table gets updated.
Without the HIP toolchain in this Triton build, everything skips and says which
part is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("compile tests need compiled (not interpreted) kernels", allow_module_level=True)

from chitu_hygon.configs import MAX_LDS_BYTES, table_for  # noqa: E402

from chitu_core.kernels.e4m3_widen import e4m3_widen_kernel  # noqa: E402
from chitu_core.kernels.fp8_gemm import (  # noqa: E402
    Fp8GemmConfig,
    kernel_source,
    splitk_reduce_kernel,
)

WAVEFRONT = 64
REQUIRED_ARCHS = ("gfx90a", "gfx942")
TRIED_ARCHS = ("gfx906", "gfx928")
# arch -> the diagnostic this Triton prints (on stderr; the exception says only
# "PassManager::run failed") when asked to target it.
EXPECTED_FAILURES = {"gfx928": "unsupported target: 'gfx928'"}


def hip_toolchain_missing() -> str | None:
    """Why this Triton cannot build HIP code objects, or None when it can."""
    try:
        import triton.backends.amd.compiler as amd_compiler
        from triton._C.libtriton import amd
    except ImportError as exc:
        return f"this triton build has no AMD backend: {exc}"
    libdir = Path(amd_compiler.__file__).parent / "lib"
    missing = [name for name in ("ocml.bc", "ockl.bc") if not (libdir / name).is_file()]
    if missing:
        return f"this triton build lacks the ROCm device bitcode {', '.join(missing)} in {libdir}"
    has_lld = shutil.which("ld.lld") or os.environ.get("TRITON_HIP_LLD_PATH")
    if not hasattr(amd, "link_hsaco") and not has_lld:
        return (
            "no ld.lld: this triton links HIP code objects with ROCm's ld.lld (TRITON_HIP_LLD_PATH)"
        )
    try:  # the smallest kernel: anything that fails here is the toolchain, not our kernels
        sig = {"bits_ptr": "*u8", "out_ptr": "*bf16", "num_elements": "i32"}
        consts = {"USE_PTX": False, "BLOCK": 1024, "BF16": False, "NAN": True}
        sig.update(dict.fromkeys(consts, "constexpr"))
        src = ASTSource(e4m3_widen_kernel, sig, consts)
        triton.compile(src, target=GPUTarget("hip", "gfx90a", WAVEFRONT))
    except Exception as exc:  # noqa: BLE001 - any failure means no usable toolchain
        return f"this triton cannot compile for HIP: {type(exc).__name__}: {exc}"
    return None


def _gemm_source(config: Fp8GemmConfig, channel: bool, half: str, even_k: bool) -> ASTSource:
    """The kernel ``fp8_gemm`` launches for ``config`` on HIP (no PTX, no fused split-K)."""
    return kernel_source(config, channel=channel, half=half, even_k=even_k, use_ptx=False,
                         fused_reduce=False)  # fmt: skip


def _dequant_source(channel: bool) -> ASTSource:
    """``dequantize_to``'s launch (the ``dequant`` kind's widening before hipBLAS)."""
    return kernel_source(Fp8GemmConfig(kind="dequant"), channel=channel, use_ptx=False)


def _reduce_source() -> ASTSource:
    sig = {"ws_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16", "num_elements": "i32",
           "N": "i32", "split_k": "i32", "HAS_BIAS": "constexpr", "BLOCK": "constexpr"}  # fmt: skip
    return ASTSource(splitk_reduce_kernel, sig, {"HAS_BIAS": True, "BLOCK": 1024})


def variants(arch: str) -> dict[str, tuple]:
    """name -> (source, num_warps, num_stages) for every kernel ``arch``'s table launches.

    Each Triton GEMM config twice: block scales, bf16, masked K tail; and
    per-channel scales, fp16, whole K tiles (both scale modes, both widenings).
    """
    out: dict[str, tuple] = {}
    for row in table_for(arch):
        c = row.config
        if c.kind == "dequant":
            for channel in (False, True):
                name = f"dequant-{'channel' if channel else 'block'}"
                out[name] = (_dequant_source(channel), 4, None)
            continue
        tile = f"{c.kind}-m{c.block_m}n{c.block_n}-w{c.num_warps}s{c.num_stages}"
        out[f"{tile}-block-bf16"] = (_gemm_source(c, False, "bf16", False), c.num_warps, c.num_stages)  # fmt: skip
        out[f"{tile}-channel-fp16"] = (_gemm_source(c, True, "fp16", True), c.num_warps, c.num_stages)  # fmt: skip
    out["splitk_reduce"] = (_reduce_source(), 4, None)
    return out


PARAMS = [
    pytest.param(arch, name, id=f"{arch}-{name}")
    for arch in REQUIRED_ARCHS + TRIED_ARCHS
    for name in variants(arch)
]


@pytest.fixture(scope="module")
def toolchain_missing() -> str | None:
    return hip_toolchain_missing()


def _compile(source: ASTSource, arch: str, num_warps: int, num_stages: int | None):
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return triton.compile(source, target=GPUTarget("hip", arch, WAVEFRONT), options=options)


@pytest.mark.parametrize("arch,name", PARAMS)
def test_hygon_kernel_compiles_for_hip(arch, name, toolchain_missing, capfd):
    if toolchain_missing:
        pytest.skip(toolchain_missing)
    source, num_warps, num_stages = variants(arch)[name]
    if arch in EXPECTED_FAILURES:
        with pytest.raises(RuntimeError) as failure:
            _compile(source, arch, num_warps, num_stages)
        diagnostics = capfd.readouterr().err
        assert EXPECTED_FAILURES[arch] in diagnostics, diagnostics[-3000:]
        pytest.xfail(f"{arch}: {EXPECTED_FAILURES[arch]} ({failure.value})")
    kernel = _compile(source, arch, num_warps, num_stages)
    assert "hsaco" in kernel.asm
    assert kernel.metadata.shared <= MAX_LDS_BYTES, f"{kernel.metadata.shared} bytes of LDS"
