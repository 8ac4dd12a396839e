"""NVIDIA plugin checks that need no GPU: weight handles, hook names, native kernels compile for sm_90."""

from __future__ import annotations

import pytest
import torch

from chitu_core import hookspecs
from chitu_core.quant import (
    FORMAT_FP8_BLOCK128,
    FORMAT_UNQUANTIZED,
    QuantizedWeight,
    quantize_block_fp8,
)

pytest.importorskip("triton")
from chitu_nvidia import plugin  # noqa: E402
from kernel_test_helpers import INTERPRETING, SMEM_LIMIT  # noqa: E402

from chitu_core.kernels.fp8_gemm import permute_k  # noqa: E402
from chitu_core.kernels.packed_weight import PackedWeight  # noqa: E402

# Ahead-of-time compiles for GPU targets (no GPU needed) cannot run in a process with the
# Triton interpreter on (TRITON_INTERPRET=1).
needs_compiler = pytest.mark.skipif(
    INTERPRETING, reason="compiles kernels for GPU targets; TRITON_INTERPRET=1 is set"
)


def test_hookimpl_names_match_specs():
    import inspect

    for name, fn in vars(plugin).items():
        if name.startswith("chitu_") and callable(fn):
            spec = getattr(hookspecs, name)
            impl_args = list(inspect.signature(fn).parameters)
            spec_args = list(inspect.signature(spec).parameters)
            assert set(impl_args) <= set(spec_args), name


def test_prepare_weight_keeps_fp8_one_byte():
    w, s = quantize_block_fp8(torch.randn(300, 260))
    h = plugin.chitu_prepare_weight(w, s, FORMAT_FP8_BLOCK128)
    assert isinstance(h, PackedWeight)
    assert h.weight.dtype == torch.uint8 and h.weight.element_size() == 1
    assert h.out_features == 300 and h.in_features == 260 and h.num_experts is None
    # K = 260 is no multiple of 16: kept in K order
    assert not h.k_perm and torch.equal(h.weight, w.view(torch.uint8))
    torch.testing.assert_close(
        h.as_quantized().dequantize(), QuantizedWeight(w, s, FORMAT_FP8_BLOCK128).dequantize()
    )


def test_prepare_weight_k_permutes_for_the_wide_kernel():
    """[N, K] FP8 weights with K % 16 == 0 are K-permuted at load (the wide kernel's
    layout; native kernels permute x alike); the generic view still reads K order."""
    w, s = quantize_block_fp8(torch.randn(256, 384))
    q = QuantizedWeight(w, s, FORMAT_FP8_BLOCK128)
    h = plugin.chitu_prepare_weight(w, s, FORMAT_FP8_BLOCK128)
    assert h.k_perm and torch.equal(h.weight, permute_k(w.view(torch.uint8)))
    assert torch.equal(h.as_quantized().weight.view(torch.uint8), w.view(torch.uint8))
    assert torch.equal(h.fp8_view().view(torch.uint8), w.view(torch.uint8))
    assert h.stored_fp8().data_ptr() == h.weight.data_ptr()  # a view, no copy
    torch.testing.assert_close(h.as_quantized().dequantize(), q.dequantize())
    experts, es = quantize_block_fp8(torch.randn(2, 128, 128))
    assert not plugin.chitu_prepare_weight(experts, es, FORMAT_FP8_BLOCK128).k_perm


def test_prepare_weight_records_nan_codes():
    """The NaN-free widening is chosen per weight: only a weight with no 0x7F/0xFF code
    may skip the NaN fix (real checkpoints hold none; a NaN code must still give NaN)."""
    w, s = quantize_block_fp8(torch.randn(256, 256))
    assert plugin.chitu_prepare_weight(w, s, FORMAT_FP8_BLOCK128).has_nan_codes is False
    for code in (0x7F, 0xFF):
        bits = w.view(torch.uint8).clone()
        bits[200, 3] = code
        h = plugin.chitu_prepare_weight(bits.view(torch.float8_e4m3fn), s, FORMAT_FP8_BLOCK128)
        assert h.has_nan_codes is True
    experts, es = quantize_block_fp8(torch.randn(3, 128, 128))
    bits = experts.view(torch.uint8).clone()
    bits[2, 5, 7] = 0xFF
    assert plugin.chitu_prepare_weight(experts, es, FORMAT_FP8_BLOCK128).has_nan_codes is False
    assert plugin.chitu_prepare_weight(bits, es, FORMAT_FP8_BLOCK128).has_nan_codes is True


