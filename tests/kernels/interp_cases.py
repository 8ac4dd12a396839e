"""Numerics checks of the portable soft-FP8 kernels, run under TRITON_INTERPRET=1.

Not collected by pytest (no ``test_`` prefix): ``test_interpreter.py`` runs each
``case_*`` in a fresh subprocess with the interpreter switched on before triton
is imported, so compiled-kernel tests in the same pytest run are unaffected.
Also usable on a GPU (``python tests/kernels/interp_cases.py --device cuda``).
"""

from __future__ import annotations

import sys

import torch

from chitu_core.kernels.e4m3_widen import e4m3_widen
from chitu_core.kernels.fp8_gemm import (
    Fp8GemmConfig,
    fp8_gemm,
    permute_k,
    scales_foldable,
    unpermute_k,
)
from chitu_core.quant import (
    dequantize_block_fp8,
    dequantize_channel_fp8,
    e4m3_bits_to_float,
    quantize_block_fp8,
    quantize_channel_fp8,
)

DEVICE = "cpu"
USE_PTX = False
ALL_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)
NAN_CODES = (0x7F, 0xFF)


def same_values(out: torch.Tensor, ref: torch.Tensor, signed_zeros: bool = True) -> bool:
    """Agreement of values: equal (signed zeros too, unless told) or both NaN.

    A GEMM sums +0 products into each output, so a -0 weight comes out +0 there.
    """
    both_nan = out.isnan() & ref.isnan()
    equal = out == ref
    if signed_zeros:
        equal &= torch.signbit(out) == torch.signbit(ref)
    return bool((both_nan | equal).all())


def assert_close_to_exact(y, x, w_ref, bias, operand_rounding: bool) -> None:
    """y [M, N] vs the fp64 product of exact operands, within one output rounding.

    Bound per element: one bf16 rounding of the result (2^-7 relative: one ulp, as
    the interpreter's casts truncate) plus the fp32 accumulation error, or the bf16
    rounding of each e4m3*scale operand when the scale is folded into the weight.
    """
    xd = x.double().cpu()
    ref = xd @ w_ref.T
    if bias is not None:
        ref = ref + bias.double().cpu()
    mag = xd.abs() @ w_ref.abs().T
    slack = 2.0**-8 if operand_rounding else 2.0**-16
    tol = 2.0**-7 * ref.abs() + slack * mag + 1e-30
    err = (y.double().cpu() - ref).abs()
    assert bool((err <= tol).all()), f"max err/tol {(err / tol).max().item():.3g}"
    assert not y.isnan().any()


def case_widen_all_codes() -> None:
    ref = e4m3_bits_to_float(ALL_CODES)
    for dtype, bf16 in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        out = e4m3_widen(ALL_CODES.to(DEVICE), dtype, use_ptx=USE_PTX, bf16=bf16).float().cpu()
        assert same_values(out, ref), (
            f"{dtype} bf16={bf16}: codes {torch.nonzero(out != ref).flatten().tolist()}"
        )
        # Without the NaN fix: every other code still exact, the NaN codes read as +-480.
        out = e4m3_widen(ALL_CODES.to(DEVICE), dtype, use_ptx=USE_PTX, bf16=bf16, nan=False)
        out = out.float().cpu()
        finite = torch.ones(256, dtype=torch.bool)
        finite[list(NAN_CODES)] = False
        assert same_values(out[finite], ref[finite]), f"{dtype} bf16={bf16} nan=False"
        assert out[0x7F].item() == 480.0 and out[0xFF].item() == -480.0


def _all_codes_weight(n_rows: int) -> torch.Tensor:
    """[n_rows, 256] codes: each row every finite code (NaN codes -> 0) in its own order."""
    finite = ALL_CODES.clone()
    finite[list(NAN_CODES)] = 0
    rows = [finite[torch.randperm(256)] for _ in range(n_rows)]
    return torch.stack(rows)


