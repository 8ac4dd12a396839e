"""Small-op kernels (RMSNorm, RoPE, SwiGLU): interpreter numerics, cross-compilation for
sm_80/86/90, the NVIDIA hooks' fallback, and full-size checks on an NVIDIA GPU.

The interpreter cases live in ``small_ops_interp_cases.py`` and run in subprocesses
(the interpreter must be on before triton is imported, and must not leak into
the compile tests of the same pytest run).
"""

from __future__ import annotations

import inspect
import logging

import pytest

triton = pytest.importorskip("triton")
import torch  # noqa: E402
from kernel_test_helpers import CUDA_TARGETS, INTERPRETING, run_cases  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from chitu_core.kernels.small_ops import (  # noqa: E402
    rms_norm_geometry,
    rms_norm_kernel,
    rope_geometry,
    rope_kernel,
    silu_and_mul_geometry,
    silu_and_mul_kernel,
)

CASES = [
    "rms_norm",
    "rms_norm_wide",
    "add_rms_norm",
    "silu_and_mul",
    "rope_neox",
    "rope_interleaved",
    "edges",
]


@pytest.mark.parametrize("case", CASES)
def test_case_under_interpreter(case):
    run_cases("small_ops_interp_cases.py", "cpu", case)


# --------------------------------------------------------------------------------------
# launch geometry (host arithmetic)
# --------------------------------------------------------------------------------------


def test_geometry():
    # Llama-8B hidden 4096: one row a program, read once, 8 warps
    assert rms_norm_geometry(4096) == (1, 4096, True, 8)
    # DeepSeek kv_a_norm (512): 4 rows a program; 16384 is still one pass, wider loops
    assert rms_norm_geometry(512)[:3] == (4, 512, True)
    assert rms_norm_geometry(16384)[:3] == (1, 16384, True)
    assert rms_norm_geometry(16400)[:3] == (1, 4096, False)
    # decode (M = 1, I = 14336): 56 tiles of 256; prefill: tiles of 1024
    assert silu_and_mul_geometry(1, 14336) == (256, 1)
    assert silu_and_mul_geometry(4096, 14336) == (1024, 4)
    # Llama-8B rope: 8 heads of 128 a program (4 q tiles + 1 k tile a token);
    # DeepSeek-V3 (R = 64): 16 heads a program
    assert rope_geometry(32, 8, 128, 128, 128) == (8, 64, 4)
    assert rope_geometry(128, 1, 64, 64, 64)[:2] == (16, 32)
    assert rope_geometry(1, 1, 64, 64, 64)[0] == 1


# --------------------------------------------------------------------------------------
# cross-compilation (no GPU needed)
# --------------------------------------------------------------------------------------


def _source(kernel, types: dict[str, str], constexprs: dict, aligned: list[str]):
    """ASTSource with the divisibility hints the JIT derives at launch (16-aligned
    pointers, strides and widths): without them the loads are not vectorised."""
    names = kernel.arg_names
    sig = dict(types)
    sig.update(dict.fromkeys(constexprs, "constexpr"))
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return ASTSource(kernel, sig, constexprs, attrs)


def _rms_source(dtype: str, w_dtype: str, d: int, residual: bool = False):
    block_m, block_d, single, num_warps = rms_norm_geometry(d)
    types = {"x_ptr": dtype, "w_ptr": w_dtype, "out_ptr": dtype, "M": "i32", "D": "i32",
             "stride_xm": "i32", "stride_om": "i32", "eps": "fp32"}  # fmt: skip
    aligned = ["x_ptr", "w_ptr", "out_ptr", "D", "stride_xm", "stride_om"]
    c = dict(BLOCK_M=block_m, BLOCK_D=block_d, SINGLE=single, HAS_RESIDUAL=residual)
    if residual:
        types |= {"r_ptr": dtype, "sum_ptr": dtype, "stride_rm": "i32", "stride_sm": "i32"}
        aligned += ["r_ptr", "sum_ptr", "stride_rm", "stride_sm"]
    else:
        c |= dict(r_ptr=None, sum_ptr=None, stride_rm=0, stride_sm=0)
    return _source(rms_norm_kernel, types, c, aligned), num_warps


def _silu_source(dtype: str, m: int, inter: int):
    block, num_warps = silu_and_mul_geometry(m, inter)
    types = {"x_ptr": dtype, "out_ptr": dtype, "inter": "i32", "stride_xm": "i32",
             "stride_om": "i32"}  # fmt: skip
    return _source(silu_and_mul_kernel, types, dict(BLOCK=block), list(types)), num_warps


