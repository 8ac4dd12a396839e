"""store_kv kernel (paged KV-cache write): interpreter bit-exactness, cross-compilation for
sm_80/86/90, the NVIDIA hook's fallback, and full-size checks on an NVIDIA GPU.

The interpreter cases live in ``store_kv_interp_cases.py`` and run in subprocesses
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

from chitu_core.kernels.store_kv import store_kv_geometry, store_kv_kernel  # noqa: E402

CASES = ["dtypes", "rounding", "mla", "fused_views", "block_sizes", "edges"]


def test_cases_under_interpreter():
    """All cases in one subprocess (each takes well under a second interpreted)."""
    run_cases("store_kv_interp_cases.py", "cpu", *CASES, PYTHONWARNINGS="ignore::RuntimeWarning")


# --------------------------------------------------------------------------------------
# launch geometry (host arithmetic)
# --------------------------------------------------------------------------------------


def test_geometry():
    # Llama-3-8B: one program a token writes all 8 kv heads of K and of V
    assert store_kv_geometry(8, 128, 128) == (8, 128, 128, 4)
    # TP-8 Llama-70B (one kv head) and a DeepSeek-V3 latent (1 x 576): one program a token
    assert store_kv_geometry(1, 128, 128)[:3] == (1, 128, 128)
    assert store_kv_geometry(1, 576, 0) == (1, 1024, 1, 4)
    # 32 kv heads of 128 (MHA): 4 tiles of 8 heads; Dv != D takes the wider block
    assert store_kv_geometry(32, 128, 128)[0] == 8
    assert store_kv_geometry(4, 192, 128)[:3] == (4, 256, 128)


# --------------------------------------------------------------------------------------
# cross-compilation (no GPU needed)
# --------------------------------------------------------------------------------------


def _source(k_dtype: str, cache_dtype: str, heads: int, dim: int, dim_v: int):
    """ASTSource with the specialisations the JIT derives at launch: 16-aligned pointers
    and strides (without them the copies are not vectorised), ``stride_slot == 1``."""
    has_value = dim_v > 0
    block_h, block_d, block_dv, num_warps = store_kv_geometry(heads, dim, dim_v)
    types = {"k_ptr": k_dtype, "v_ptr": k_dtype, "kc_ptr": cache_dtype, "vc_ptr": cache_dtype,
             "slot_ptr": "*i64", "H": "i32", "stride_kt": "i32", "stride_kh": "i32",
             "stride_vt": "i32", "stride_vh": "i32", "row_k": "i32", "row_v": "i32"}  # fmt: skip
    constexprs = dict(stride_slot=1, D=dim, DV=max(dim_v, 1), BLOCK_H=block_h, BLOCK_D=block_d,
                      BLOCK_DV=block_dv, HAS_VALUE=has_value, BF16_BITS_K=False,
                      BF16_BITS_V=False)  # fmt: skip
    names = store_kv_kernel.arg_names
    sig = dict(types)
    sig.update(dict.fromkeys(constexprs, "constexpr"))
    aligned = [n for n in types if n != "H"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return ASTSource(store_kv_kernel, sig, constexprs, attrs), num_warps


VARIANTS = {
    # name: (ASTSource, num_warps, PTX substrings that must appear)
    "llama8b_bf16": _source("*bf16", "*bf16", 8, 128, 128) + (("ld.global.v4", "st.global.v4"),),
    "mla_latent_bf16": _source("*bf16", "*bf16", 1, 576, 0) + (("st.global.v4",),),
    "fp32_into_bf16": _source("*fp32", "*bf16", 8, 128, 128) + (("cvt.rn.bf16",),),
    "fp32_into_fp16": _source("*fp32", "*fp16", 2, 64, 64) + (("cvt.rn.f16",),),
    "bf16_into_fp32": _source("*bf16", "*fp32", 4, 64, 64) + (("st.global.v4",),),
    "fp16_mha_dv_differs": _source("*fp16", "*fp16", 32, 192, 128) + (("st.global",),),
}  # fmt: skip


@pytest.mark.skipif(INTERPRETING, reason="compile tests need compiled (not interpreted) kernels")
@pytest.mark.parametrize("target", CUDA_TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_kernel_compiles_for_cuda(target, name):
    source, num_warps, markers = VARIANTS[name]
    kernel = triton.compile(source, target=target, options={"num_warps": num_warps})
    assert "cubin" in kernel.asm
    for marker in markers:
        assert marker in kernel.asm["ptx"], f"{name}: no {marker} in the PTX"
    assert kernel.metadata.shared == 0, f"{name}: {kernel.metadata.shared} B of shared memory"


# --------------------------------------------------------------------------------------
# the NVIDIA hook: signature and the generic fallback (no kernel launch needed)
# --------------------------------------------------------------------------------------


def test_nvidia_hookimpl_matches_the_spec():
    from chitu_nvidia import plugin

    from chitu_core import hookspecs

    impl, spec = plugin.chitu_store_kv, hookspecs.chitu_store_kv
    assert inspect.signature(impl) == inspect.signature(spec)


def test_nvidia_fallback_runs_generic_and_logs_once(caplog):
    from chitu_nvidia import small_ops

    from chitu_core.ops.attention import store_kv as generic

    small_ops._logged.discard("store_kv")
    key = torch.randn(3, 2, 8, dtype=torch.float64)  # fp64: the kernel raises ValueError
    value = torch.randn(3, 2, 8, dtype=torch.float64)
    slots = torch.tensor([5, 0, 2])
    kc, vc = torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    with caplog.at_level(logging.WARNING, logger="chitu_nvidia.small_ops"):
        small_ops.store_kv(key, value, kc, vc, slots)
        small_ops.store_kv(key, value, kc, vc, slots)
    generic(key, value, kc_ref, vc_ref, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("store_kv:"), messages


# --------------------------------------------------------------------------------------
# NVIDIA GPU: the interpreter cases compiled, full shapes, graph capture
# --------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def _assert_same_bits(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    int_ty = {2: torch.int16, 4: torch.int32}[out.element_size()]
    assert torch.equal(out.view(int_ty), ref.view(int_ty)), what


@pytest.mark.gpu
@needs_gpu
def test_cases_on_gpu():
    run_cases("store_kv_interp_cases.py", "cuda", *CASES, PYTHONWARNINGS="ignore::RuntimeWarning")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "tokens,hq,hkv,d,block_size",
    [
        (1, 32, 8, 128, 16),  # Llama-3-8B decode
        (4096, 32, 8, 128, 16),  # Llama-3-8B prefill
        (64, 64, 8, 128, 64),  # Llama-70B batch-64 decode
        (3000, 8, 1, 128, 1),  # TP-8 shard, block size 1
        (17, 40, 40, 128, 16),  # MHA, 5 head tiles
    ],
)
def test_mha_full_shapes_on_gpu(tokens, hq, hkv, d, block_size, cache_dtype, in_dtype):
    """K and V as views of one fused projection, as the Llama model passes them."""
    from chitu_core.kernels.store_kv import store_kv
    from chitu_core.ops.attention import store_kv as generic

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(tokens * hkv + block_size)
    num_blocks = (tokens + 5) // block_size + 8
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=g, device=dev).to(in_dtype) * 8
    _, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    k, v = k.reshape(tokens, hkv, d), v.reshape(tokens, hkv, d)
    slots = torch.randperm(num_blocks * block_size, generator=g, device=dev)[:tokens]
    shape = (num_blocks, block_size, hkv, d)
    kc = torch.randn(shape, generator=g, device=dev).to(cache_dtype)
    vc = torch.randn(shape, generator=g, device=dev).to(cache_dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv(k, v, kc, vc, slots)
    generic(k, v, kc_ref, vc_ref, slots)
    _assert_same_bits(kc, kc_ref, "key_cache")
    _assert_same_bits(vc, vc_ref, "value_cache")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,block_size", [(1, 64), (4096, 64), (333, 1)])
def test_mla_latent_full_shapes_on_gpu(tokens, block_size, in_dtype):
    """DeepSeek-V3's latent (512 + 64) into a bf16 cache, value None."""
    from chitu_core.kernels.store_kv import store_kv
    from chitu_core.ops.attention import store_kv as generic

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(tokens + block_size)
    num_blocks = tokens // block_size + 4
    c_kv = torch.randn(tokens, 512, generator=g, device=dev).to(in_dtype)
    k_pe = torch.randn(tokens, 1, 64, generator=g, device=dev).to(in_dtype)
    latent = torch.cat([c_kv[:, None], k_pe], dim=-1)
    slots = torch.randperm(num_blocks * block_size, generator=g, device=dev)[:tokens]
    cache = torch.randn(num_blocks, block_size, 1, 576, generator=g, device=dev).bfloat16()
    ref = cache.clone()
    store_kv(latent, None, cache, None, slots)
    generic(latent, None, ref, None, slots)
    _assert_same_bits(cache, ref, "latent_cache")