def case_gemm_all_codes() -> None:
    """Every code through the GEMM: one-hot x picks single weights, so y is exact."""
    torch.manual_seed(0)
    n = 20
    bits = _all_codes_weight(n)
    bits[n - 2, 17] = 0x7F  # NaN rows: every output of the row is NaN
    bits[n - 1, 200] = 0xFF
    x = torch.eye(256, dtype=torch.bfloat16)  # M = K = 256
    for channel in (False, True):
        if channel:
            scale = 2.0 ** torch.randint(-4, 4, (n,)).float()
            w_ref = e4m3_bits_to_float(bits).double() * scale.double()[:, None]
        else:
            scale = 2.0 ** torch.randint(-4, 4, (1, 2)).float()
            w_ref = dequantize_block_fp8(bits, scale, torch.float64)
        for cfg in (Fp8GemmConfig(block_n=16, block_m=64, split_k=1),
                    Fp8GemmConfig(block_n=32, block_m=16, split_k=2, scale_on_acc=False),
                    # the batched-decode kernel: scales on the partial sums, and folded into
                    # the widened weight (exact here: power-of-two scales)
                    Fp8GemmConfig(kind="wide", block_n=16, block_m=64, block_k=64, split_k=2),
                    Fp8GemmConfig(kind="wide", block_n=32, block_m=32, split_k=1,
                                  scale_on_acc=False)):  # fmt: skip
            y = fp8_gemm(x.to(DEVICE), bits.to(DEVICE), scale.to(DEVICE), None,
                         channel=channel, config=cfg, num_sms=4, use_ptx=USE_PTX).float().cpu()  # fmt: skip
            ref = w_ref.T.float()  # y[m, n] = W[n, m]
            assert same_values(y[:, : n - 2], ref[:, : n - 2], False), f"channel={channel} {cfg}"
            assert bool(y[:, n - 2 :].isnan().all()), "NaN codes must give NaN rows"
            # the widening without the NaN fix, on the rows that hold no NaN code
            s_free = scale[: n - 2] if channel else scale
            y = fp8_gemm(x.to(DEVICE), bits[: n - 2].to(DEVICE), s_free.to(DEVICE), None,
                         channel=channel, config=cfg, num_sms=4, use_ptx=USE_PTX,
                         nan_codes=False).float().cpu()  # fmt: skip
            assert same_values(y, ref[:, : n - 2], False), (
                f"nan_codes=False channel={channel} {cfg}"
            )


def case_gemv_all_codes() -> None:
    """Every code through the decode kernels (M <= 16): a [18, 16] weight holding all
    256 codes (NaN codes moved to two extra rows), x = eye(16), so y = W^T * scale."""
    codes = ALL_CODES.clone()
    codes[list(NAN_CODES)] = 0
    bits = torch.zeros(18, 16, dtype=torch.uint8)
    bits[:16] = codes.reshape(16, 16)
    bits[16, 3] = 0x7F
    bits[17, 9] = 0xFF
    x = torch.eye(16, dtype=torch.bfloat16)
    for channel in (False, True):
        scale = 2.0 ** torch.randint(-4, 4, (18,) if channel else (1, 1)).float()
        if channel:
            w_ref = e4m3_bits_to_float(bits).double() * scale.double()[:, None]
        else:
            w_ref = dequantize_block_fp8(bits, scale, torch.float64)
        for cfg in (Fp8GemmConfig(kind="gemv", block_n=16, block_m=16, split_k=1),
                    Fp8GemmConfig(kind="gemv", block_n=32, block_m=16, split_k=1, num_stages=2),
                    Fp8GemmConfig(kind="mm", block_n=16, block_m=16, split_k=1)):  # fmt: skip
            y = fp8_gemm(x.to(DEVICE), bits.to(DEVICE), scale.to(DEVICE), None,
                         channel=channel, config=cfg, num_sms=4, use_ptx=USE_PTX).float().cpu()  # fmt: skip
            assert same_values(y[:, :16], w_ref.T.float()[:, :16], False), (
                f"channel={channel} {cfg}"
            )
            assert bool(y[:, 16:].isnan().all()), "NaN codes must give NaN rows"
        for m, cfg in (  # FMA variants and the MMA one at tiny M, a few rows at a time
            ((1, Fp8GemmConfig(kind="gemv", block_n=16, block_m=1, split_k=1)),
             (1, Fp8GemmConfig(kind="gemv", block_n=256, block_m=1, split_k=1)),
             (3, Fp8GemmConfig(kind="gemv", block_n=16, block_m=4, split_k=1)),
             (1, Fp8GemmConfig(kind="mm", block_n=16, block_m=16, split_k=1)))
            if not channel else ()
        ):  # fmt: skip
            for r in range(0, 16, m if m > 1 else 5):
                xs = x[r : r + m]
                for nan_codes in (True, False):
                    # nan_codes=False: the widening without the NaN fix, NaN-free rows only
                    rows = 18 if nan_codes else 16
                    y = fp8_gemm(xs.to(DEVICE), bits[:rows].to(DEVICE), scale.to(DEVICE), None,
                                 channel=channel, config=cfg, num_sms=4, use_ptx=USE_PTX,
                                 nan_codes=nan_codes).float().cpu()  # fmt: skip
                    assert same_values(y[:, :16], w_ref.T.float()[r : r + m, :16], False), (
                        f"{cfg} row {r} nan_codes={nan_codes}"
                    )
                    assert bool(y[:, 16:].isnan().all()), "NaN codes must give NaN rows"