def _rope_source(dtype: str, hq: int, hk: int, d: int, rot: int, neox: bool):
    block_h, block_half, num_warps = rope_geometry(hq, hk, rot, d, d)
    pass_block = triton.next_power_of_2(max(d - rot, 1))
    types = {"q_ptr": dtype, "k_ptr": dtype, "pos_ptr": "*i64", "cache_ptr": "*fp32",
             "q_out_ptr": dtype, "k_out_ptr": dtype}  # fmt: skip
    ints = ["Hq", "Hk", "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_qot",
            "stride_qoh", "stride_kot", "stride_koh", "stride_cache"]  # fmt: skip
    types.update(dict.fromkeys(ints, "i32"))
    c = dict(HALF=rot // 2, PASS_Q=d - rot, PASS_K=d - rot, BLOCK_H=block_h,
             BLOCK_HALF=block_half, BLOCK_PASS_Q=pass_block, BLOCK_PASS_K=pass_block,
             NEOX=neox)  # fmt: skip
    aligned = list(types)[:6] + [n for n in ints if n.startswith("stride_")]
    return _source(rope_kernel, types, c, aligned), num_warps


VARIANTS = {
    # name: (ASTSource, num_warps, PTX substring that must appear)
    "rms_bf16_4096": _rms_source("*bf16", "*bf16", 4096) + ("ld.global.v4",),
    "rms_bf16_fp32w_7168": _rms_source("*bf16", "*fp32", 7168) + ("ld.global.v4",),
    "rms_fp16_512": _rms_source("*fp16", "*fp16", 512) + ("ld.global",),
    "rms_fp32_chunked_20480": _rms_source("*fp32", "*fp32", 20480) + ("ld.global.v4",),
    "add_rms_bf16_4096": _rms_source("*bf16", "*bf16", 4096, True) + ("st.global.v4",),
    "add_rms_fp16_chunked_20480": _rms_source("*fp16", "*fp16", 20480, True) + ("ld.global",),
    "silu_bf16_decode": _silu_source("*bf16", 1, 14336) + ("ld.global.v4",),
    "silu_fp16_prefill": _silu_source("*fp16", 4096, 14336) + ("ld.global.v4",),
    "silu_fp32": _silu_source("*fp32", 64, 2048) + ("ld.global.v4",),
    "rope_neox_bf16_llama": _rope_source("*bf16", 32, 8, 128, 128, True) + ("ld.global.v4",),
    "rope_neox_fp16_partial": _rope_source("*fp16", 16, 2, 128, 64, True) + ("ld.global",),
    "rope_gptj_bf16_deepseek": _rope_source("*bf16", 128, 1, 64, 64, False) + ("st.global.v4",),
    "rope_gptj_fp32_partial": _rope_source("*fp32", 8, 8, 96, 32, False) + ("ld.global",),
}  # fmt: skip


