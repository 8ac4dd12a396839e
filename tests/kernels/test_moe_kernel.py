"""Triton fused MoE: interpreter numerics, cross-compilation for sm_80/86/90, and
full-size checks on an NVIDIA GPU.

The interpreter cases live in ``moe_interp_cases.py`` and run in subprocesses (the
interpreter must be on before triton is imported, and must not leak into the
compile tests of the same pytest run). All of them start at once when the first
test of this module runs, so they overlap the compile tests on a multi-core box.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
import torch  # noqa: E402
from kernel_test_helpers import (  # noqa: E402
    CUDA_TARGETS,
    INTERPRETING,
    SMEM_LIMIT,
    finish_cases,
    start_cases,
)
from triton.compiler import ASTSource  # noqa: E402

from chitu_core.kernels.fused_moe import (  # noqa: E402
    DECODE_CONFIG,
    PREFILL_CONFIG,
    TOKEN_CONFIG,
    FusedMoeConfig,
    default_config,
    moe_down_kernel,
    moe_gate_up_kernel,
    moe_sum_kernel,
)
from chitu_core.kernels.moe_align import moe_align_kernel  # noqa: E402

CASES = ["align", "formats_block128", "formats_channel", "formats_unquantized", "all_codes",
         "nan_codes"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def interp_procs(request):
    """Start every selected interpreter case in the background; tests collect them."""
    selected = {item.callspec.params["case"] for item in request.session.items
                if item.name.startswith("test_case_under_interpreter")}  # fmt: skip
    procs = {
        case: start_cases("moe_interp_cases.py", "cpu", case) for case in CASES if case in selected
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------
# cross-compilation: every constexpr branch that changes the code, for each arch
# --------------------------------------------------------------------------------------

_EXPERT_SIG = {"w_ptr": "*u8", "scale_ptr": "*fp32", "sorted_ptr": "*i32",
               "block_expert_ptr": "*i32", "topk_ids_ptr": "*i32", "num_pairs": "i32",
               "num_rows": "i32", "stride_we": "i32", "stride_wn": "i32", "stride_se": "i32",
               "stride_sn": "i32", "stride_sk": "i32"}  # fmt: skip
_GATE_UP_SIG = dict(_EXPERT_SIG, x_ptr="*bf16", act_ptr="*bf16", top_k="i32", K="i32",
                    inter="i32", stride_xm="i32", stride_am="i32")  # fmt: skip
_DOWN_SIG = dict(_EXPERT_SIG, act_ptr="*bf16", topk_weights_ptr="*fp32", out_ptr="*bf16",
                 N="i32", K="i32", stride_am="i32", stride_om="i32")  # fmt: skip


def _expert_source(kernel, cfg: FusedMoeConfig, fmt: int, use_ptx: bool, dtype: str = "bf16",
                   even_k: bool = True, pair_per_block: bool = False):  # fmt: skip
    sig = dict(_GATE_UP_SIG if kernel is moe_gate_up_kernel else _DOWN_SIG)
    for name in ("x_ptr", "act_ptr", "out_ptr"):
        if name in sig:
            sig[name] = f"*{dtype}"
    if fmt == 2:
        sig["w_ptr"] = f"*{dtype}"
    down = kernel is moe_down_kernel
    c = dict(FMT=fmt, SCALE_ON_ACC=cfg.scale_on_acc, EVEN_K=even_k, USE_PTX=use_ptx,
             WIDEN_BF16=dtype == "bf16", PAIR_PER_BLOCK=pair_per_block, BLOCK_M=cfg.block_m,
             BLOCK_N=cfg.down_block_n if down else cfg.block_n,
             BLOCK_K=cfg.down_block_k if down else cfg.block_k, GROUP_M=cfg.group_m,
             DOT_IN_FP32=False, NAN=True)  # fmt: skip
    sig.update(dict.fromkeys(c, "constexpr"))
    if down:
        return ASTSource(kernel, sig, c), cfg.down_num_warps, cfg.down_num_stages
    return ASTSource(kernel, sig, c), cfg.num_warps, cfg.num_stages


BATCH = default_config(64, 8, 64)
# name -> (source, num_warps, num_stages): the presets with each format, both widenings,
# fp16 activations, K tails and the one-token (no alignment) path
EXPERT_VARIANTS = {
    "gate_up-block-token-ptx-1tok": lambda: _expert_source(
        moe_gate_up_kernel, TOKEN_CONFIG, 0, True, pair_per_block=True),
    "gate_up-block-decode-ptx": lambda: _expert_source(moe_gate_up_kernel, DECODE_CONFIG, 0, True),
    "gate_up-block-prefill-ptx": lambda: _expert_source(moe_gate_up_kernel, PREFILL_CONFIG, 0, True),
    "gate_up-channel-batch-portable-fp16-tail": lambda: _expert_source(
        moe_gate_up_kernel, BATCH, 1, False, dtype="fp16", even_k=False),
    "gate_up-dense-prefill": lambda: _expert_source(moe_gate_up_kernel, PREFILL_CONFIG, 2, False),
    "down-block-token-ptx-1tok": lambda: _expert_source(
        moe_down_kernel, TOKEN_CONFIG, 0, True, pair_per_block=True),
    "down-block-decode-ptx": lambda: _expert_source(moe_down_kernel, DECODE_CONFIG, 0, True),
    "down-block-prefill-portable-tail": lambda: _expert_source(
        moe_down_kernel, PREFILL_CONFIG, 0, False, even_k=False),
    "down-dense-batch-fp16": lambda: _expert_source(moe_down_kernel, BATCH, 2, False, dtype="fp16"),
}  # fmt: skip


def _align_source():
    sig = {"topk_ids_ptr": "*i32", "sorted_ptr": "*i32", "block_expert_ptr": "*i32",
           "num_blocks_ptr": "*i32", "num_pairs": "i32", "max_blocks": "i32"}  # fmt: skip
    c = {"BLOCK_M": 16, "BLOCK_P": 128, "BLOCK_E": 256, "BLOCK_B": 128}
    sig.update(dict.fromkeys(c, "constexpr"))
    return ASTSource(moe_align_kernel, sig, c), 8, 3


def _sum_source():
    sig = {"pair_out_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "top_k": "i32",
           "BLOCK_N": "constexpr"}  # fmt: skip
    return ASTSource(moe_sum_kernel, sig, {"BLOCK_N": 1024}), 4, 3


VARIANTS = dict(EXPERT_VARIANTS, align=_align_source, sum=_sum_source)


@pytest.mark.skipif(INTERPRETING, reason="compile tests need compiled (not interpreted) kernels")
@pytest.mark.parametrize("target", CUDA_TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_kernel_compiles_for_cuda(name, target):
    src, num_warps, num_stages = VARIANTS[name]()
    kernel = triton.compile(
        src, target=target, options={"num_warps": num_warps, "num_stages": num_stages}
    )
    assert "cubin" in kernel.asm
    assert kernel.metadata.shared <= SMEM_LIMIT[target.arch], f"{name}: shared memory"


def test_config_validation():
    with pytest.raises(ValueError):
        FusedMoeConfig(block_m=8)  # neither 1 (FMA) nor an MMA tile
    with pytest.raises(ValueError):
        FusedMoeConfig(block_n=48)
    assert default_config(1, 8, 256) is TOKEN_CONFIG
    assert default_config(64, 8, 256) is DECODE_CONFIG
    assert default_config(4096, 8, 256) is PREFILL_CONFIG


def test_launcher_rejects_bad_inputs():
    from chitu_core.kernels.fused_moe import fused_moe

    x = torch.zeros(2, 128, dtype=torch.bfloat16)
    w13 = torch.zeros(4, 64, 128, dtype=torch.uint8)
    w2 = torch.zeros(4, 128, 32, dtype=torch.uint8)
    s13, s2 = torch.ones(4, 1, 1), torch.ones(4, 1, 1)
    ids = torch.zeros(2, 2, dtype=torch.int32)
    wts = torch.ones(2, 2)
    with pytest.raises(ValueError, match="format"):
        fused_moe(x, w13, s13, w2, s2, "fp4", wts, ids)
    with pytest.raises(ValueError, match="w2_scale"):
        fused_moe(x, w13, s13, w2, torch.ones(4, 2, 1), "fp8_block128", wts, ids)
    with pytest.raises(ValueError, match="w13"):
        fused_moe(x, w13[:, :, :64], s13, w2, s2, "fp8_block128", wts, ids)
    with pytest.raises(ValueError, match="topk"):
        fused_moe(x, w13, s13, w2, s2, "fp8_block128", wts, ids[:1])
    empty = fused_moe(x[:0], w13, s13, w2, s2, "fp8_block128", wts[:0], ids[:0])
    assert empty.shape == (0, 128) and empty.dtype == torch.bfloat16


@pytest.mark.parametrize("case", CASES)
def test_case_under_interpreter(case, interp_procs):
    finish_cases(interp_procs[case])


# --------------------------------------------------------------------------------------
# NVIDIA GPU: the interpreter cases compiled, model shapes against the generic op
# --------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", CASES)
def test_case_on_gpu(case):
    finish_cases(start_cases("moe_interp_cases.py", "cuda", case))


def random_fp8_experts(num_experts, rows, cols, seed):
    """(codes [E, rows, cols] uint8, block scales fp32) made on the GPU without an fp32
    copy: sign, exponent 3..10 and mantissa random (values 2^-4..2^3.9), no NaN codes."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 256, (num_experts, rows, cols), generator=g, device="cuda",
                          dtype=torch.uint8)  # fmt: skip
    codes = (codes & 0x87) | ((3 + (codes >> 3) % 8) << 3).to(torch.uint8)
    scale = torch.rand(num_experts, -(-rows // 128), -(-cols // 128), generator=g, device="cuda")
    return codes, (scale + 0.5) * cols**-0.5 / 4


def _check_against_generic(x, w13, w2, weights, ids):
    from chitu_core.kernels.fused_moe import fused_moe
    from chitu_core.ops.moe import fused_moe as generic

    out = fused_moe(x, w13.weight, w13.scale, w2.weight, w2.scale, w13.fmt, weights, ids)
    ref = generic(x, w13, w2, weights, ids).float()
    assert not out.isnan().any()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    peak = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-2 and peak < 3e-2, f"rel {rel:.3g} peak {peak:.3g}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_tokens", [1, 8, 64, 1024])
def test_deepseek_v3_fp8_block_on_gpu(num_tokens):
    from chitu_core.ops.moe import moe_route
    from chitu_core.quant import QuantizedWeight

    num_experts, top_k, hidden, inter = 256, 8, 7168, 2048
    w13 = QuantizedWeight(*random_fp8_experts(num_experts, 2 * inter, hidden, 1), "fp8_block128")
    w2 = QuantizedWeight(*random_fp8_experts(num_experts, hidden, inter, 2), "fp8_block128")
    logits = torch.randn(num_tokens, num_experts, device="cuda")
    bias = torch.randn(num_experts, device="cuda") * 0.1
    weights, ids = moe_route(logits, top_k, "sigmoid", True, 8, 4, bias, 2.5)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    _check_against_generic(x, w13, w2, weights, ids)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["unquantized", "fp8_block128", "fp8_channel"])
