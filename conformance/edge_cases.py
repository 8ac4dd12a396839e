"""Edge cases: e4m3 extremes, empty batches, one-token sequences, block-table boundaries.

The FP8 weights here are written code by code rather than quantized, so they
hold what a quantizer never produces but a checkpoint may: every finite e4m3
code (448 = 0x7E, the subnormals 0x01..0x07, both zeros), all-zero blocks
under arbitrary scales, and a NaN code (0x7F), which must come out as NaN in
exactly the output column it feeds; a NaN activation row must give exactly a
NaN output row. K and N are not multiples of 128 so the partial last blocks
are exercised too.
"""

from __future__ import annotations

import torch

from chitu_core.quant import (
    FORMAT_FP8_BLOCK128,
    FORMAT_FP8_CHANNEL,
    QuantizedWeight,
    block_scale_shape,
    channel_scale_shape,
)
from conformance import builders as b
from conformance.case import Case

E4M3_NAN = 0x7F
E4M3_MAX_CODE = 0x7E  # 448
FINITE_CODES = torch.tensor([c for c in range(256) if c & 0x7F != E4M3_NAN], dtype=torch.uint8)
SUBNORMAL_CODES = torch.tensor([s | m for s in (0, 0x80) for m in range(1, 8)], dtype=torch.uint8)


