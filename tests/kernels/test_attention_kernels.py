"""Paged decode attention kernels (GQA and MLA): interpreter numerics, cross-compilation
for sm_80/86/90, the split policy, and full-size checks on an NVIDIA GPU.

The interpreter cases live in ``attn_interp_cases.py`` and run in subprocesses
(the interpreter must be on before triton is imported, and must not leak into
the compile tests of the same pytest run).
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
import torch  # noqa: E402
from kernel_test_helpers import CUDA_TARGETS, INTERPRETING, SMEM_LIMIT, run_cases  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from chitu_core.kernels.attn_reduce import (  # noqa: E402
    DecodeAttnConfig,
    attn_splitk_reduce_kernel,
    pick_num_splits,
    usable_splits,
)
from chitu_core.kernels.mla_decode import MLA_DECODE_CONFIG, mla_decode_kernel  # noqa: E402
from chitu_core.kernels.paged_decode import GQA_DECODE_CONFIG, paged_decode_kernel  # noqa: E402

CASES = ["gqa_fp32", "gqa_bf16", "gqa_odd_shapes", "gqa_table_full_and_strided",
         "wide_table_short_contexts", "mla_small",
         "mla_deepseek_dims", "edges"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_case_under_interpreter(case):
    run_cases("attn_interp_cases.py", "cpu", case)


# --------------------------------------------------------------------------------------
# split policy (host arithmetic)
# --------------------------------------------------------------------------------------


def test_split_policy():
    cfg = DecodeAttnConfig(target_ctas_per_sm=16.0, min_tokens_per_split=256, max_splits=64)
    # Llama-8B decode at batch 64: 512 programs on 132 SMs -> 4 splits of 1024 positions
    # (16 programs an SM), or none with the default of about 4 programs an SM.
    assert pick_num_splits(64 * 8, 4096, 132, cfg) == 4
    assert pick_num_splits(64 * 8, 4096, 132, GQA_DECODE_CONFIG) == 1
    assert pick_num_splits(32 * 8, 1024, 132, GQA_DECODE_CONFIG) == 2
    assert usable_splits(4096, 4, 64) == 4
    # batch 1: bounded by the minimum range length
    assert pick_num_splits(8, 4096, 132, cfg) == 16
    # MLA at batch 64 nearly fills one wave: not split
    assert pick_num_splits(64 * 2, 4096, 132, MLA_DECODE_CONFIG) == 1
    assert pick_num_splits(32 * 2, 1024, 132, MLA_DECODE_CONFIG) == 2
    # short tables are never split below the minimum; empty grids and tables are safe
    assert pick_num_splits(1, 100, 132, cfg) == 1
    assert pick_num_splits(0, 0, 132, cfg) == 1
    # splits whose range would be empty are dropped: 5 tiles in 4 splits -> 3 of 2 tiles
    assert usable_splits(5 * 64, 4, 64) == 3
    assert usable_splits(0, 3, 64) == 1


def test_config_validation():
    with pytest.raises(ValueError, match="block_n"):
        DecodeAttnConfig(block_n=48)
    with pytest.raises(ValueError, match="block_h"):
        DecodeAttnConfig(block_h=8)
    with pytest.raises(ValueError, match="num_warps"):
        DecodeAttnConfig(num_warps=3)


# --------------------------------------------------------------------------------------
# cross-compilation (no GPU needed)
# --------------------------------------------------------------------------------------

_PTRS = ["*bf16", "*bf16", "*bf16", "*i32", "*i32", "*bf16", "*fp32", "*fp32"]


def _source(kernel, ptr_types, ints, constexprs):
    """ASTSource with the divisibility hints the JIT derives at launch (pointers and
    16-multiple strides/lengths): without them nothing vectorises or pipelines."""
    names = kernel.arg_names
    sig = dict(zip(names[: len(ptr_types)], ptr_types, strict=True))
    sig.update({n: ("fp32" if n == "qk_scale" else "i32") for n in ints})
    aligned = list(names[: len(ptr_types)]) + [n for n in ints if n.startswith("stride_")]
    aligned += [n for n in ("max_len",) if n in ints]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    sig.update(dict.fromkeys(constexprs, "constexpr"))
    return ASTSource(kernel, sig, constexprs, attrs)


def _gqa_source(dtype: str, head_dim: int, block_size: int, is_split: bool, cfg):
    ints = ["num_heads", "group_size", "num_g_tiles", "max_len",
            "qk_scale", "stride_qb", "stride_qh", "stride_kb", "stride_kt", "stride_kh",
            "stride_vb", "stride_vt", "stride_vh", "stride_btb", "stride_ob", "stride_oh"]  # fmt: skip
    ptrs = [dtype] * 3 + ["*i32", "*i32", dtype, "*fp32", "*fp32"]
    c = dict(D=head_dim, DV=head_dim, BLOCK_D=head_dim, BLOCK_DV=head_dim, BLOCK_G=cfg.block_h,
             BLOCK_N=cfg.block_n, BLOCK_SIZE=block_size, IS_SPLIT=is_split,
             FP32_DOT=dtype == "*fp32")  # fmt: skip
    return _source(paged_decode_kernel, ptrs, ints, c)


def _mla_source(block_size: int, is_split: bool, cfg, rank=512, rope_dim=64):
    ints = ["num_heads", "max_len", "qk_scale", "stride_qlb", "stride_qlh",
            "stride_qrb", "stride_qrh", "stride_cb", "stride_ct", "stride_btb", "stride_ob",
            "stride_oh"]  # fmt: skip
    c = dict(R=rank, P=rope_dim, BLOCK_R=rank, BLOCK_P=rope_dim, BLOCK_H=cfg.block_h,
             BLOCK_N=cfg.block_n, BLOCK_SIZE=block_size, IS_SPLIT=is_split, FP32_DOT=False)  # fmt: skip
    return _source(mla_decode_kernel, _PTRS, ints, c)


def _reduce_source(dv: int):
    names = attn_splitk_reduce_kernel.arg_names
    sig = {"o_ws_ptr": "*fp32", "lse_ws_ptr": "*fp32", "context_lens_ptr": "*i32",
           "out_ptr": "*bf16"}  # fmt: skip
    sig.update({n: "i32" for n in names[4:9]})
    c = {"DV": dv, "BLOCK_DV": dv, "BLOCK_S": 16, "BLOCK_N": 64}
    sig.update(dict.fromkeys(c, "constexpr"))
    return ASTSource(attn_splitk_reduce_kernel, sig, c)


# Ampere consumer parts (sm_86) have 99 KB of shared memory a program: a quarter of
# the latent tile of the sm_80/sm_90 default.
MLA_SM86_CONFIG = DecodeAttnConfig(block_h=64, block_n=16, num_warps=8, num_stages=2,
                                   target_ctas_per_sm=1.0, max_splits=32)  # fmt: skip

VARIANTS = {
    # name: (source builder(target arch), config)
    "gqa_bf16_split_bs16": (lambda a: _gqa_source("*bf16", 128, 16, True, GQA_DECODE_CONFIG),
                            GQA_DECODE_CONFIG),
    "gqa_fp16_nosplit_bs1": (lambda a: _gqa_source("*fp16", 64, 1, False, GQA_DECODE_CONFIG),
                             GQA_DECODE_CONFIG),
    "gqa_fp32_split_bs256": (lambda a: _gqa_source("*fp32", 128, 256, True, GQA_DECODE_CONFIG),
                             GQA_DECODE_CONFIG),
    "mla_split_bs16": (lambda a: _mla_source(16, True, MLA_SM86_CONFIG if a == 86 else
                                             MLA_DECODE_CONFIG), None),
    "mla_nosplit_bs64": (lambda a: _mla_source(64, False, MLA_SM86_CONFIG if a == 86 else
                                               MLA_DECODE_CONFIG), None),
    "reduce_512": (lambda a: _reduce_source(512), DecodeAttnConfig(num_warps=4, num_stages=1)),
}  # fmt: skip


@pytest.mark.skipif(INTERPRETING, reason="compile tests need compiled (not interpreted) kernels")
@pytest.mark.parametrize("target", CUDA_TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_kernel_compiles_for_cuda(target, name):
    build, cfg = VARIANTS[name]
    if cfg is None:
        cfg = MLA_SM86_CONFIG if target.arch == 86 else MLA_DECODE_CONFIG
    kernel = triton.compile(
        build(target.arch), target=target,
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )  # fmt: skip
    assert "cubin" in kernel.asm
    assert kernel.metadata.shared <= SMEM_LIMIT[target.arch], (
        f"{name} needs {kernel.metadata.shared} B of shared memory on sm_{target.arch}"
    )
    if name.startswith(("gqa_bf16", "mla")):  # cache tiles stream through cp.async
        assert "cp.async" in kernel.asm["ptx"], f"{name}: loads not pipelined"


# --------------------------------------------------------------------------------------
# NVIDIA GPU: the interpreter cases compiled, full shapes, graph capture
# --------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", CASES)
def test_case_on_gpu(case):
    run_cases("attn_interp_cases.py", "cuda", case)


def _paged_problem(batch, max_ctx, block_size, kv_heads, width, dtype, seed, full=False):
    """Random contexts (all ``max_ctx`` when ``full``), permuted blocks, garbage table
    tails; returns (cache [.., kv_heads, width], block_tables, context_lens)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if full:
        lens = torch.full((batch,), max_ctx, dtype=torch.int32, device="cuda")
    else:
        lens = torch.randint(1, max_ctx + 1, (batch,), generator=g, device="cuda").int()
        lens[0] = 1
    max_blocks = -(-max_ctx // block_size) + 1
    num_blocks = batch * max_blocks
    perm = torch.randperm(num_blocks, generator=g, device="cuda").int()
    tables = perm.view(batch, max_blocks).clone()
    starts = torch.arange(max_blocks, device="cuda") * block_size
    tables[starts[None, :] >= lens[:, None]] = -(2**31)  # garbage past the end
    cache = torch.randn(num_blocks, block_size, kv_heads, width, generator=g, device="cuda")
    return cache.to(dtype), tables, lens


def _rel_err(out, ref):
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("block_size", [16, 1, 64, 256])
@pytest.mark.parametrize("batch,max_ctx,full", [(64, 4096, True), (7, 3000, False)])
def test_gqa_full_shapes_on_gpu(batch, max_ctx, full, block_size):
    from chitu_core.kernels.paged_decode import paged_attention_decode
    from chitu_core.ops.attention import paged_attention_decode as generic

    k, tables, lens = _paged_problem(batch, max_ctx, block_size, 8, 128, torch.bfloat16, 1, full)
    v = torch.randn_like(k)
    q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    safe = tables.clamp(min=0)
    ref = generic(q.float(), k.float(), v.float(), safe, lens, 128**-0.5)
    for splits in (None, 1, 5):
        out = paged_attention_decode(q, k, v, tables, lens, 128**-0.5, num_splits=splits)
        assert out.dtype == torch.bfloat16
        assert _rel_err(out, ref) < 1.5e-2, f"splits={splits}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("batch,max_ctx,full", [(64, 4096, True), (5, 2000, False)])
def test_mla_full_shapes_on_gpu(batch, max_ctx, full, block_size):
    from chitu_core.kernels.mla_decode import mla_decode
    from chitu_core.ops.attention import mla_decode as generic

    cache, tables, lens = _paged_problem(batch, max_ctx, block_size, 1, 576, torch.bfloat16, 2,
                                         full)  # fmt: skip
    q_latent = torch.randn(batch, 128, 512, device="cuda", dtype=torch.bfloat16) * 0.1
    q_rope = torch.randn(batch, 128, 64, device="cuda", dtype=torch.bfloat16)
    scale = 192**-0.5
    ref = generic(q_latent.float(), q_rope.float(), cache.float(), tables.clamp(min=0), lens, scale)
    for splits in (None, 1, 3):
        out = mla_decode(q_latent, q_rope, cache, tables, lens, scale, num_splits=splits)
        assert _rel_err(out, ref) < 1.5e-2, f"splits={splits}"


@pytest.mark.gpu
@needs_gpu
def test_decode_is_graph_capturable():
    """No host sync: both launchers capture into a CUDA graph and replay on new lengths."""
    from chitu_core.kernels.mla_decode import mla_decode
    from chitu_core.kernels.paged_decode import paged_attention_decode

    k, tables, lens = _paged_problem(4, 512, 16, 2, 64, torch.bfloat16, 3, True)
    q = torch.randn(4, 8, 64, device="cuda", dtype=torch.bfloat16)
    lat, lat_tables, lat_lens = _paged_problem(4, 512, 16, 1, 80, torch.bfloat16, 4, True)
    ql = torch.randn(4, 16, 64, device="cuda", dtype=torch.bfloat16)
    qr = torch.randn(4, 16, 16, device="cuda", dtype=torch.bfloat16)

    def step():
        return (paged_attention_decode(q, k, k, tables, lens, 0.125),
                mla_decode(ql, qr, lat, lat_tables, lat_lens, 0.1))  # fmt: skip

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    lens.copy_(torch.tensor([1, 100, 511, 512], dtype=torch.int32))
    lat_lens.copy_(torch.tensor([512, 3, 1, 200], dtype=torch.int32))
    graph.replay()
    expect = step()
    torch.cuda.synchronize()
    for got, want in zip(outs, expect, strict=True):
        assert torch.equal(got, want)