@pytest.mark.skipif(INTERPRETING, reason="compile tests need compiled (not interpreted) kernels")
@pytest.mark.parametrize("target", CUDA_TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_kernel_compiles_for_cuda(target, name):
    source, num_warps, ptx_marker = VARIANTS[name]
    kernel = triton.compile(source, target=target, options={"num_warps": num_warps})
    assert "cubin" in kernel.asm
    assert ptx_marker in kernel.asm["ptx"], f"{name}: no {ptx_marker} in the PTX"
    # Only the row reductions use shared memory (a few words per warp).
    assert kernel.metadata.shared <= 1024, f"{name}: {kernel.metadata.shared} B of shared memory"


# --------------------------------------------------------------------------------------
# the NVIDIA hooks: signatures and the generic fallback (no kernel launch needed)
# --------------------------------------------------------------------------------------


def test_nvidia_hookimpls_match_the_specs():
    from chitu_nvidia import plugin

    from chitu_core import hookspecs

    for name in ("chitu_rms_norm", "chitu_add_rms_norm", "chitu_rope", "chitu_silu_and_mul"):
        impl, spec = getattr(plugin, name), getattr(hookspecs, name)
        assert inspect.signature(impl) == inspect.signature(spec), name


def test_nvidia_fallback_runs_generic_and_logs_once(caplog):
    from chitu_nvidia import small_ops

    from chitu_core.ops import small as generic

    small_ops._logged.clear()
    x = torch.randn(3, 16, dtype=torch.float64)  # fp64: the kernel raises ValueError
    w = torch.randn(16, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="chitu_nvidia.small_ops"):
        out = small_ops.rms_norm(x, w, 1e-6)
        small_ops.rms_norm(x, w, 1e-6)
        silu = small_ops.silu_and_mul(x)
        q = torch.randn(2, 4, 16, dtype=torch.float64)
        cache = torch.randn(8, 16)
        pos = torch.tensor([3, 1])
        q_out, k_out = small_ops.rope(q, q[:, :2], pos, cache, False)
    assert torch.equal(out, generic.rms_norm(x, w, 1e-6))
    assert torch.equal(silu, generic.silu_and_mul(x))
    q_gen, k_gen = generic.rope(q, q[:, :2], pos, cache, False)
    assert torch.equal(q_out, q_gen) and torch.equal(k_out, k_gen)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages  # one per op, not one per call
    assert [m.split(":")[0] for m in messages] == ["rms_norm", "silu_and_mul", "rope"]


def test_nvidia_add_rms_norm_falls_back_for_mismatched_inputs(caplog):
    from chitu_nvidia import small_ops

    from chitu_core.ops import small as generic

    small_ops._logged.clear()
    x = torch.randn(3, 16, dtype=torch.float64)  # fp64: the kernel raises ValueError
    r = torch.randn(3, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="chitu_nvidia.small_ops"):
        normed, summed = small_ops.add_rms_norm(x, r, w, 1e-6)
    gen_normed, gen_summed = generic.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(normed, gen_normed) and torch.equal(summed, gen_summed)
    assert [m.getMessage().split(":")[0] for m in caplog.records] == ["add_rms_norm"]
    with pytest.raises(ValueError, match="residual must match x"):
        from chitu_core.kernels.small_ops import add_rms_norm

        add_rms_norm(x.float(), r.float()[:2], w.float(), 1e-6)


# --------------------------------------------------------------------------------------
# NVIDIA GPU: the interpreter cases compiled, full shapes, graph capture
# --------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", CASES)
def test_case_on_gpu(case):
    run_cases("small_ops_interp_cases.py", "cuda", case)


def _assert_matches(op: str, out, ref, gen, dtype):
    """Conformance bound against the fp64 oracle, and near-identity with the generic op."""
    from conformance.tolerances import assert_close

    assert out.dtype == gen.dtype and out.shape == gen.shape
    assert_close(op, out, ref, dtype)
    if dtype != torch.float32:
        differ = int((out != gen).sum())
        assert differ <= 0.01 * out.numel() + 2, f"{op}: {differ}/{out.numel()} differ from generic"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,d", [(1, 4096), (4096, 4096), (7, 7168), (300, 512), (3, 1536),
                                 (5, 24576)])  # fmt: skip