def test_prepare_weight_experts_and_dense():
    w, s = quantize_block_fp8(torch.randn(4, 256, 128))
    h = plugin.chitu_prepare_weight(w, s, FORMAT_FP8_BLOCK128)
    assert h.num_experts == 4 and h.scale.shape == (4, 2, 1)
    d = plugin.chitu_prepare_weight(torch.randn(8, 16).bfloat16(), None, FORMAT_UNQUANTIZED)
    assert d.weight.dtype == torch.bfloat16 and d.scale is None
    with pytest.raises(ValueError):
        plugin.chitu_prepare_weight(w, None, FORMAT_FP8_BLOCK128)


@needs_compiler
def test_native_fp8_kernels_compile_for_sm90():
    import triton
    from chitu_nvidia.native_fp8 import act_quant_kernel, w8a8_block_gemm_kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    sig = {"x_ptr": "*bf16", "xq_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
           "num_groups": "i32", "GROUPS_PER_PROGRAM": "constexpr", "K_PERM": "constexpr"}  # fmt: skip
    for k_perm in (False, True):  # K-permuted: x meets the weight's permute_k layout
        const = {"GROUPS_PER_PROGRAM": 8, "K_PERM": k_perm}
        triton.compile(ASTSource(act_quant_kernel, sig, const), target=target)
    sig = {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv", "bs_ptr": "*fp32",
           "bias_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "stride_bsn": "i32", "stride_bsk": "i32"}  # fmt: skip
    const = {"HAS_BIAS": True, "EVEN_K": True, "BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}
    sig.update(dict.fromkeys(const, "constexpr"))
    k = triton.compile(
        ASTSource(w8a8_block_gemm_kernel, sig, const), target=target, options={"num_warps": 8}
    )
    assert "cubin" in k.asm


@needs_compiler
@pytest.mark.parametrize("arch", [(8, 0), (8, 6), (8, 9), (9, 0)], ids=lambda a: f"sm_{a[0]}{a[1]}")
def test_every_soft_fp8_table_config_compiles_for_its_gpu(arch):
    """Each row of the per-arch tables builds a cubin for that arch within its shared memory
    (how the Ampere rows, never timed on Ampere here, are known to run there)."""
    import triton
    from chitu_nvidia.configs import SOFT_FP8_TABLES, SOFT_FP8_TABLES_K_PERM, soft_fp8_config
    from triton.backends.compiler import GPUTarget

    from chitu_core.kernels.fp8_gemm import kernel_source

    target = GPUTarget("cuda", arch[0] * 10 + arch[1], 32)
    for k_perm, tables in ((False, SOFT_FP8_TABLES), (True, SOFT_FP8_TABLES_K_PERM)):
        rows = tables[arch]
        assert rows[-1].max_m >= 1 << 62, "the last row must cover every M"
        for row in rows:
            assert soft_fp8_config(arch, row.max_m, row.max_k, row.min_n, k_perm) is row.config
            cfg = row.config
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            # what a real checkpoint runs
            src = kernel_source(cfg, nan_codes=False, k_perm=k_perm)
            kernel = triton.compile(src, target=target, options=opts)
            assert "cubin" in kernel.asm
            assert kernel.metadata.shared <= SMEM_LIMIT[target.arch], f"M <= {row.max_m}: {cfg}"


def test_soft_fp8_config_rows_by_m_k_and_n():
    from chitu_nvidia.configs import soft_fp8_config

    for arch in ((8, 0), (8, 6), (9, 0)):
        assert soft_fp8_config(arch, 48, 4096).kind == "wide"  # the K <= 4096 row
        assert soft_fp8_config(arch, 48, 7168).kind == "gemv"
        assert soft_fp8_config(arch, 48).kind == "gemv"  # K unknown: rows without max_k
        assert soft_fp8_config(arch, 100, 7168, 18432).kind == "wide"  # the N >= 4096 row
        assert soft_fp8_config(arch, 100, 7168, 2112).kind == "dequant"
        assert soft_fp8_config(arch, 100, 7168).kind == "dequant"  # N unknown
        assert soft_fp8_config(arch, 129, 4096).kind == "dequant"
    assert soft_fp8_config((12, 0), 1, 4096) is soft_fp8_config((9, 0), 1, 4096)  # newer: sm_90's


def test_split_k_pick_and_its_cap():
    from chitu_core.kernels.fp8_gemm import pick_split_k

    # Llama-8B's down projection at M = 32 (64 tiles of 64 rows, 112 K tiles), 132 SMs
    assert pick_split_k(64, 112, 132) == 8
    assert pick_split_k(64, 112, 132, max_split=4) == 4
    # a cap above the free pick changes nothing: the lm head (2020 tiles) keeps 2
    assert pick_split_k(2020, 56, 132) == pick_split_k(2020, 56, 132, max_split=4) == 2
    assert pick_split_k(448, 32, 132, max_split=4) == 2  # 4096 x 28672: 2 fills the waves
    assert pick_split_k(8, 2, 132) == 1  # a slice keeps >= 2 K tiles


def test_split_k_pick_with_a_target_per_sm():
    from chitu_nvidia.configs import soft_fp8_config

    from chitu_core.kernels.fp8_gemm import Fp8GemmConfig, pick_split_k

    # 4096 x 6144 at M <= 16 (96 tiles, 32 K tiles), target 4 x 132 = 528 programs: 5 slices
    # (480) and 6 (576) are equally near, the fewer win; the whole-wave pick takes 11 (1056)
    assert pick_split_k(96, 32, 132, 8, 4.0) == 5
    assert pick_split_k(96, 32, 132, 16) == 11
    assert pick_split_k(448, 32, 132, 8, 4.0) == 1  # 4096 x 28672: 448 programs already
    assert pick_split_k(224, 32, 132, 8, 4.0) == 2  # 4096 x 14336: 448 against 672
    assert pick_split_k(64, 16, 132, 8, 4.0) == 8  # the cap, every slice with 2 K tiles
    assert pick_split_k(64, 4, 132, 8, 4.0) == 2  # >= 2 K tiles a slice beats the target
    assert pick_split_k(96, 32, 108, 8, 4.0) == 4  # A100: 432 programs for 432
    for m in (2, 4, 16):
        for k_perm in (False, True):
            cfg = soft_fp8_config((9, 0), m, 4096, 6144, k_perm)
            assert (cfg.kind, cfg.target_ctas_per_sm, cfg.max_split_k) == ("mm", 4.0, 8)
    with pytest.raises(ValueError, match="target_ctas_per_sm"):
        Fp8GemmConfig(target_ctas_per_sm=-1.0)


@pytest.mark.parametrize("arch", [(8, 0), (8, 6), (9, 0)])
def test_k_perm_table_splits(arch):
    """The K-permuted table's split choices (configs.py, second pass), row by row."""
    from chitu_nvidia.configs import soft_fp8_config

    def split(m, k, n):
        c = soft_fp8_config(arch, m, k, n, True)
        return c.kind, c.split_k, c.target_ctas_per_sm, c.num_warps

    assert split(1, 4096, 28672) == ("gemv", 0, 8.0, 4)  # N >= 14336
    assert split(1, 4096, 6144) == ("gemv", 0, 0.0, 8)
    assert split(1, 512, 32768) == ("gemv", 0, 0.0, 8)  # K <= 1024: the whole-wave GEMV
    assert split(32, 7168, 18432) == ("wide", 0, 3.0, 4)  # K > 4096, N >= 14336
    assert split(32, 4096, 28672) == ("wide", 1, 0.0, 4)
    assert split(32, 7168, 2112) == ("gemv", 0, 4.0, 4)  # N < 4096: the swap-AB GEMV
    assert split(32, 4096, 3072) == ("gemv", 0, 4.0, 4)
    assert split(32, 4096, 6144) == ("wide", 0, 3.0, 4)  # K <= 4096, N >= 6144
    assert split(32, 2048, 7168) == ("mm", 0, 0.0, 4)  # K <= 2048 keeps the mm tile
    assert split(32, 14336, 4096) == ("wide", 0, 3.0, 4)  # K > 4096, N >= 4096
    assert split(32, 18432, 7168) == ("wide", 0, 0.0, 4)  # N >= 7168: the whole-wave pick
    assert split(64, 2048, 4096)[:2] == ("wide", 2)
    assert split(64, 4096, 6144)[:2] == ("wide", 4)
    assert split(64, 14336, 4096)[:3] == ("wide", 0, 3.0)
    assert split(64, 18432, 7168)[:3] == ("wide", 0, 0.0)
    assert split(128, 4096, 6144)[:2] == ("wide", 2)
    assert split(128, 18432, 7168)[:2] == ("wide", 2)
    assert split(128, 14336, 4096)[:2] == ("wide", 4)


def test_plugin_binds_and_its_fused_moe_reads_its_own_handles():
    """The weight group (prepare_weight, linear, fused_moe) must bind together."""
    import torch
    from chitu_nvidia import plugin

    from chitu_core.backend import InstalledBackend, _register, bind_ops, native_op_names
    from chitu_core.ops.moe import fused_moe as generic_fused_moe
    from chitu_core.quant import quantize_fp8

    pm = _register(plugin, "nvidia")
    backend = InstalledBackend(
        "nvidia",
        "chitu-nvidia",
        "0",
        info=pm.hook.chitu_backend_info(),
        native_ops=native_op_names(pm),
        plugin_manager=pm,
    )
    ops = bind_ops(backend)  # raised PluginLoadError while fused_moe was missing
    assert {"prepare_weight", "linear", "fused_moe"} <= ops.native

    gen = torch.Generator().manual_seed(0)
    w13 = quantize_fp8(torch.randn(4, 256, 128, generator=gen) * 0.1)
    w2 = quantize_fp8(torch.randn(4, 128, 128, generator=gen) * 0.1)
    x = torch.randn(3, 128, generator=gen)
    weights, ids = (
        torch.rand(3, 2, generator=gen),
        torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32),
    )
    handles = [ops.prepare_weight(w.weight, w.scale, w.fmt) for w in (w13, w2)]
    out = ops.fused_moe(x, *handles, weights, ids)
    torch.testing.assert_close(out, generic_fused_moe(x, w13, w2, weights, ids))


def test_fp32_attention_takes_the_generic_ops():
    """fp32 never reaches the Triton attention kernels (their tiles are sized for 2-byte
    elements: the sm_90 MLA prefill tile needs 311 KB of shared memory in fp32): the
    hooks return the generic op's result without looking up a GPU."""
    from chitu_nvidia import attention

    from chitu_core.ops import attention as generic

    torch.manual_seed(0)
    t, h, r, p, bs = 3, 2, 16, 8, 4
    cache = torch.randn(4, bs, 1, r + p)
    tables = torch.tensor([[1, 2]], dtype=torch.int32)
    cu, lens = torch.tensor([0, t], dtype=torch.int32), torch.tensor([t], dtype=torch.int32)
    q_lat, q_rope = torch.randn(t, h, r), torch.randn(t, h, p)
    args = (q_lat, q_rope, cache, tables, cu, lens, 0.1)
    assert torch.equal(attention.mla_prefill(*args), generic.mla_prefill(*args))
    args = (q_lat[:1], q_rope[:1], cache, tables, lens, 0.1)
    assert torch.equal(attention.mla_decode(*args), generic.mla_decode(*args))
    k, v = torch.randn(4, bs, 1, 8), torch.randn(4, bs, 1, 8)
    q = torch.randn(t, 2, 8)
    args = (q, k, v, tables, cu, lens, 0.3)
    assert torch.equal(
        attention.paged_attention_prefill(*args), generic.paged_attention_prefill(*args)
    )
    args = (q[:1], k, v, tables, lens, 0.3)
    assert torch.equal(
        attention.paged_attention_decode(*args), generic.paged_attention_decode(*args)
    )


@needs_compiler
@pytest.mark.parametrize("arch", [80, 86, 90], ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("fused", [False, True], ids=["all_reduce", "add_rms_norm"])
def test_peer_store_all_reduce_kernels_compile(arch, dtype, fused):
    """The TP all-reduce kernels (system-scope release/acquire, globaltimer, trap) build a
    cubin for Ampere and Hopper, with the peer stores vectorized (16-byte stores: the
    peers are addressed from an aligned pointer, not cast from integers)."""
    import triton
    from chitu_nvidia import p2p_all_reduce as p2p
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    elt_bytes = 2 if dtype == "bf16" else 4
    tail = {"buf_ptr": f"*{dtype}", "flags_ptr": "*i64", "deltas_ptr": "*i64",
            "state_ptr": "*i64", "rank": "i32"}  # fmt: skip
    const = {"WORLD": 2, "ELT_BYTES": elt_bytes, "SLOT_BYTES": p2p.MAX_BYTES,
             "FLAGS_BYTES": p2p.FLAGS_BYTES, "MAX_WORLD": p2p.MAX_GROUP_SIZE}  # fmt: skip
    if fused:
        kernel = p2p.push_all_reduce_add_rms_norm_kernel
        sig = {"x_ptr": f"*{dtype}", "res_ptr": f"*{dtype}", "w_ptr": f"*{dtype}",
               "out_ptr": f"*{dtype}", "sum_ptr": f"*{dtype}", **tail, "D": "i32",
               "eps": "fp32", "timeout_ns": "i64"}  # fmt: skip
        const["BLOCK_D"] = 4096
        aligned = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10)
    else:
        kernel = p2p.push_all_reduce_kernel
        sig = {"x_ptr": f"*{dtype}", **tail, "numel": "i32", "timeout_ns": "i64"}
        const["BLOCK"] = p2p.BLOCK_BYTES // elt_bytes
        aligned = (0, 1, 2, 3, 4, 6)
    sig.update(dict.fromkeys(const, "constexpr"))
    # What the launcher specializes for 16-byte aligned pointers and sizes divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    compiled = triton.compile(
        ASTSource(kernel, sig, const, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": 8 if fused else 4},
    )
    ptx = compiled.asm["ptx"]
    assert "cubin" in compiled.asm
    assert "atom.global.sys.release.exch.b64" in ptx and "acquire" in ptx
    assert "%globaltimer" in ptx and "trap;" in ptx
    assert "st.global.v4.b32" in ptx


def test_peer_store_all_reduce_routing():
    """Which tensors the peer-store path takes: contiguous bf16/fp16/fp32 on its device,
    1 byte up to MAX_BYTES; everything else (prefill sizes, int tensors, views) goes to
    NCCL. The answer depends only on the shape and dtype, the same on every TP rank."""
    from chitu_nvidia import p2p_all_reduce as p2p

    path = object.__new__(p2p.PushAllReduce)  # no symmetric memory needed to route
    path.device = torch.device("cpu")
    rows = p2p.MAX_BYTES // (4096 * 2)
    assert path.takes(torch.zeros(rows, 4096, dtype=torch.bfloat16))
    assert not path.takes(torch.zeros(rows + 1, 4096, dtype=torch.bfloat16))
    assert path.takes(torch.zeros(1, 4096, dtype=torch.float16))
    assert path.takes(torch.zeros(rows // 2, 4096, dtype=torch.float32))
    assert not path.takes(torch.zeros(rows // 2 + 1, 4096, dtype=torch.float32))
    assert not path.takes(torch.zeros(8, 4096, dtype=torch.int32))
    assert not path.takes(torch.zeros(0, 4096, dtype=torch.bfloat16))
    assert not path.takes(torch.zeros(4096, 8, dtype=torch.bfloat16).t())  # not contiguous
    # One program slice is BLOCK_BYTES; the largest tensor needs at most MAX_PROGRAMS.
    assert p2p.MAX_BYTES // p2p.BLOCK_BYTES == p2p.MAX_PROGRAMS
    assert p2p.MAX_PROGRAMS * p2p.MAX_GROUP_SIZE * 8 <= p2p.FLAGS_BYTES