def _codes_weight(gen, kind: str, fmt: str, n: int, k: int) -> QuantizedWeight:
    """An ``[N, K]`` FP8 weight of hand-picked codes; scales ~ 1/(448 sqrt(K)) unless stated."""
    if kind == "max":
        signs = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.uint8) << 7
        codes = signs | E4M3_MAX_CODE
    elif kind == "subnormal":
        codes = SUBNORMAL_CODES[torch.randint(0, len(SUBNORMAL_CODES), (n, k), generator=gen)]
    else:  # "all-codes", "zero-blocks", "nan": every finite code, in random places
        codes = FINITE_CODES[torch.randint(0, len(FINITE_CODES), (n, k), generator=gen)]
    shape = block_scale_shape((n, k)) if fmt == FORMAT_FP8_BLOCK128 else channel_scale_shape((n, k))
    scale = (0.5 + torch.rand(shape, generator=gen)) / (448 * k**0.5)
    if kind == "subnormal":
        scale = scale * 2**9  # subnormal codes are 2^-9..7*2^-9: bring them to O(1/sqrt(K))
    if kind == "zero-blocks":
        codes = codes.clone()
        codes[:128, :128] = 0  # a whole zero block under a huge scale
        codes[128:256, 256:] = 0x80  # negative zeros in the partial last column block
        if fmt == FORMAT_FP8_BLOCK128:
            scale[0, 0] = 1e4
        else:
            scale[:128] = 1e4
    if kind == "nan":
        codes = codes.clone()
        codes[n // 3, k - 1] = E4M3_NAN  # NaN in the last (partial) K block
    return QuantizedWeight(codes, scale, fmt)


def e4m3_linear_case(kind: str, fmt: str, m: int = 5, n: int = 300, k: int = 400) -> Case:
    """``linear`` on a hand-made FP8 weight (see ``_codes_weight``); "nan-x" poisons a row of x."""

    def build(gen):
        x = b.randn(gen, m, k)
        if kind == "max":
            x = x * 100  # large products: accumulations must not saturate or wrap
        if kind == "nan-x":
            x[m // 2, k // 2] = float("nan")
        return {"x": x, "weight": _codes_weight(gen, kind, fmt, n, k), "bias": None}

    return Case(
        "linear", f"e4m3-{kind},{fmt},M={m},N={n},K={k}", build, ("x",), ("weight",), ("x",)
    )


def e4m3_moe_case(tokens: int = 6, experts: int = 4, hidden: int = 260, inter: int = 136):
    """``fused_moe`` whose experts hold every finite e4m3 code."""

    def build(gen):
        fmt = FORMAT_FP8_BLOCK128
        w13 = [_codes_weight(gen, "all-codes", fmt, 2 * inter, hidden) for _ in range(experts)]
        w2 = [_codes_weight(gen, "all-codes", fmt, hidden, inter) for _ in range(experts)]
        weights, ids = torch.softmax(b.randn(gen, tokens, experts), -1).topk(2, dim=-1)
        return {
            "x": b.randn(gen, tokens, hidden),
            "w13": _stack(w13),
            "w2": _stack(w2),
            "topk_weights": weights,
            "topk_ids": ids.int(),
        }

    name = f"e4m3-all-codes,T={tokens},E={experts},H={hidden},I={inter},k=2"
    return Case("fused_moe", name, build, ("x",), ("w13", "w2"), ("x", "topk_weights", "topk_ids"))


def _stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
    weight = torch.stack([p.weight for p in parts])
    scale = torch.stack([p.scale for p in parts])
    return QuantizedWeight(weight, scale, parts[0].fmt)


def e4m3_cases() -> list[Case]:
    """448, subnormals, all codes, zero blocks and NaN for both FP8 formats, plus a MoE."""
    cases = []
    for fmt in (FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL):
        for kind in ("all-codes", "max", "subnormal", "zero-blocks", "nan", "nan-x"):
            cases.append(e4m3_linear_case(kind, fmt))
    return cases + [e4m3_moe_case()]


def empty_batch_cases() -> list[Case]:
    """Every token-batched op with zero tokens (or zero sequences)."""
    return [
        b.linear_case(FORMAT_FP8_BLOCK128, 0, 576, 7168, False, label="empty"),
        b.route_case("empty,E=256", 0, 256, 8, "sigmoid", 8, 4, True, 2.5, True),
        b.fused_moe_case(FORMAT_FP8_BLOCK128, 0, 8, 256, 128, 8),
        b.store_kv_case(0, 8, 128, True),
        b.decode_case([], 8, 2, 64, 16, label="empty"),
        b.prefill_case([], [], 8, 2, 64, 16, label="empty"),
        b.mla_case("mla_decode", None, [], 4, 64, 16, 16, label="empty"),
        b.mla_case("mla_prefill", [], [], 4, 64, 16, 16, label="empty"),
        b.rms_norm_case(0, 4096),
        b.add_rms_norm_case(0, 4096),
        b.silu_case(0, 2048),
        b.rope_case(0, 8, 2, 128, 128, True),
        b.sample_case(0, 1000),
    ]


def one_token_cases() -> list[Case]:
    """Sequences of a single token: one-token prompts in a batch, a first decode step."""
    return [
        b.prefill_case([1, 1, 1], [1, 1, 1], 8, 2, 64, 16, label="one-token prompts"),
        b.prefill_case([1, 1], [1, 40], 8, 8, 64, 16, label="one-token chunk"),
        b.decode_case([1, 1, 1, 1], 8, 2, 64, 16, label="one-token contexts"),
        b.mla_case("mla_prefill", [1, 1], [1, 1], 8, 64, 16, 16, label="one-token prompts"),
        b.mla_case("mla_decode", None, [1, 1, 1], 8, 64, 16, 16, label="one-token contexts"),
    ]


def block_boundary_cases() -> list[Case]:
    """Contexts just under, at and just past a block edge; tiny and large blocks."""
    edges = [15, 16, 17, 31, 32, 33, 48]
    return [
        b.decode_case(edges, 8, 2, 64, 16, label="block edges"),
        b.decode_case([1, 2, 3, 9], 4, 2, 32, 1, label="block size 1"),
        b.decode_case([127, 128, 129, 300], 4, 1, 64, 128, label="block size 128"),
        b.prefill_case([3, 2, 16], [17, 16, 32], 8, 2, 64, 16, label="chunks across edges"),
        b.prefill_case([16, 17], [16, 17], 4, 4, 32, 16, label="prompts at edges"),
        b.mla_case("mla_decode", None, [63, 64, 65], 8, 64, 16, 64, label="block edges"),
        b.mla_case("mla_prefill", [2, 64], [65, 64], 8, 64, 16, 64, label="chunks across edges"),
        b.store_kv_case(16, 2, 32, True, num_blocks=2, block_size=8),  # fills every slot
    ]


def edge_cases() -> list[Case]:
    """All edge cases (the same in --quick and full runs: they are small)."""
    return e4m3_cases() + empty_batch_cases() + one_token_cases() + block_boundary_cases()
