"""Numerics of the small-op kernels (RMSNorm, add+RMSNorm, RoPE, SwiGLU), run under
TRITON_INTERPRET=1.

Not collected by pytest (no ``test_`` prefix): ``test_small_ops_kernels.py`` runs
each ``case_*`` in a fresh subprocess with the interpreter switched on before
triton is imported. Also usable on a GPU (``python
tests/kernels/small_ops_interp_cases.py --device cuda``).

Two checks per output:

* against the reference backend (``chitu_cpu_ref``, fp64) on the same rounded
  inputs, with the bounds the conformance suite applies to these ops
  (``conformance/tolerances.py``);
* against the generic op (``chitu_core.ops.small``) on the same device: within
  a few units in the last place everywhere, and (16-bit outputs) bit-identical
  almost everywhere, which catches a rounding point in the wrong place (e.g.
  the weight multiply of RMSNorm before rounding the normalised value).

Triton 3.9's interpreter rounds fp32 -> bf16 by truncation (GPUs round to
nearest even), so under the interpreter bf16 outputs get one more unit of
slack and no bit-identity check.
"""

from __future__ import annotations

import sys

import torch
from chitu_cpu_ref.small_ops import chitu_add_rms_norm as ref_add_rms_norm
from chitu_cpu_ref.small_ops import chitu_rms_norm as ref_rms_norm
from chitu_cpu_ref.small_ops import chitu_rope as ref_rope
from chitu_cpu_ref.small_ops import chitu_silu_and_mul as ref_silu_and_mul

from chitu_core.kernels import interpreting
from chitu_core.kernels.small_ops import add_rms_norm, rms_norm, rope, silu_and_mul
from chitu_core.ops import small as generic
from conformance.tolerances import assert_close

DEVICE = "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Units in the last place (relative to |generic|) allowed against the generic op:
# fp32 differs in summation order (rms_norm) and exp/rsqrt implementations.
ULPS = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 2}
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def check(op: str, out: torch.Tensor, ref: torch.Tensor, gen: torch.Tensor, what: str) -> None:
    """``out`` (kernel) against ``ref`` (fp64 oracle) and ``gen`` (generic op, same dtype)."""
    dtype = gen.dtype
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    assert out.shape == gen.shape == ref.shape, f"{what}: shape {tuple(out.shape)}"
    assert out.device == gen.device, f"{what}: device {out.device}"
    if out.numel() == 0:
        return
    out, gen = out.cpu(), gen.cpu()
    assert not out.isnan().any(), f"{what}: NaN in output"
    try:
        assert_close(op, out, ref, dtype)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None
    truncating = interpreting() and dtype == torch.bfloat16
    ulps = ULPS[dtype] + (1 if truncating else 0)
    # Relative to |generic| plus the tensor's largest magnitude: on a GPU an FMA-fused
    # ``a cos - b sin`` that cancels, or exp's approximation at a saturated gate, is off
    # by ulps of the operands, not of the (tiny) result.
    err = (out.double() - gen.double()).abs()
    tol = ulps * EPS[dtype] * (gen.double().abs() + gen.double().abs().max()) + 1e-30
    worst = (err / tol).max().item()
    assert bool((err <= tol).all()), f"{what}: {worst:.3g} x the {ulps}-ulp bound vs generic"
    if dtype != torch.float32 and not truncating:
        differ = int((out != gen).sum())
        assert differ <= 0.05 * out.numel() + 2, f"{what}: {differ}/{out.numel()} differ"


def _dev(*ts):
    return [t.to(DEVICE) for t in ts]


# --------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------