@pytest.mark.gpu
@needs_gpu
def test_store_kv_in_a_cuda_graph():
    """Captured once, replayed on new keys, values and slots: no host sync, no stale
    launch arguments; the hook (through the NVIDIA wrapper) as the engine calls it."""
    from chitu_nvidia.small_ops import store_kv

    from chitu_core.ops.attention import store_kv as generic

    dev, dtype = "cuda", torch.bfloat16
    hq, hkv, d, block_size, num_blocks, batch = 32, 8, 128, 16, 64, 4
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, device=dev, dtype=dtype)
    _, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    k, v = k.view(batch, hkv, d), v.view(batch, hkv, d)
    latent = torch.randn(batch, 1, 576, device=dev, dtype=dtype)
    slots = torch.tensor([3, 100, 17, 999], device=dev)
    kc = torch.zeros(num_blocks, block_size, hkv, d, device=dev, dtype=dtype)
    vc = torch.zeros_like(kc)
    lc = torch.zeros(num_blocks, block_size, 1, 576, device=dev, dtype=dtype)

    def step():
        store_kv(k, v, kc, vc, slots)
        store_kv(latent, None, lc, None, slots)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for cache in (kc, vc, lc):
        cache.zero_()
    refs = [torch.zeros_like(c) for c in (kc, vc, lc)]
    for new_slots in ([0, 1, 2, 3], [1023, 512, 64, 7]):
        qkv.copy_(torch.randn_like(qkv))
        latent.copy_(torch.randn_like(latent))
        slots.copy_(torch.tensor(new_slots))
        graph.replay()
        generic(k, v, refs[0], refs[1], slots)
        generic(latent, None, refs[2], None, slots)
    torch.cuda.synchronize()
    for out, ref, name in zip((kc, vc, lc), refs, ("key", "value", "latent"), strict=True):
        _assert_same_bits(out, ref, name)