def case_gemm_shapes() -> None:
    """Random data, tails (N, K not multiples of 128), M = 0/1/small/odd, bias, split-K."""
    torch.manual_seed(1)
    shapes = [(1, 200, 300), (5, 130, 257), (33, 64, 384), (0, 64, 128), (3, 64, 0)]
    cfgs = [
        Fp8GemmConfig(block_n=32, block_m=16, split_k=3),
        Fp8GemmConfig(block_n=64, block_m=32, block_k=64, split_k=0, scale_on_acc=False),
        Fp8GemmConfig(kind="mm", block_n=32, block_m=16, block_k=64, split_k=3),
        Fp8GemmConfig(
            kind="mm", block_n=64, block_m=32, split_k=2, scale_on_acc=False, fused_reduce=False
        ),
        Fp8GemmConfig(kind="dequant"),
        Fp8GemmConfig(kind="wide", block_n=32, block_m=16, block_k=64, split_k=3),
        Fp8GemmConfig(kind="wide", block_n=64, block_m=32, split_k=2, scale_on_acc=False),
        Fp8GemmConfig(
            kind="wide", block_n=16, block_m=16, split_k=1, scale_on_acc=False, fused_reduce=False
        ),
        # the split nearest a program count per SM (the NVIDIA M 2..64 rows)
        Fp8GemmConfig(
            kind="mm", block_n=32, block_m=16, block_k=64, max_split_k=8, target_ctas_per_sm=2.0
        ),  # fmt: skip
    ]
    gemv_cfgs = [
        Fp8GemmConfig(kind="gemv", block_n=32, block_m=1, split_k=2, prefetch=True),
        Fp8GemmConfig(kind="gemv", block_n=16, block_m=4, split_k=1, prefetch=True),
        Fp8GemmConfig(kind="gemv", block_n=32, block_m=16, split_k=3),
        Fp8GemmConfig(kind="gemv", block_n=16, block_m=64, split_k=0, prefetch=True),
        Fp8GemmConfig(kind="gemv", block_n=32, block_m=32, split_k=2),  # the M 17..32 tile
        Fp8GemmConfig(kind="gemv", block_n=256, block_m=1, split_k=2),  # rows span 2 scale rows
        Fp8GemmConfig(kind="gemv", block_n=16, block_m=1, num_warps=4, target_ctas_per_sm=8.0),
    ]
    for m, n, k in shapes:
        w = torch.randn(n, k) * 0.05
        x = (torch.randn(m, k) * 2).bfloat16()
        bias = torch.randn(n).bfloat16()
        for channel in (False, True):
            if k == 0:  # nothing to quantize: an empty weight with unit scales
                wq = torch.empty((n, 0), dtype=torch.uint8)
                s = torch.ones(n) if channel else torch.ones(-(-n // 128), 0)
                w_ref = torch.empty((n, 0), dtype=torch.float64)
            elif channel:
                wq, s = quantize_channel_fp8(w)
                w_ref = dequantize_channel_fp8(wq, s, torch.float64)
            else:
                wq, s = quantize_block_fp8(w)
                w_ref = dequantize_block_fp8(wq, s, torch.float64)
            fits = [c for c in gemv_cfgs if m <= c.block_m]
            for i, cfg in enumerate(cfgs + fits):
                for b in (None, bias) if i == 0 else (bias if i % 2 else None,):
                    # quantized weights hold no NaN code: both widenings must agree
                    y = fp8_gemm(x.to(DEVICE), wq.to(DEVICE).view(torch.uint8), s.to(DEVICE),
                                 None if b is None else b.to(DEVICE), channel=channel, config=cfg,
                                 num_sms=4, use_ptx=USE_PTX, nan_codes=(i + m) % 2 == 0)  # fmt: skip
                    assert y.shape == (m, n) and y.dtype == torch.bfloat16
                    rounding = cfg.kind == "dequant" or (not channel and not cfg.scale_on_acc)
                    assert_close_to_exact(y, x, w_ref, b, rounding)


def case_subnormal_heavy() -> None:
    """Small weights quantized with a large block scale: many codes are e4m3 subnormals."""
    torch.manual_seed(2)
    n, k = 128, 256
    bits = torch.randint(0, 8, (n, k), dtype=torch.uint8) | (
        torch.randint(0, 2, (n, k), dtype=torch.uint8) << 7
    )
    bits[:, :4] = 0x7E  # keep a large value so the block is not all tiny
    s = torch.rand(1, 2) + 0.5
    x = torch.randn(4, k).bfloat16()
    w_ref = dequantize_block_fp8(bits, s, torch.float64)
    y = fp8_gemm(x.to(DEVICE), bits.to(DEVICE), s.to(DEVICE), None, channel=False,
                 config=Fp8GemmConfig(split_k=1), num_sms=4, use_ptx=USE_PTX)  # fmt: skip
    assert_close_to_exact(y, x, w_ref, None, operand_rounding=False)


def case_wide_scale_fold() -> None:
    """The wide kernel's folded block scales (NVIDIA: one widen-and-scale pass) against
    exact operands, at the edges of the fold range and outside it (where fp8_gemm must
    fall back to scaling the partial sums), with scales_fold given and checked."""
    torch.manual_seed(3)
    n, k, m = 256, 384, 48
    bits, _ = quantize_block_fp8(torch.randn(n, k))
    bits = bits.view(torch.uint8)
    x = torch.randn(m, k).bfloat16()
    cfg = Fp8GemmConfig(kind="wide", block_n=64, block_m=64, split_k=1, scale_on_acc=False)
    base = torch.rand(2, 3) + 0.5  # 16-bit mantissas: the hi/lo split is not exact
    for label, scale in (
        ("typical", base * 2.0**-9),
        ("smallest", base * 2.0**-84),
        ("largest", base * 2.0**37),
        ("zeros", base * torch.tensor([[0.0], [1e-3]])),
        ("too large", base * 2.0**45),
        ("too small", base * 2.0**-100),
    ):
        w_ref = dequantize_block_fp8(bits, scale, torch.float64)
        foldable = scales_foldable(scale)
        assert foldable == (label not in ("too large", "too small")), label
        for fold in (None, foldable):
            y = fp8_gemm(x.to(DEVICE), bits.to(DEVICE), scale.to(DEVICE), None, channel=False,
                         config=cfg, num_sms=4, use_ptx=USE_PTX, scales_fold=fold)  # fmt: skip
            assert_close_to_exact(y, x, w_ref, None, operand_rounding=True)


def case_gemm_fp16_activations() -> None:
    """fp16 x through every MMA kernel (fp16 widening, 2^8 fixed at the end)."""
    torch.manual_seed(4)
    m, n, k = 40, 96, 256
    x = torch.randn(m, k).half()
    for channel in (False, True):
        quant = quantize_channel_fp8 if channel else quantize_block_fp8
        dequant = dequantize_channel_fp8 if channel else dequantize_block_fp8
        wq, s = quant(torch.randn(n, k) * 0.1)
        w_ref = dequant(wq, s, torch.float64)
        for cfg in (Fp8GemmConfig(kind="mm", block_n=32, block_m=16, split_k=2),
                    Fp8GemmConfig(kind="wide", block_n=32, block_m=64, split_k=2),
                    Fp8GemmConfig(kind="wide", block_n=32, block_m=32, scale_on_acc=False),
                    Fp8GemmConfig(kind="gemv", block_n=32, block_m=64, split_k=1)):  # fmt: skip
            y = fp8_gemm(x.to(DEVICE), wq.view(torch.uint8).to(DEVICE), s.to(DEVICE), None,
                         channel=channel, config=cfg, num_sms=4, use_ptx=USE_PTX)  # fmt: skip
            assert y.dtype == torch.float16
            rounding = not channel and not cfg.scale_on_acc
            assert_close_to_exact(y, x, w_ref, None, rounding)


def case_k_perm() -> None:
    """K-permuted weights (``permute_k``) through every kind: all 256 codes exact (one-hot x),
    NaN rows NaN, the folded-scale widening of the wide kernel (NVIDIA: one word-wide PTX
    pass) equal bit for bit to the K-order kernel, random shapes with a K tail close to
    exact, fp16 activations, per-channel scales; and ``unpermute_k`` inverts ``permute_k``."""
    torch.manual_seed(0)
    n = 20
    bits = _all_codes_weight(n)
    bits[n - 2, 17] = 0x7F
    bits[n - 1, 200] = 0xFF
    perm = permute_k(bits)
    assert torch.equal(unpermute_k(perm), bits) and not torch.equal(perm, bits)
    x = torch.eye(256, dtype=torch.bfloat16)
    scale = 2.0 ** torch.randint(-4, 4, (1, 2)).float()
    ref = dequantize_block_fp8(bits, scale, torch.float64).T.float()
    kinds = (Fp8GemmConfig(kind="gemv", block_m=1, block_n=32),
             Fp8GemmConfig(kind="gemv", block_m=16, block_n=32),
             Fp8GemmConfig(kind="mm", block_m=16, block_n=32, split_k=2),
             Fp8GemmConfig(kind="wide", block_n=16, block_m=64, block_k=64, split_k=2),
             Fp8GemmConfig(kind="wide", block_n=32, block_m=32, split_k=1, scale_on_acc=False),
             Fp8GemmConfig(kind="dequant"))  # fmt: skip
    for cfg in kinds:
        xs = x[: cfg.block_m] if cfg.kind == "gemv" else x
        for nan_codes in (True, False):
            rows = n if nan_codes else n - 2
            y = fp8_gemm(xs.to(DEVICE), perm[:rows].to(DEVICE), scale.to(DEVICE), None,
                         channel=False, config=cfg, num_sms=4, use_ptx=USE_PTX,
                         nan_codes=nan_codes, k_perm=True).float().cpu()  # fmt: skip
            assert same_values(y[:, : n - 2], ref[: len(xs), : n - 2], False), f"{cfg} {nan_codes}"
            if nan_codes:
                assert bool(y[:, n - 2 :].isnan().all()), f"NaN codes must give NaN rows: {cfg}"
    # random data, K tail (K % 16 == 0, not % 128), N tail, bias, both activation dtypes
    n, k = 150, 208
    wq, s = quantize_block_fp8(torch.randn(n, k) * 0.05)
    w_bits = wq.view(torch.uint8)
    w_ref = dequantize_block_fp8(wq, s, torch.float64)
    bias = torch.randn(n)
    for dtype in (torch.bfloat16, torch.float16):
        for cfg in kinds:
            m = min(cfg.block_m, 13) if cfg.kind == "gemv" else 37
            xr = torch.randn(m, k).to(dtype)
            y = fp8_gemm(xr.to(DEVICE), permute_k(w_bits).to(DEVICE), s.to(DEVICE),
                         bias.to(dtype).to(DEVICE), channel=False, config=cfg, num_sms=4,
                         use_ptx=USE_PTX, k_perm=True)  # fmt: skip
            folded = cfg.kind == "dequant" or not cfg.scale_on_acc
            assert_close_to_exact(y, xr, w_ref, bias.to(dtype), operand_rounding=folded)
            if cfg.kind == "wide":  # same logical operands as the K-order kernel: same bits
                y0 = fp8_gemm(xr.to(DEVICE), w_bits.to(DEVICE), s.to(DEVICE),
                              bias.to(dtype).to(DEVICE), channel=False, config=cfg, num_sms=4,
                              use_ptx=USE_PTX, scales_fold=True)  # fmt: skip
                y1 = fp8_gemm(xr.to(DEVICE), permute_k(w_bits).to(DEVICE), s.to(DEVICE),
                              bias.to(dtype).to(DEVICE), channel=False, config=cfg, num_sms=4,
                              use_ptx=USE_PTX, scales_fold=True, k_perm=True)  # fmt: skip
                assert torch.equal(y0, y1), f"{cfg} {dtype}"
    # per-channel scales (``--quantize fp8`` weights) on the K-permuted layout
    wq, s = quantize_channel_fp8(torch.randn(n, k) * 0.05)
    w_ref = dequantize_channel_fp8(wq, s, torch.float64)
    for cfg in kinds:
        m = min(cfg.block_m, 13) if cfg.kind == "gemv" else 37
        xr = torch.randn(m, k).to(torch.bfloat16)
        y = fp8_gemm(xr.to(DEVICE), permute_k(wq.view(torch.uint8)).to(DEVICE), s.to(DEVICE),
                     None, channel=True, config=cfg, num_sms=4, use_ptx=USE_PTX,
                     k_perm=True)  # fmt: skip
        assert_close_to_exact(y, xr, w_ref, None, operand_rounding=cfg.kind == "dequant")


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--device"]:
        DEVICE, args = args[1], args[2:]
        USE_PTX = DEVICE == "cuda" and torch.version.hip is None
    for name in args or list(CASES):
        CASES[name]()
        print(f"ok {name} (device={DEVICE}, ptx={USE_PTX})")