def check_rms_norm(m: int, d: int, dtype, *, w_dtype=None, lead=(), row_pad=0) -> None:
    """``row_pad`` > 0: x is a column slice of a wider buffer (row stride D + pad)."""
    w_dtype = w_dtype or dtype
    x = (torch.randn(*lead, m, d + row_pad) * 3).to(dtype)[..., :d]
    w = (torch.randn(d) + 1).to(w_dtype)
    eps = 1e-6
    x_d, w_d = _dev(x, w)
    out = rms_norm(x_d, w_d, eps)
    ref = ref_rms_norm(x.double(), w.double(), eps)
    gen = generic.rms_norm(x_d, w_d, eps)
    check("rms_norm", out, ref, gen, f"rms_norm {lead}+M={m} D={d} {dtype} w={w_dtype}")


def case_rms_norm() -> None:
    torch.manual_seed(0)
    for dtype in DTYPES:
        for m, d in ((1, 200), (5, 64), (3, 7168), (2, 4096), (17, 8), (1, 1)):
            check_rms_norm(m, d, dtype)
    check_rms_norm(4, 512, torch.bfloat16, w_dtype=torch.float32)  # promoted multiply
    check_rms_norm(3, 96, torch.float32, w_dtype=torch.bfloat16)
    check_rms_norm(3, 96, torch.float16, w_dtype=torch.bfloat16)
    check_rms_norm(3, 200, torch.bfloat16, lead=(2,))  # [2, 3, D]
    check_rms_norm(5, 136, torch.float16, row_pad=24)  # strided rows


def case_rms_norm_wide() -> None:
    """Rows wider than the single-pass limit take the two-pass chunked loop."""
    torch.manual_seed(1)
    check_rms_norm(2, 16384, torch.bfloat16)  # widest single pass
    check_rms_norm(2, 16400, torch.bfloat16)  # 5 chunks, the last one ragged
    check_rms_norm(1, 20000, torch.float32, row_pad=8)


def check_add_rms_norm(m: int, d: int, dtype, *, lead=(), row_pad=0) -> None:
    """Both outputs: the rounded sum (against the exact sum rounded once, and the generic
    op's) and the norm of that sum."""
    x = (torch.randn(*lead, m, d + row_pad) * 2).to(dtype)[..., :d]
    r = (torch.randn(*lead, m, d) * 3).to(dtype)
    w = (torch.randn(d) + 1).to(dtype)
    eps = 1e-6
    x_d, r_d, w_d = _dev(x, r, w)
    normed, summed = add_rms_norm(x_d, r_d, w_d, eps)
    ref_normed, ref_summed = ref_add_rms_norm(x, r, w, eps)
    gen_normed, gen_summed = generic.add_rms_norm(x_d, r_d, w_d, eps)
    what = f"add_rms_norm {lead}+M={m} D={d} {dtype}"
    check("add_rms_norm", summed, ref_summed.double(), gen_summed, what + " (sum)")
    # The norm of the kernel's own sum: under the interpreter that sum is truncated,
    # not rounded, and the norm must follow the sum the kernel handed on.
    s_cpu = summed.cpu()
    check("add_rms_norm", normed, ref_rms_norm(s_cpu.double(), w.double(), eps),
          generic.rms_norm(summed, w_d, eps), what + " (norm)")  # fmt: skip
    if not (interpreting() and dtype == torch.bfloat16):
        assert torch.equal(s_cpu, gen_summed.cpu()), f"{what}: the sum is not x + residual"


def case_add_rms_norm() -> None:
    torch.manual_seed(4)
    for dtype in DTYPES:
        for m, d in ((1, 200), (5, 64), (3, 4096), (17, 8), (0, 16)):
            check_add_rms_norm(m, d, dtype)
    check_add_rms_norm(3, 200, torch.bfloat16, lead=(2,))  # [2, 3, D]
    check_add_rms_norm(5, 136, torch.float16, row_pad=24)  # strided x rows
    check_add_rms_norm(2, 16400, torch.bfloat16)  # the two-pass loop re-reads the stored sum
    check_add_rms_norm(1, 20000, torch.float32)


# --------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------


