"""The case library: inputs for every compute op, and how to run one on a backend.

A case builds its inputs on the CPU in fp32 from a seeded generator. ``run_case``
casts the activations to the backend's compute dtype, prepares the weights with
the backend's ``prepare_weight``, moves everything to the backend's device and
returns the outputs as a list of tensors, in a canonical form (e.g. the
unordered top-k of ``moe_route`` sorted by expert id) so that two backends can
be compared element by element. The reference is the same case run on
``cpu_ref`` with the *same* rounded activations in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from chitu_core.quant import (
    FORMAT_FP8_BLOCK128,
    FORMAT_FP8_CHANNEL,
    FORMAT_UNQUANTIZED,
    QuantizedWeight,
    quantize_fp8,
)

Inputs = dict[str, Any]


@dataclass(frozen=True)
class Case:
    """One op on one set of shapes.

    ``activations`` name the float inputs cast to the compute dtype (caches
    included); ``weights`` name ``QuantizedWeight`` inputs passed through
    ``prepare_weight``. Everything else (indices, scalars) is passed as is.
    """

    op: str
    name: str
    build: Callable[[torch.Generator], Inputs]
    activations: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.op}[{self.name}]"


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _weight(gen: torch.Generator, fmt: str, *shape: int) -> QuantizedWeight:
    dense = _randn(gen, *shape, scale=shape[-1] ** -0.5)
    if fmt == FORMAT_UNQUANTIZED:
        return QuantizedWeight(dense, None, fmt)
    return quantize_fp8(dense, fmt)


def _paged(
    gen: torch.Generator, context_lens: list[int], block_size: int, heads: int, dims: list[int]
):
    """A paged cache holding ``context_lens`` tokens per sequence in shuffled blocks.

    Returns ``(caches, block_tables [B, max_blocks] int32, context_lens [B] int32)``;
    block 0 is left unused, as engines reserve it for padding.
    """
    blocks_per_seq = [(n + block_size - 1) // block_size for n in context_lens]
    num_blocks = 1 + sum(blocks_per_seq)
    order = torch.randperm(num_blocks - 1, generator=gen) + 1
    max_blocks = max(blocks_per_seq + [1])
    tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    start = 0
    for b, count in enumerate(blocks_per_seq):
        tables[b, :count] = order[start : start + count].int()
        start += count
    caches = [_randn(gen, num_blocks, block_size, heads, d) for d in dims]
    return caches, tables, torch.tensor(context_lens, dtype=torch.int32)


def _linear_case(fmt: str, m: int, n: int, k: int, bias: bool) -> Case:
    def build(gen):
        return {
            "x": _randn(gen, m, k),
            "weight": _weight(gen, fmt, n, k),
            "bias": _randn(gen, n) if bias else None,
        }

    return Case("linear", f"{fmt},M={m},N={n},K={k},bias={bias}", build, ("x", "bias"), ("weight",))


def _route_case(
    name: str,
    tokens: int,
    experts: int,
    top_k: int,
    scoring: str,
    groups: int,
    topk_groups: int,
    bias: bool,
    scaling: float,
    renormalize: bool,
) -> Case:
    def build(gen):
        return {
            "router_logits": _randn(gen, tokens, experts),
            "top_k": top_k,
            "scoring": scoring,
            "renormalize": renormalize,
            "num_groups": groups,
            "topk_groups": topk_groups,
            "correction_bias": _randn(gen, experts, scale=0.5) if bias else None,
            "routed_scaling_factor": scaling,
        }

    return Case("moe_route", name, build)


def _fused_moe_case(
    fmt: str, tokens: int, experts: int, hidden: int, inter: int, top_k: int
) -> Case:
    def build(gen):
        logits = _randn(gen, tokens, experts)
        weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
        return {
            "x": _randn(gen, tokens, hidden),
            "w13": _weight(gen, fmt, experts, 2 * inter, hidden),
            "w2": _weight(gen, fmt, experts, hidden, inter),
            "topk_weights": weights,
            "topk_ids": ids.int(),
        }

    return Case(
        "fused_moe",
        f"{fmt},T={tokens},E={experts},H={hidden},I={inter},k={top_k}",
        build,
        ("x",),
        ("w13", "w2"),
    )


def _decode_case(context_lens: list[int], hq: int, hkv: int, d: int, block_size: int) -> Case:
    def build(gen):
        (k, v), tables, lens = _paged(gen, context_lens, block_size, hkv, [d, d])
        q = _randn(gen, len(context_lens), hq, d)
        return {
            "q": q,
            "key_cache": k,
            "value_cache": v,
            "block_tables": tables,
            "context_lens": lens,
            "scale": d**-0.5,
        }

    name = f"ctx={context_lens},Hq={hq},Hkv={hkv},D={d},bs={block_size}"
    return Case("paged_attention_decode", name, build, ("q", "key_cache", "value_cache"))


def _prefill_case(
    q_lens: list[int], context_lens: list[int], hq: int, hkv: int, d: int, block_size: int
) -> Case:
    def build(gen):
        (k, v), tables, lens = _paged(gen, context_lens, block_size, hkv, [d, d])
        cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return {
            "q": _randn(gen, sum(q_lens), hq, d),
            "key_cache": k,
            "value_cache": v,
            "block_tables": tables,
            "cu_seqlens_q": cu,
            "context_lens": lens,
            "scale": d**-0.5,
        }

    name = f"q={q_lens},ctx={context_lens},Hq={hq},Hkv={hkv},D={d},bs={block_size}"
    return Case("paged_attention_prefill", name, build, ("q", "key_cache", "value_cache"))


def _mla_case(
    op: str,
    q_lens: list[int] | None,
    context_lens: list[int],
    heads: int,
    rank: int,
    rope: int,
    block_size: int,
) -> Case:
    def build(gen):
        (cache,), tables, lens = _paged(gen, context_lens, block_size, 1, [rank + rope])
        tokens = sum(q_lens) if q_lens is not None else len(context_lens)
        inputs = {
            "q_latent": _randn(gen, tokens, heads, rank),
            "q_rope": _randn(gen, tokens, heads, rope),
            "latent_cache": cache,
            "block_tables": tables,
            "context_lens": lens,
            "scale": (rank + rope) ** -0.5,
        }
        if q_lens is not None:
            inputs["cu_seqlens_q"] = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(
                0, dtype=torch.int32
            )
        return inputs

    name = f"q={q_lens},ctx={context_lens},H={heads},R={rank},P={rope},bs={block_size}"
    return Case(op, name, build, ("q_latent", "q_rope", "latent_cache"))


def _store_kv_case(tokens: int, heads: int, d: int, with_value: bool) -> Case:
    def build(gen):
        num_blocks, block_size = 6, 8
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
        return {
            "key": _randn(gen, tokens, heads, d),
            "value": _randn(gen, tokens, heads, d) if with_value else None,
            "key_cache": torch.zeros(num_blocks, block_size, heads, d),
            "value_cache": torch.zeros(num_blocks, block_size, heads, d) if with_value else None,
            "slot_mapping": slots.long(),
        }

    return Case(
        "store_kv",
        f"T={tokens},H={heads},D={d},value={with_value}",
        build,
        ("key", "value", "key_cache", "value_cache"),
    )


def _rope_case(tokens: int, hq: int, hk: int, d: int, rot: int, neox: bool) -> Case:
    def build(gen):
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
        angles = torch.arange(64, dtype=torch.float64)[:, None] * inv_freq[None]
        return {
            "q": _randn(gen, tokens, hq, d),
            "k": _randn(gen, tokens, hk, d),
            "positions": torch.randint(0, 64, (tokens,), generator=gen),
            "cos_sin_cache": torch.cat([angles.cos(), angles.sin()], -1).float(),
            "is_neox_style": neox,
        }

    return Case("rope", f"T={tokens},Hq={hq},Hk={hk},D={d},R={rot},neox={neox}", build, ("q", "k"))


def _sample_case(batch: int, vocab: int) -> Case:
    """Deterministic rows only: temperature 0, or top_k = 1 (both are the argmax)."""

    def build(gen):
        logits = _randn(gen, batch, vocab, scale=3.0)
        logits[0, :3] = logits[0].max() + 1  # a tie: the lowest id must win
        temps = torch.where(torch.arange(batch) % 2 == 0, 0.0, 0.7)
        return {
            "logits": logits,
            "temperatures": temps.float(),
            "top_ps": torch.full((batch,), 0.9),
            "top_ks": torch.where(temps == 0, 0, 1).int(),
            "generators": [None] * batch,
        }

    return Case("sample", f"B={batch},V={vocab}", build)


def _small_cases() -> list[Case]:
    cases = []
    for m, d in ((1, 64), (5, 200), (0, 32)):
        cases.append(
            Case(
                "rms_norm",
                f"M={m},D={d}",
                lambda g, m=m, d=d: {
                    "x": _randn(g, m, d, scale=3.0),
                    "weight": _randn(g, d) + 1,
                    "eps": 1e-6,
                },
                ("x", "weight"),
            )
        )
        cases.append(
            Case(
                "silu_and_mul",
                f"M={m},I={d}",
                lambda g, m=m, d=d: {"x": _randn(g, m, 2 * d, scale=2.0)},
                ("x",),
            )
        )
    cases += [
        _rope_case(7, 4, 2, 64, 64, True),
        _rope_case(7, 4, 1, 96, 32, False),
        _rope_case(0, 2, 2, 16, 16, True),
    ]
    cases += [_sample_case(6, 50), _sample_case(1, 129)]
    return cases


def contract_cases() -> list[Case]:
    """Small and odd shapes for every compute op: M=1, tails not multiple of 128, empty batches."""
    cases: list[Case] = []
    for fmt in (FORMAT_UNQUANTIZED, FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL):
        for m, n, k in ((1, 128, 128), (3, 300, 200), (17, 257, 129), (0, 64, 96)):
            cases.append(_linear_case(fmt, m, n, k, bias=(m == 3)))
    cases += [
        _route_case("softmax,renorm", 9, 8, 2, "softmax", 1, 1, False, 1.0, True),
        _route_case("softmax,no-renorm", 4, 60, 4, "softmax", 1, 1, False, 1.0, False),
        _route_case("deepseek-grouped", 11, 32, 4, "sigmoid", 8, 3, True, 2.5, True),
        _route_case("empty", 0, 16, 2, "sigmoid", 4, 2, True, 1.0, True),
    ]
    for fmt in (FORMAT_UNQUANTIZED, FORMAT_FP8_BLOCK128):
        cases += [_fused_moe_case(fmt, 5, 4, 160, 96, 2), _fused_moe_case(fmt, 1, 8, 128, 256, 3)]
    cases.append(_fused_moe_case(FORMAT_FP8_BLOCK128, 0, 4, 64, 64, 2))
    cases += [
        _store_kv_case(13, 2, 16, True),
        _store_kv_case(5, 1, 40, False),
        _store_kv_case(0, 2, 8, True),
    ]
    cases += [
        _decode_case([1, 17, 40], 4, 2, 32, 16),
        _decode_case([130], 8, 8, 64, 32),
        _decode_case([5, 1], 6, 1, 16, 4),
        _prefill_case([3, 17, 1], [3, 17, 1], 4, 2, 32, 16),
        _prefill_case([4, 2], [20, 9], 4, 4, 16, 8),  # cached prefixes / chunked prefill
        _mla_case("mla_decode", None, [1, 33, 70], 4, 64, 16, 16),
        _mla_case("mla_prefill", [5, 1], [12, 1], 4, 64, 16, 8),
    ]
    return cases + _small_cases()


def prepare_inputs(
    ops: Any, case: Case, inputs: Inputs, dtype: torch.dtype, device: torch.device
) -> Inputs:
    """Cast activations to ``dtype``, prepare weights with ``ops``, move all to ``device``."""
    out: Inputs = {}
    for key, value in inputs.items():
        if key in case.weights:
            w = value
            if w.fmt == FORMAT_UNQUANTIZED:
                w = QuantizedWeight(w.weight.to(dtype), None, w.fmt)
            scale = None if w.scale is None else w.scale.to(device)
            out[key] = ops.prepare_weight(w.weight.to(device), scale, w.fmt)
        elif isinstance(value, torch.Tensor):
            tensor = value.to(dtype) if key in case.activations else value
            out[key] = tensor.to(device)
        else:
            out[key] = value
    return out


def reference_inputs(case: Case, inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """The same values the backend sees (activations rounded to ``dtype``), in fp32 on the CPU."""
    out = dict(inputs)
    for key in case.activations:
        if isinstance(inputs.get(key), torch.Tensor):
            out[key] = inputs[key].to(dtype).float()
    for key in case.weights:
        w = inputs[key]
        if w.fmt == FORMAT_UNQUANTIZED:
            out[key] = QuantizedWeight(w.weight.to(dtype).float(), None, w.fmt)
    return out


def _canonical_route(weights: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    order = ids.long().argsort(dim=-1)
    return [weights.gather(-1, order), ids.long().gather(-1, order)]


def call_op(ops: Any, case: Case, args: Inputs) -> list[torch.Tensor]:
    """Run ``case.op`` with prepared ``args``; return its outputs in canonical form."""
    fn = getattr(ops, case.op)
    if case.op == "store_kv":
        fn(**args)
        return [t for t in (args["key_cache"], args["value_cache"]) if t is not None]
    result = fn(**args)
    if case.op == "moe_route":
        return _canonical_route(*result)
    return list(result) if isinstance(result, tuple) else [result]


def run_case(
    ops: Any, case: Case, inputs: Inputs, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Run ``case`` on a backend at ``dtype``/``device``; outputs in canonical form."""
    return call_op(ops, case, prepare_inputs(ops, case, inputs, dtype, device))


def run_reference(
    ref_ops: Any, case: Case, inputs: Inputs, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Run ``case`` on the CPU reference with the activations rounded as the backend sees them."""
    args = reference_inputs(case, inputs, dtype)
    return run_case(ref_ops, case, args, torch.float32, torch.device("cpu"))