def test_rms_norm_full_shapes_on_gpu(m, d, dtype):
    from chitu_cpu_ref.small_ops import chitu_rms_norm as ref

    from chitu_core.kernels.small_ops import rms_norm
    from chitu_core.ops.small import rms_norm as generic

    g = torch.Generator(device="cuda").manual_seed(m * d)
    x = (torch.randn(m, d, generator=g, device="cuda") * 3).to(dtype)
    w = (torch.randn(d, generator=g, device="cuda") + 1).to(dtype)
    out = rms_norm(x, w, 1e-5)
    rows = torch.arange(m)[:: max(1, m // 64)]  # the fp64 oracle on a sample of rows
    expect = ref(x[rows].cpu().double(), w.cpu().double(), 1e-5)
    _assert_matches("rms_norm", out[rows].cpu(), expect, generic(x, w, 1e-5)[rows].cpu(), dtype)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,d", [(1, 4096), (32, 4096), (4096, 4096), (7, 7168), (5, 24576)])
def test_add_rms_norm_full_shapes_on_gpu(m, d, dtype):
    """The sum is bit-equal to torch's ``residual + x``; the norm matches the oracle."""
    from chitu_cpu_ref.small_ops import chitu_rms_norm as ref

    from chitu_core.kernels.small_ops import add_rms_norm
    from chitu_core.ops.small import rms_norm as generic

    g = torch.Generator(device="cuda").manual_seed(m + d)
    x = (torch.randn(m, d, generator=g, device="cuda") * 2).to(dtype)
    r = (torch.randn(m, d, generator=g, device="cuda") * 3).to(dtype)
    w = (torch.randn(d, generator=g, device="cuda") + 1).to(dtype)
    normed, summed = add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(summed, r + x)
    rows = torch.arange(m)[:: max(1, m // 64)]
    expect = ref(summed[rows].cpu().double(), w.cpu().double(), 1e-5)
    gen = generic(summed, w, 1e-5)[rows].cpu()
    _assert_matches("add_rms_norm", normed[rows].cpu(), expect, gen, dtype)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,inter", [(1, 14336), (4096, 14336), (5, 18432), (64, 2048)])
def test_silu_and_mul_full_shapes_on_gpu(m, inter, dtype):
    from chitu_cpu_ref.small_ops import chitu_silu_and_mul as ref

    from chitu_core.kernels.small_ops import silu_and_mul
    from chitu_core.ops.small import silu_and_mul as generic

    g = torch.Generator(device="cuda").manual_seed(m + inter)
    x = (torch.randn(m, 2 * inter, generator=g, device="cuda") * 2).to(dtype)
    out = silu_and_mul(x)
    rows = torch.arange(m)[:: max(1, m // 64)]
    expect = ref(x[rows].cpu().double())
    _assert_matches("silu_and_mul", out[rows].cpu(), expect, generic(x)[rows].cpu(), dtype)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "tokens,hq,hk,d,rot,neox",
    [
        (1, 32, 8, 128, 128, True),  # Llama-3-8B decode
        (4096, 32, 8, 128, 128, True),  # Llama-3-8B prefill
        (3, 128, 1, 64, 64, False),  # DeepSeek-V3 q_pe / k_pe
        (2048, 128, 1, 64, 64, False),
        (17, 40, 8, 128, 64, True),  # partial rotary (GLM-like)
    ],
)
def test_rope_full_shapes_on_gpu(tokens, hq, hk, d, rot, neox, dtype):
    from chitu_cpu_ref.small_ops import chitu_rope as ref

    from chitu_core.kernels.small_ops import rope
    from chitu_core.ops.small import rope as generic

    max_pos = 8192
    g = torch.Generator(device="cuda").manual_seed(tokens * hq + rot)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None]
    cache = torch.cat([angles.cos(), angles.sin()], -1).float().cuda()
    # q and k as views of one fused projection, as the Llama model passes them
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=g, device="cuda").to(dtype)
    q = qkv[:, : hq * d].reshape(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].reshape(tokens, hk, d)
    positions = torch.randint(0, max_pos, (tokens,), generator=g, device="cuda")
    q_out, k_out = rope(q, k, positions, cache, neox)
    q_gen, k_gen = generic(q, k, positions, cache, neox)
    rows = torch.arange(tokens)[:: max(1, tokens // 64)]
    q_ref, k_ref = ref(q[rows].cpu().double(), k[rows].cpu().double(), positions[rows].cpu(),
                       cache.cpu(), neox)  # fmt: skip
    _assert_matches("rope", q_out[rows].cpu(), q_ref, q_gen[rows].cpu(), dtype)
    _assert_matches("rope", k_out[rows].cpu(), k_ref, k_gen[rows].cpu(), dtype)


@pytest.mark.gpu
@needs_gpu
def test_small_ops_in_a_cuda_graph():
    """Captured once, replayed on new inputs: no host sync, no stale launch arguments."""
    from chitu_core.kernels.small_ops import rms_norm, rope, silu_and_mul
    from chitu_core.ops import small as generic

    dtype, dev = torch.bfloat16, "cuda"
    x = torch.randn(1, 4096, device=dev, dtype=dtype)
    w = torch.randn(4096, device=dev, dtype=dtype) + 1
    gu = torch.randn(1, 2 * 14336, device=dev, dtype=dtype)
    q = torch.randn(1, 32, 128, device=dev, dtype=dtype)
    k = torch.randn(1, 8, 128, device=dev, dtype=dtype)
    pos = torch.tensor([5], device=dev)
    cache = torch.randn(4096, 128, device=dev)

    def step():
        return rms_norm(x, w, 1e-5), silu_and_mul(gu), *rope(q, k, pos, cache, True)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t in (x, gu, q, k):
        t.copy_(torch.randn_like(t))
    pos.fill_(4000)
    graph.replay()
    torch.cuda.synchronize()
    expect = (generic.rms_norm(x, w, 1e-5), generic.silu_and_mul(gu),
              *generic.rope(q, k, pos, cache, True))  # fmt: skip
    for out, ref in zip(outs, expect, strict=True):
        assert ((out.float() - ref.float()).abs() <= 2**-7 * ref.float().abs() + 1e-6).all()