def check_silu(m: int, inter: int, dtype, *, lead=(), row_pad=0) -> None:
    x = (torch.randn(*lead, m, 2 * inter + row_pad) * 2).to(dtype)[..., : 2 * inter]
    (x_d,) = _dev(x)
    out = silu_and_mul(x_d)
    ref = ref_silu_and_mul(x.double())
    gen = generic.silu_and_mul(x_d)
    check("silu_and_mul", out, ref, gen, f"silu {lead}+M={m} I={inter} {dtype}")


def case_silu_and_mul() -> None:
    torch.manual_seed(2)
    for dtype in DTYPES:
        for m, inter in ((1, 100), (3, 7), (40, 1100), (2, 1408), (1, 1)):
            check_silu(m, inter, dtype)
    check_silu(3, 50, torch.bfloat16, lead=(2,))
    check_silu(4, 72, torch.float16, row_pad=16)
    # saturated gates: silu(-100) = -0 and silu(100) = 100 without inf/NaN
    x = torch.tensor([[-100.0, 100.0, -1e4, 0.0, 3.0, 5.0, 2.0, 7.0]])
    (x_d,) = _dev(x)
    out = silu_and_mul(x_d).cpu()
    assert torch.equal(out, generic.silu_and_mul(x_d).cpu()), out


# --------------------------------------------------------------------------------------
# Rotary embedding
# --------------------------------------------------------------------------------------


