"""The paged prefill attention kernel: interpreter numerics, cross-compilation, GPU runs.

* Interpreter: ``prefill_interp_cases.py`` under TRITON_INTERPRET=1, each group of
  cases in its own subprocess (the interpreter must be on before triton defines the
  kernel, and must not leak into the compile tests). The groups start together, so
  they share the machine's cores.
* Compile: every kernel variant (MHA/GQA with a value cache, MLA with the rope split
  and the value taken from the key tile) down to a cubin for sm_80, sm_86 and sm_90,
  with the 16-byte divisibility a real launch specialises on (it switches on the
  pipelined async copies).
* GPU (``@pytest.mark.gpu``): the benchmark shapes against the generic torch op.
"""

from __future__ import annotations

import sys

import pytest
import torch

triton = pytest.importorskip("triton")
from kernel_test_helpers import HERE, INTERPRETING, ROOT, finish_cases, start_cases  # noqa: E402

HAS_NVIDIA_GPU = torch.cuda.is_available() and torch.version.hip is None

# Cases per subprocess: fewer interpreter start-ups, still a readable failure.
CASE_GROUPS = {
    "gqa": ["gqa_fp32", "gqa_bf16"],
    "prefix_and_empty": ["long_prefix", "empty"],
    "mla": ["mla_small", "mla_real_dims"],
}