@pytest.mark.parametrize("num_tokens", [1, 8, 64, 2048])
def test_mixtral_like_on_gpu(fmt, num_tokens):
    from chitu_core.ops.moe import moe_route
    from chitu_core.quant import QuantizedWeight, quantize_fp8

    num_experts, top_k, hidden, inter = 8, 2, 4096, 14336
    g = torch.Generator(device="cuda").manual_seed(3)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g, device="cuda",
                      dtype=torch.bfloat16) * hidden**-0.5  # fmt: skip
    w2 = torch.randn(num_experts, hidden, inter, generator=g, device="cuda",
                     dtype=torch.bfloat16) * inter**-0.5  # fmt: skip
    if fmt == "unquantized":
        h13, h2 = QuantizedWeight(w13, None, fmt), QuantizedWeight(w2, None, fmt)
    else:  # quantized one expert at a time: an fp32 copy of all of them would not fit
        q13 = [quantize_fp8(w13[e], fmt) for e in range(num_experts)]
        q2 = [quantize_fp8(w2[e], fmt) for e in range(num_experts)]
        h13 = QuantizedWeight(torch.stack([q.weight for q in q13]),
                              torch.stack([q.scale for q in q13]), fmt)  # fmt: skip
        h2 = QuantizedWeight(torch.stack([q.weight for q in q2]),
                             torch.stack([q.scale for q in q2]), fmt)  # fmt: skip
        del w13, w2
    logits = torch.randn(num_tokens, num_experts, device="cuda")
    weights, ids = moe_route(logits, top_k, "softmax", True, 1, 1, None, 1.0)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    _check_against_generic(x, h13, h2, weights, ids)


@pytest.mark.gpu
@needs_gpu
def test_no_host_sync_and_graph_capture_on_gpu():
    """The launcher captures into a CUDA graph (a host sync would raise during capture)
    and a replay on new routing gives the eager result."""
    from chitu_core.kernels.fused_moe import fused_moe

    num_experts, top_k, hidden, inter, num_tokens = 64, 8, 1024, 512, 16
    c13, s13 = random_fp8_experts(num_experts, 2 * inter, hidden, 4)
    c2, s2 = random_fp8_experts(num_experts, hidden, inter, 5)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    weights = torch.rand(num_tokens, top_k, device="cuda")
    ids = torch.stack([torch.randperm(num_experts, device="cuda")[:top_k]
                       for _ in range(num_tokens)]).int()  # fmt: skip

    def call():
        return fused_moe(x, c13, s13, c2, s2, "fp8_block128", weights, ids)

    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    ids.copy_(torch.stack([torch.randperm(num_experts, device="cuda")[:top_k]
                           for _ in range(num_tokens)]).int())  # fmt: skip
    graph.replay()
    torch.testing.assert_close(out, call(), rtol=0, atol=0)