def cos_sin_cache(rot: int, max_pos: int = 64) -> torch.Tensor:
    """``[max_pos, R]`` fp32: cos then sin of ``p * 10000^(-2i/R)``."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None]
    return torch.cat([angles.cos(), angles.sin()], -1).float()


def check_rope(tokens, hq, hk, dq, dk, rot, neox, dtype, *, fused=False, pos_dtype=torch.int64):
    """``fused``: q and k are views of one [T, (Hq + 2 Hk) * D] projection (as in Llama)."""
    cache = cos_sin_cache(rot)
    if fused:
        assert dq == dk
        qkv = torch.randn(tokens, (hq + 2 * hk) * dq).to(dtype)
        q_flat, k_flat, _ = qkv.split([hq * dq, hk * dq, hk * dq], dim=-1)
        q, k = q_flat.reshape(tokens, hq, dq), k_flat.reshape(tokens, hk, dq)
    else:
        q = torch.randn(tokens, hq, dq).to(dtype)
        k = torch.randn(tokens, hk, dk).to(dtype)
    positions = torch.randperm(64)[:tokens].to(pos_dtype)  # not sorted
    q_d, k_d, pos_d, cache_d = _dev(q, k, positions, cache)
    if fused:  # split on the device too: .to() of a strided view makes it contiguous
        (qkv_d,) = _dev(qkv)
        q_flat_d, k_flat_d, _ = qkv_d.split([hq * dq, hk * dq, hk * dq], dim=-1)
        q_d, k_d = q_flat_d.reshape(tokens, hq, dq), k_flat_d.reshape(tokens, hk, dq)
    if fused and tokens > 1:
        assert not q_d.is_contiguous()  # strided tokens reach the kernel
    q_out, k_out = rope(q_d, k_d, pos_d, cache_d, neox)
    q_ref, k_ref = ref_rope(q.double(), k.double(), positions, cache, neox)
    q_gen, k_gen = generic.rope(q_d, k_d, pos_d, cache_d, neox)
    what = f"rope T={tokens} Hq={hq} Hk={hk} D={dq}/{dk} R={rot} neox={neox} {dtype}"
    check("rope", q_out, q_ref, q_gen, what + " q")
    check("rope", k_out, k_ref, k_gen, what + " k")
    # channels past R are copied bit for bit, and the inputs are untouched (not in place)
    assert torch.equal(q_out[..., rot:].cpu(), q[..., rot:]), what
    assert torch.equal(k_out[..., rot:].cpu(), k[..., rot:]), what
    assert torch.equal(q_d.cpu(), q) and torch.equal(k_d.cpu(), k), what + ": inputs modified"


def case_rope_neox() -> None:
    torch.manual_seed(3)
    for dtype in DTYPES:
        check_rope(5, 6, 2, 64, 64, 64, True, dtype)  # GQA, full rotary
        check_rope(3, 4, 1, 96, 96, 32, True, dtype)  # partial rotary
    check_rope(1, 32, 8, 128, 128, 128, True, torch.bfloat16, fused=True)  # Llama-8B decode
    check_rope(4, 5, 3, 80, 80, 48, True, torch.float16, fused=True)  # R/2, D - R not pow2
    check_rope(6, 3, 3, 40, 40, 40, True, torch.float32, pos_dtype=torch.int32)


def case_rope_interleaved() -> None:
    torch.manual_seed(4)
    for dtype in DTYPES:
        check_rope(5, 8, 1, 64, 64, 64, False, dtype)  # DeepSeek-V3 q_pe / k_pe
        check_rope(3, 4, 2, 96, 96, 32, False, dtype)  # partial rotary
    check_rope(2, 16, 1, 64, 64, 64, False, torch.bfloat16)
    check_rope(4, 3, 1, 72, 40, 24, False, torch.float16)  # Dq != Dk, both partial
    check_rope(3, 2, 2, 48, 48, 48, False, torch.float32, fused=True)


# --------------------------------------------------------------------------------------
# edges: empty inputs, unsupported calls
# --------------------------------------------------------------------------------------


def _expect_value_error(call, what: str) -> None:
    try:
        call()
    except ValueError:
        return
    raise AssertionError(f"{what}: expected ValueError")


def case_edges() -> None:
    dev = DEVICE
    x = torch.zeros(0, 4096, dtype=torch.bfloat16, device=dev)
    out = rms_norm(x, torch.ones(4096, dtype=torch.bfloat16, device=dev), 1e-6)
    assert out.shape == (0, 4096) and out.dtype == torch.bfloat16
    out = silu_and_mul(torch.zeros(0, 2048, dtype=torch.float16, device=dev))
    assert out.shape == (0, 1024) and out.dtype == torch.float16
    q = torch.zeros(0, 8, 128, device=dev)
    k = torch.zeros(0, 2, 128, device=dev)
    cache = cos_sin_cache(128).to(dev)
    q_out, k_out = rope(q, k, torch.zeros(0, dtype=torch.int64, device=dev), cache, True)
    assert q_out.shape == (0, 8, 128) and k_out.shape == (0, 2, 128)

    f64 = torch.zeros(2, 8, dtype=torch.float64, device=dev)
    pos = torch.zeros(2, dtype=torch.int64, device=dev)
    q = torch.zeros(2, 4, 64, device=dev)
    cache = cos_sin_cache(64).to(dev)
    for what, call in (
        ("rms_norm fp64", lambda: rms_norm(f64, torch.ones(8, device=dev), 1e-6)),
        ("rms_norm weight shape", lambda: rms_norm(f64.float(), torch.ones(7, device=dev), 1e-6)),
        ("silu odd", lambda: silu_and_mul(torch.zeros(2, 7, device=dev))),
        ("silu fp64", lambda: silu_and_mul(f64)),
        ("rope R > D", lambda: rope(q[..., :32], q[..., :32], pos, cache, True)),
        ("rope odd R", lambda: rope(q, q, pos, cache[:, :63], True)),
        ("rope positions", lambda: rope(q, q, pos[:1], cache, True)),
        ("rope positions fp", lambda: rope(q, q, pos.float(), cache, True)),
        ("rope 2-D q", lambda: rope(q[:, 0], q, pos, cache, True)),
        ("rope fp64 q", lambda: rope(q.double(), q, pos, cache, True)),
        ("rope strided last dim", lambda: rope(q[..., ::2], q[..., ::2], pos, cache[:, :32], True)),
    ):
        _expect_value_error(call, what)


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--device"]:
        DEVICE, args = args[1], args[2:]
    for name in args or list(CASES):
        CASES[name]()
        print(f"ok {name} (device={DEVICE})")