@pytest.fixture(scope="module")
def interp_runs():
    """Start every case group at once under the interpreter; tests wait on their own."""
    procs = {
        group: start_cases("prefill_interp_cases.py", "cpu", *cases)
        for group, cases in CASE_GROUPS.items()
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------
# argument checks (no launch)
# --------------------------------------------------------------------------------------


def test_config_rejects_bad_values():
    from chitu_core.kernels.paged_prefill import PrefillConfig

    for bad in ({"block_m": 8}, {"block_n": 48}, {"pack_heads": 0}, {"num_warps": 3},
                {"num_stages": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            PrefillConfig(**bad)


def test_launchers_reject_bad_inputs():
    from chitu_core.kernels.paged_prefill import mla_prefill, paged_attention_prefill

    q = torch.zeros(3, 6, 16)
    cache = torch.zeros(2, 4, 4, 16)  # 6 query heads do not share 4 kv heads
    tables, cu = torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    ctx = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="kv heads"):
        paged_attention_prefill(q, cache, cache, tables, cu, ctx, 1.0)
    with pytest.raises(ValueError, match="int32"):
        paged_attention_prefill(q[:, :4], cache, cache, tables, cu.long(), ctx, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention_prefill(q[:, :4], cache, cache.bfloat16(), tables, cu, ctx, 1.0)
    with pytest.raises(ValueError, match="B \\+ 1"):
        paged_attention_prefill(q[:, :4], cache, cache, tables, cu[:1], ctx, 1.0)
    with pytest.raises(ValueError, match="R \\+ P"):
        mla_prefill(q, q[..., :8], torch.zeros(2, 4, 1, 20), tables, cu, ctx, 1.0)


# --------------------------------------------------------------------------------------
# cross-compilation (no GPU needed)
# --------------------------------------------------------------------------------------

_POINTERS = ["q_ptr", "q_pe_ptr", "k_ptr", "k_pe_ptr", "v_ptr", "out_ptr"]
_STRIDES = ["stride_qt", "stride_qh", "stride_pt", "stride_ph", "stride_kb", "stride_ks",
            "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_ot", "stride_oh",
            "stride_bt"]  # fmt: skip

GQA = {"GROUP": 4, "D": 128, "D_PAD": 128, "ROPE_DIM": 0, "ROPE_PAD": 1, "DV": 128,
       "DV_PAD": 128, "V_IS_K": False, "PAGE_SIZE": 16}  # Llama-8B  # fmt: skip
MLA = {"GROUP": 128, "D": 512, "D_PAD": 512, "ROPE_DIM": 64, "ROPE_PAD": 64, "DV": 512,
       "DV_PAD": 512, "V_IS_K": True, "PAGE_SIZE": 64}  # DeepSeek-V3  # fmt: skip
# name -> (shape constexprs, config name in paged_prefill, targets)
KERNEL_VARIANTS = {
    "gqa": (GQA, "DEFAULT_CONFIG", (80, 86, 90)),
    "mla": (MLA, "DEFAULT_MLA_CONFIG", (80, 86, 90)),
    "mla_sm90": (MLA, "MLA_CONFIG_SM90", (90,)),
}  # fmt: skip
# Opt-in shared memory per block: A100, consumer Ampere, Hopper.
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}


def _source(constexprs: dict):
    from triton.compiler import ASTSource

    from chitu_core.kernels.paged_prefill import SEARCH_BLOCK, paged_prefill_kernel

    sig = {name: "*bf16" for name in _POINTERS}
    sig.update({"block_tables_ptr": "*i32", "cu_seqlens_ptr": "*i32",
                "context_lens_ptr": "*i32", "num_seqs": "i32", "qk_scale": "fp32"})  # fmt: skip
    sig.update(dict.fromkeys(_STRIDES, "i32"))
    constexprs = dict(constexprs, SEARCH=SEARCH_BLOCK, DOT_FP32=False)
    sig.update(dict.fromkeys(constexprs, "constexpr"))
    # What a launch with 16-byte aligned tensors and strides specialises on.
    names = list(sig)
    aligned = [n for n in names if n.endswith("_ptr") or n.startswith("stride_")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return ASTSource(paged_prefill_kernel, sig, constexprs, attrs=attrs)


@pytest.mark.skipif(INTERPRETING, reason="compile tests need compiled (not interpreted) kernels")
@pytest.mark.parametrize(
    "variant,arch",
    [(v, a) for v, (_, _, archs) in KERNEL_VARIANTS.items() for a in archs],
    ids=lambda x: f"sm_{x}" if isinstance(x, int) else x,
)
def test_kernel_compiles_for_cuda(interp_runs, variant, arch):
    """Each variant with the config the launcher would use; fits the target's shared
    memory. (Takes ``interp_runs`` so that the interpreter subprocesses start first
    and overlap the compiles.)"""
    from triton.backends.compiler import GPUTarget

    import chitu_core.kernels.paged_prefill as pp

    shape, config_name, _ = KERNEL_VARIANTS[variant]
    config = getattr(pp, config_name)
    heads = pp._heads_per_program(shape["GROUP"], config)
    constexprs = dict(shape, HEADS=heads, BLOCK_M=config.block_m, BLOCK_N=config.block_n)
    kernel = triton.compile(
        _source(constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    assert "cubin" in kernel.asm
    assert kernel.metadata.shared <= MAX_SHARED_BYTES[arch], kernel.metadata.shared
    # The key/value loads are software-pipelined (cp.async), not plain loads.
    assert "async_copy_global_to_local" in kernel.asm["ttgir"]


@pytest.mark.parametrize("group", list(CASE_GROUPS))
def test_cases_under_interpreter(interp_runs, group):
    finish_cases(interp_runs[group])


# --------------------------------------------------------------------------------------
# GPU: full shapes against the generic op
# --------------------------------------------------------------------------------------

requires_gpu = pytest.mark.skipif(not HAS_NVIDIA_GPU or INTERPRETING, reason="needs an NVIDIA GPU")


@pytest.fixture(scope="module")
def cases():
    sys.path.insert(0, str(HERE))
    import prefill_interp_cases

    prefill_interp_cases.DEVICE = "cuda"
    return prefill_interp_cases


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("name", [c for group in CASE_GROUPS.values() for c in group])
def test_cases_on_gpu(cases, name):
    cases.CASES[name]()


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import prefill_bench

    return prefill_bench


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("seqs", [[(1024, 1024)] * 4, [(512, 4096)] * 4, [(1, 77), (300, 300)]],
                         ids=["4x1024", "4x512_after_3584", "decode_and_prompt"])  # fmt: skip
def test_llama_shapes_on_gpu(seqs, dtype):
    """Llama-8B heads, bf16 and fp32 (exact fp32 dots), vs the generic op in fp32."""
    from chitu_core.kernels.paged_prefill import paged_attention_prefill
    from chitu_core.ops.attention import paged_attention_prefill as generic

    bench = _bench()
    kc, vc, tables, cu, ctx = bench.paged_inputs(seqs, 8, 128, 128, dtype, "cuda")
    q = torch.randn(int(cu[-1]), 32, 128, device="cuda", dtype=dtype)
    out = paged_attention_prefill(q, kc, vc, tables, cu, ctx, 128**-0.5)
    ref = generic(q.float(), kc.float(), vc.float(), tables, cu, ctx, 128**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert bench.rel_err(out, ref) <= tol


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("seqs", [[(2048, 2048)], [(256, 1280), (1, 9), (64, 64)]],
                         ids=["1x2048", "prefix_mix"])  # fmt: skip
def test_mla_shapes_on_gpu(seqs):
    """DeepSeek-V3 MLA (128 heads, 512 + 64), bf16, vs the generic op in fp32."""
    from chitu_core.kernels.paged_prefill import mla_prefill
    from chitu_core.ops.attention import mla_prefill as generic

    bench = _bench()
    cache, _, tables, cu, ctx = bench.paged_inputs(seqs, 1, 576, 0, torch.bfloat16, "cuda")
    q_latent = torch.randn(int(cu[-1]), 128, 512, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(int(cu[-1]), 128, 64, device="cuda", dtype=torch.bfloat16)
    out = mla_prefill(q_latent, q_rope, cache, tables, cu, ctx, 192**-0.5)
    ref = generic(q_latent.float(), q_rope.float(), cache.float(), tables, cu, ctx, 192**-0.5)
    assert bench.rel_err(out, ref) <= 2e-2
